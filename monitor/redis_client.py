"""The one place Redis clients are made: URL, AUTH (username/password) and TLS from settings.

Every component connects through `redis_client` / `async_redis_client`, so a Redis with
`requirepass` or ACL users, or one reached over TLS, needs only settings (`redis.*`), never a
change of code. It lives here, below serving/ (as monitor/state.py does), because the monitor
and the jobs connect too.

`cfg` is either a URL (a credential or `rediss://` in it works too) or an object with the
fields of serving.settings.RedisSettings: url, username, password (a SecretStr), tls,
ssl_ca_certs, ssl_certfile, ssl_keyfile. Secrets stay in SecretStr until the connection is
made and never appear in what `describe` returns (the form for logs).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse, urlunparse

import redis
import redis.asyncio as aioredis


def _secret(value) -> str | None:
    if value is None:
        return None
    return value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)


def connection_options(cfg: Any, blocking: bool = False, **overrides) -> tuple[str, dict]:
    """(url, keyword arguments of from_url). `blocking`: no socket timeout, for blocking
    reads (XREADGROUP BLOCK, pub/sub) that outlast redis-py's default of 5 s."""
    if isinstance(cfg, str):
        url, kwargs = cfg, {}
    else:
        url, kwargs = cfg.url, {}
        if getattr(cfg, "username", None):
            kwargs["username"] = cfg.username
        password = _secret(getattr(cfg, "password", None))
        if password:
            kwargs["password"] = password
        if getattr(cfg, "tls", False):
            parts = urlparse(url)
            if parts.scheme == "redis":
                url = urlunparse(parts._replace(scheme="rediss"))
            for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
                if getattr(cfg, name, None):
                    kwargs[name] = str(getattr(cfg, name))
            kwargs["ssl_cert_reqs"] = "required"
    if blocking:
        kwargs["socket_timeout"] = None
    kwargs.update(overrides)
    return url, kwargs


def redis_client(cfg: Any, blocking: bool = False, **overrides) -> redis.Redis:
    url, kwargs = connection_options(cfg, blocking, **overrides)
    return redis.Redis.from_url(url, **kwargs)


def async_redis_client(cfg: Any, blocking: bool = False, **overrides) -> aioredis.Redis:
    url, kwargs = connection_options(cfg, blocking, **overrides)
    return aioredis.from_url(url, **kwargs)


def describe(cfg: Any) -> str:
    """The URL for logs and errors: any password in it replaced by ***."""
    url = cfg if isinstance(cfg, str) else cfg.url
    parts = urlparse(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        url = urlunparse(parts._replace(netloc=netloc))
    return url
