"""API keys: salted hashes at rest, the gateway's key ring, and the keys `shadowgate up`
creates when none is configured.

A key reads `sg_<id>_<secret>`: the id (8 hex digits) names the one stored hash to check,
so a request costs one scrypt at most (and none once the key is in the ring's cache). The
key file (JSON, owner-only) holds per key its id, name, role, policy and
`scrypt$<id>$<n>$<r>$<p>$<salt hex>$<hash hex>`; never the key. `shadowgate keys add`
prints a new key once.

`shadowgate up` with no key configured makes a client key ("local") and an admin key
("admin") in the key file and leaves each plain key in an owner-only file under the state
directory, for local clients (curl, `shadowgate bench serve`); it prints where they are,
never the keys.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from serving.settings import ApiKey, KeyPolicy, Settings

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
_KEY = re.compile(r"^sg_([0-9a-f]{8})_[0-9a-f]{48}$")
_CACHE_MAX = 10_000


class KeyFileError(ValueError):
    """A key-file problem, worded for the operator."""


def key_id(secret: str) -> str:
    """A stable, non-reversible name for a plain key (settings without a name)."""
    return "key-" + hashlib.sha256(secret.encode()).hexdigest()[:12]


def new_key() -> tuple[str, str]:
    """(id, plain key)."""
    kid = secrets.token_hex(4)
    return kid, f"sg_{kid}_{secrets.token_hex(24)}"


def hash_key(plain: str, kid: str | None = None) -> str:
    m = _KEY.match(plain)
    kid = kid or (m.group(1) if m else "-")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(plain.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${kid}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def parse_hash(stored: str) -> tuple[str, int, int, int, bytes, bytes]:
    try:
        scheme, kid, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            raise ValueError(scheme)
        return kid, int(n), int(r), int(p), bytes.fromhex(salt), bytes.fromhex(digest)
    except ValueError:
        raise KeyFileError("a key hash must read scrypt$<id>$<n>$<r>$<p>$<salt hex>$<hash hex>") from None


def check_key(plain: bytes, stored: str) -> bool:
    _, n, r, p, salt, digest = parse_hash(stored)
    got = hashlib.scrypt(plain, salt=salt, n=n, r=r, p=p, dklen=len(digest), maxmem=256 << 20)
    return hmac.compare_digest(got, digest)


# ---- the key file ----------------------------------------------------------------------------
def read_key_file(path: Path) -> list[ApiKey]:
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        return [ApiKey(key_hash=k["hash"], name=k["name"], role=k.get("role", "client"),
                       policy=KeyPolicy(**k["policy"]) if k.get("policy") else None) for k in data["keys"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"key file {path} is not valid: {exc}") from None


def _entries(path: Path) -> list[dict]:
    return json.loads(path.read_text())["keys"] if path.exists() else []


def _write(path: Path, entries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"keys": entries}, fh, indent=2)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def add_key(path: Path, name: str, role: str = "client", policy: KeyPolicy | None = None) -> str:
    """Store a new key's salted hash under `name`; returns the plain key (shown once)."""
    entries = _entries(path)
    if any(e["name"] == name for e in entries):
        raise KeyFileError(f"a key named {name!r} exists already in {path} (remove it first)")
    if role not in ("client", "admin"):
        raise KeyFileError(f"role must be client or admin, not {role!r}")
    kid, plain = new_key()
    entries.append({"id": kid, "name": name, "role": role, "hash": hash_key(plain, kid), "created": time.time(),
                    "policy": policy.model_dump(exclude_defaults=True) if policy else None})
    _write(path, entries)
    return plain


def remove_key(path: Path, name: str) -> bool:
    entries = _entries(path)
    kept = [e for e in entries if e["name"] != name]
    if len(kept) == len(entries):
        return False
    _write(path, kept)
    return True


def list_keys(path: Path) -> list[dict]:
    return [{k: e.get(k) for k in ("id", "name", "role", "created", "policy")} for e in _entries(path)]


# ---- the gateway's view ----------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    name: str
    role: str  # client | admin
    policy: KeyPolicy


