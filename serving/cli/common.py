"""What the command groups of the `shadowgate` CLI share: the consoles, the error exit, the
settings (loaded once per command, at its entry), the options several commands take, and
the client of the running service's admin API."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import httpx
import typer
from rich.console import Console

from serving.settings import ConfigError, Settings, load_settings

console = Console()
err = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", help="YAML settings file (else $SHADOWGATE_CONFIG).")
UrlOpt = typer.Option(None, "--url", help="Service URL (default: the configured host:port).")
JsonOpt = typer.Option(False, "--json", help="Print JSON.")
JsonObjectOpt = typer.Option(False, "--json", help="Print one JSON object.")


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def settings_or_exit(config: Optional[Path], **overrides) -> Settings:
    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        fail(str(exc))


def service_settings(config: Optional[Path], **overrides) -> Settings:
    """Settings for a command that reads the running service's Redis directly: when `shadowgate
    up` runs a redis-server of its own (the configured one keeps nothing), that one."""
    from serving.ops.launcher import with_running_redis

    return with_running_redis(settings_or_exit(config, **overrides))


def service_url(settings: Settings, url: Optional[str]) -> str:
    return url or f"http://{settings.host}:{settings.port}"


def service_keys(settings: Settings, who: str) -> tuple[str, str]:
    """The API key and the admin key, both (else exit: `who` needs them)."""
    from serving.api.auth import client_keys

    api_key, admin_key = client_keys(settings)
    if api_key is None or admin_key is None:
        fail(f"{who} needs an API key and the admin key (settings or the key files `up` writes)")
    return api_key, admin_key


def admin_client(config: Optional[Path], url: Optional[str]) -> httpx.Client:
    from serving.api.auth import client_keys

    settings = settings_or_exit(config)
    _, admin = client_keys(settings)
    if admin is None:
        fail("this command needs the admin key (settings, $SHADOWGATE_ADMIN_KEY, or the key file `up` writes)")
    return httpx.Client(base_url=service_url(settings, url), headers={"Authorization": f"Bearer {admin}"},
                        timeout=30)


def call(client: httpx.Client, method: str, path: str, **kw) -> dict:
    """One admin API call; exits 1 when the service cannot be reached or answers an error."""
    try:
        r = client.request(method, path, **kw)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the service at {client.base_url}: {exc} (is `shadowgate up` running?)", 1)
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        fail(f"{method} {path}: HTTP {r.status_code}: {message}", 1)
    return r.json()


def fmt(v, spec: str = ".4f") -> str:
    """A figure, or "-" where there is none yet."""
    return "-" if v is None else format(v, spec)


def utc(t: float) -> str:
    """A Unix time as UTC, to the second."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
