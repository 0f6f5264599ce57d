"""API keys and what a key may do: salted hashes at rest, the gateway's key ring, the per-key
policy checks and rate limits, and the keys `shadowgate up` creates when none is configured.

A key reads `sg_<id>_<secret>`: the id (8 hex digits) names the one stored hash to check,
so a request costs one scrypt at most (and none once the key is in the ring's cache). The
key file (JSON, owner-only) holds per key its id, name, role, policy and
`scrypt$<id>$<n>$<r>$<p>$<salt hex>$<hash hex>`; never the key. `shadowgate keys add`
prints a new key once.

`shadowgate up` with no key configured makes a client key ("local") and an admin key
("admin") in the key file and leaves each plain key in an owner-only file under the state
directory, for local clients (curl, `shadowgate bench serve`); it prints where they are,
never the keys.

Rate limits (per key, `rate_limit_per_min` prompts and `tokens_per_min` tokens) count over a
sliding 60 s window shared by every gateway replica through Redis: per key and quantity a
sorted set of what was taken (member "<id>:<n>", score the time) and its running total, both
trimmed, checked and added to in one Lua script, so that no two replicas interleave and a
refused request takes nothing. Time is Redis's own clock (one clock for all replicas) unless
a clock is injected (tests). While Redis is unreachable each replica keeps the same sliding
log in memory: serving goes on, limited per replica instead of per service.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import redis

from monitor.keys import Keys
from serving.api.protocol import ApiError
from serving.settings import ApiKey, GatewaySettings, KeyPolicy, Settings

log = logging.getLogger(__name__)

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


def bearer_token(header: str) -> bytes:
    """The key of an `Authorization: Bearer <key>` header, as the bytes the client sent."""
    if not header:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "malformed Authorization header: expected 'Bearer <key>'", "authentication_error")
    # headers arrive as latin-1: back to the bytes the client sent, compared as bytes
    return token.strip().encode("latin-1")


class Authenticator:
    """Who a request is (401 without a valid key) and what it may reach (403): client keys the
    API, the admin key the /admin endpoints only."""

    def __init__(self, keys: KeyRing):
        self.keys = keys

    async def identity(self, request) -> Identity:
        token = bearer_token(request.headers.get("authorization", ""))
        known, ident = self.keys.cached(token)
        if not known:  # at most one scrypt per key and process, off the event loop
            ident = await asyncio.to_thread(self.keys.lookup, token)
        if ident is None:
            raise ApiError(401, "invalid API key", "authentication_error")
        return ident

    async def client(self, request) -> Identity:
        ident = await self.identity(request)
        if ident.role == "admin":
            raise ApiError(403, "the admin key is for /admin endpoints only", "permission_error")
        return ident

    async def admin(self, request) -> Identity:
        ident = await self.identity(request)
        if ident.role != "admin":
            raise ApiError(403, "this endpoint needs the admin key", "permission_error")
        return ident


# ---- per-key policy ----------------------------------------------------------------------------
def check_sparsity(policy: KeyPolicy, sparsity: float | None) -> None:
    """A sparsity the client asks for must lie in the key's bounds (the operator's is clamped)."""
    lo, hi = policy.min_sparsity, policy.max_sparsity
    if sparsity is not None and not lo <= sparsity <= hi:
        raise ApiError(400, f"sparsity {sparsity} is outside this key's bounds [{lo}, {hi}]")


def max_prompts(policy: KeyPolicy, gw: GatewaySettings) -> int:
    """Prompts per request: the gateway's bound, or the key's when it is lower."""
    return min(gw.max_prompts_per_request, policy.max_prompts or gw.max_prompts_per_request)


def max_request_tokens(policy: KeyPolicy, gw: GatewaySettings) -> int:
    """Prompt tokens + max_tokens per prompt, summed over a request: the gateway's bound, or
    the key's when it is lower."""
    return min(gw.max_request_tokens, policy.max_request_tokens or gw.max_request_tokens)