class KeyRing:
    """Looks a bearer token up among the configured keys (hashed or plain) and the key file.

    Tokens are compared as bytes (a header may hold any byte). A verified token is cached by
    its SHA-256, so scrypt runs once per key and process; a refused one is cached too, so
    repeating a wrong key costs no scrypt either."""

    def __init__(self, settings: Settings, reload_s: float = 2.0):
        self.settings, self.reload_s = settings, reload_s
        self.lock = threading.Lock()
        self._mtime: float | None = None
        self._checked = 0.0
        self._load()

    def _load(self) -> None:
        s = self.settings
        entries = list(s.api_keys)
        if s.admin_key is not None:
            entries.append(ApiKey(key=s.admin_key, name="admin", role="admin"))
        path = s.key_file
        self._mtime = path.stat().st_mtime if path is not None and path.exists() else None
        if path is not None:
            entries += read_key_file(path)
        plain, hashed = [], {}
        for e in entries:
            ident = Identity(e.name or (key_id(e.key.get_secret_value()) if e.key else "key"), e.role,
                             s.policy_for(e))
            if e.key is not None:
                plain.append((hashlib.sha256(e.key.get_secret_value().encode()).digest(), ident))
            else:
                hashed.setdefault(parse_hash(e.key_hash)[0], []).append((e.key_hash, ident))
        self.plain, self.hashed, self.cache = plain, hashed, {}

    def _maybe_reload(self) -> None:
        path, now = self.settings.key_file, time.monotonic()
        if path is None or now - self._checked < self.reload_s:
            return
        self._checked = now
        try:
            mtime = path.stat().st_mtime if path.exists() else None
        except OSError:
            return
        if mtime != self._mtime:
            try:
                self._load()
            except KeyFileError:  # a half-edited file: keep the keys in force
                pass

    def lookup(self, token: bytes) -> Identity | None:
        """The key's identity, or None. May run one scrypt: call it off the event loop."""
        with self.lock:
            self._maybe_reload()
            digest = hashlib.sha256(token).digest()
            if digest in self.cache:
                return self.cache[digest]
            found = None
            for want, ident in self.plain:
                if hmac.compare_digest(want, digest):
                    found = ident
            m = _KEY.match(token.decode("latin-1"))
            if found is None and m:
                for stored, ident in self.hashed.get(m.group(1), []):
                    if check_key(token, stored):
                        found = ident
                        break
            if len(self.cache) >= _CACHE_MAX:
                self.cache.clear()
            self.cache[digest] = found
            return found

    def cached(self, token: bytes) -> tuple[bool, Identity | None]:
        """(known, identity) without any scrypt: lets the caller skip a thread hop."""
        with self.lock:
            digest = hashlib.sha256(token).digest()
            return (digest in self.cache, self.cache.get(digest))


# ---- what `shadowgate up` makes ----------------------------------------------------------------
def default_key_file(settings: Settings) -> Path:
    return settings.key_file or settings.state_dir / "keys.json"


def key_file(settings: Settings, kind: str) -> Path:
    """The owner-only file holding the plain key `up` made (kind: api | admin)."""
    return settings.state_dir / f"{kind}_key"


def _local_key(settings: Settings, kind: str, name: str, role: str) -> tuple[str, bool]:
    """The plain key of `kind` in its file and its hash under `name` in the key file, made
    when missing."""
    path, hashes = key_file(settings, kind), default_key_file(settings)
    known = {e["name"] for e in _entries(hashes)}
    if path.exists() and name in known:
        return str(path), False
    if name in known:  # the plain copy was deleted: a fresh key replaces the old one
        remove_key(hashes, name)
    if path.exists():  # a key file from before hashing: keep the key, store its hash
        plain = path.read_text().strip()
        entries = _entries(hashes)
        entries.append({"id": _KEY.match(plain).group(1) if _KEY.match(plain) else "-", "name": name,
                        "role": role, "hash": hash_key(plain), "created": time.time(), "policy": None})
        _write(hashes, entries)
        return str(path), False
    plain = add_key(hashes, name, role)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(plain + "\n")
    return str(path), True


def with_keys(settings: Settings) -> tuple[Settings, list[str]]:
    """Settings with a key file holding a client and an admin key when none is configured;
    returns notes for the operator (paths only, never the keys)."""
    hashes = default_key_file(settings)
    entries = read_key_file(hashes) if hashes.exists() else []
    roles = {e.role for e in [*settings.api_keys, *entries]}
    notes, update = [], {}
    if "client" not in roles:
        path, created = _local_key(settings, "api", "local", "client")
        notes.append(f"API key {'created' if created else 'read'}: {path} (owner-only)")
    if settings.admin_key is None and "admin" not in roles:
        path, created = _local_key(settings, "admin", "admin", "admin")
        notes.append(f"admin key {'created' if created else 'read'}: {path} (owner-only)")
    if hashes.exists() and settings.key_file is None:
        update["key_file"] = hashes.resolve()
        notes.append(f"key file (salted hashes): {hashes}; add a key with `shadowgate keys add NAME`")
    return (settings.model_copy(update=update) if update else settings), notes


def client_keys(settings: Settings) -> tuple[str | None, str | None]:
    """A plain client key and admin key, from settings or the files `up` writes (for local
    clients such as the benchmark)."""
    api = next((k.key.get_secret_value() for k in settings.api_keys if k.key and k.role == "client"), None)
    admin = settings.admin_key.get_secret_value() if settings.admin_key else None
    if api is None and key_file(settings, "api").exists():
        api = key_file(settings, "api").read_text().strip()
    if admin is None and key_file(settings, "admin").exists():
        admin = key_file(settings, "admin").read_text().strip()
    return api, admin
