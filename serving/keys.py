"""API and admin keys that `shadowgate up` creates when none is configured.

A created key is written once, owner-only (0600), under the state directory, and read back
by later starts and by `shadowgate bench serve`; it is never printed or logged: the launcher
prints where it is.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import SecretStr

from serving.settings import ApiKey, Settings


def key_file(settings: Settings, kind: str) -> Path:
    return settings.state_dir / f"{kind}_key"


def _read_or_create(path: Path, prefix: str) -> tuple[str, bool]:
    if path.exists():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = prefix + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    return secret, True


def with_keys(settings: Settings) -> tuple[Settings, list[str]]:
    """Settings with an API key and an admin key, creating key files where none is
    configured; returns notes for the operator (paths only, never the secrets)."""
    notes, update = [], {}
    if not settings.api_keys:
        path = key_file(settings, "api")
        secret, created = _read_or_create(path, "sg-")
        update["api_keys"] = [ApiKey(key=SecretStr(secret), name="local")]
        notes.append(f"API key {'created' if created else 'read'}: {path} (owner-only)")
    if settings.admin_key is None:
        path = key_file(settings, "admin")
        secret, created = _read_or_create(path, "sg-admin-")
        update["admin_key"] = SecretStr(secret)
        notes.append(f"admin key {'created' if created else 'read'}: {path} (owner-only)")
    return (settings.model_copy(update=update) if update else settings), notes


def client_keys(settings: Settings) -> tuple[str | None, str | None]:
    """The first API key and the admin key, from settings or the key files (for clients
    such as the benchmark)."""
    api = settings.api_keys[0].key.get_secret_value() if settings.api_keys else None
    admin = settings.admin_key.get_secret_value() if settings.admin_key else None
    if api is None and key_file(settings, "api").exists():
        api = key_file(settings, "api").read_text().strip()
    if admin is None and key_file(settings, "admin").exists():
        admin = key_file(settings, "admin").read_text().strip()
    return api, admin