# One call takes every limited quantity of a request, or none of them.
# KEYS: per quantity its log (a sorted set; member "<id>:<n>", score the time it was taken),
#       then its running total (a string: the sum of n over the log).
# ARGV: now in seconds ("" for Redis's clock), the window in seconds, the member id, then per
#       quantity its limit and n.
# Returns 0 when all was taken, else the 1-based index of the first quantity over its limit.
# Cost: the entries that left the window since the last call, not the whole log.
_SLIDE = """
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local window = tonumber(ARGV[2])
local ttl = math.ceil(window * 1000) + 1000
local function weight(members)
  local w = 0
  for _, m in ipairs(members) do w = w + tonumber(string.match(m, ':(%d+)$')) end
  return w
end
local quantities = #KEYS / 2
local totals = {}
local refused = 0
for i = 1, quantities do
  local log, sum = KEYS[2 * i - 1], KEYS[2 * i]
  local limit, n = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  local expired = redis.call('ZRANGEBYSCORE', log, '-inf', now - window)
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', log, '-inf', now - window) end
  local total = 0
  if redis.call('ZCARD', log) > 0 then
    local kept = redis.call('GET', sum)
    if kept then
      total = tonumber(kept) - weight(expired)
    else  -- the total was lost (evicted): count the log again
      total = weight(redis.call('ZRANGE', log, 0, -1))
    end
  end
  totals[i] = total
  if refused == 0 and total + n > limit then refused = i end
end
for i = 1, quantities do
  local log, sum = KEYS[2 * i - 1], KEYS[2 * i]
  if refused == 0 then
    redis.call('ZADD', log, now, ARGV[3] .. ':' .. ARGV[3 + 2 * i])
    totals[i] = totals[i] + tonumber(ARGV[3 + 2 * i])
  end
  if redis.call('EXISTS', log) == 1 then
    redis.call('SET', sum, totals[i], 'PX', ttl)
    redis.call('PEXPIRE', log, ttl)
  else
    redis.call('DEL', sum)
  end
end
return refused
"""


class RateLimiter:
    """Per key: prompts per minute (a request of n prompts counts n) and tokens per minute
    (prompt tokens + max_tokens per prompt), over a sliding 60 s window that all gateway
    replicas share through Redis (the module's docstring says how). A refused request takes
    nothing from either budget."""

    def __init__(self, r, prefix: str, metrics=None, clock: Callable[[], float] | None = None,
                 window_s: float = 60.0):
        self.r, self.names, self.metrics, self.clock, self.window_s = r, Keys(prefix), metrics, clock, window_s
        self.script = r.register_script(_SLIDE)
        self.local: dict[str, deque[tuple[float, int]]] = {}  # the logs while Redis is unreachable
        self.local_totals: dict[str, int] = {}
        self.warned = False

    def _keys(self, what: str, name: str) -> tuple[str, str]:
        """The log and the running total of one API key's quantity."""
        return self.names.rate_log(what, name), self.names.rate_total(what, name)

    async def check(self, ident: Identity, prompts: int, tokens: int) -> None:
        """Take this request's prompts and tokens from the key's budgets, or raise the 429."""
        policy = ident.policy
        wanted = [(limit, n, what) for limit, n, what in ((policy.rate_limit_per_min, prompts, "prompts"),
                                                          (policy.tokens_per_min, tokens, "tokens"))
                  if limit is not None]
        if not wanted:  # an unlimited key costs no Redis call
            return
        now = self.clock() if self.clock is not None else None
        refused = await self._take([(self._keys(what, ident.name), limit, n) for limit, n, what in wanted], now)
        if refused:
            limit, n, what = wanted[refused - 1]
            if self.metrics is not None:
                self.metrics.refused.labels("rate_limit").inc()
            raise ApiError(429, f"rate limit of {limit} {what} per minute exceeded ({n} in this request)",
                           "rate_limit_error")

    async def _take(self, quantities: list[tuple[tuple[str, str], int, int]], now: float | None) -> int:
        keys = [k for (log_key, total_key), _, _ in quantities for k in (log_key, total_key)]
        args = ["" if now is None else repr(now), repr(self.window_s), uuid.uuid4().hex[:16]]
        for _, limit, n in quantities:
            args += [limit, n]
        try:
            refused = int(await self.script(keys=keys, args=args))
            self.warned = False
            return refused
        except (redis.RedisError, OSError) as exc:
            if not self.warned:
                log.warning("Redis unreachable (%s): rate limits are counted per gateway replica until it returns",
                            type(exc).__name__)
                self.warned = True
            return self._take_local(quantities, time.time() if now is None else now)

    def _take_local(self, quantities: list[tuple[tuple[str, str], int, int]], now: float) -> int:
        """The same sliding log, in this replica's memory."""
        totals = []
        for (key, _), _, _ in quantities:
            entries = self.local.get(key)
            total = self.local_totals.get(key, 0)
            while entries and entries[0][0] <= now - self.window_s:
                total -= entries.popleft()[1]
            totals.append(total)
        refused = next((i + 1 for i, ((_, limit, n), total) in enumerate(zip(quantities, totals))
                        if total + n > limit), 0)
        for ((key, _), _, n), total in zip(quantities, totals):
            if not refused:
                self.local.setdefault(key, deque()).append((now, n))
                total += n
            if self.local.get(key):
                self.local_totals[key] = total
            else:  # nothing left in the window: the key is forgotten
                self.local.pop(key, None)
                self.local_totals.pop(key, None)
        return refused


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
