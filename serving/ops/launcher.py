"""`shadowgate up` / `shadowgate down`: one machine's service, started in the foreground.

`up` starts what is missing (a redis-server with AOF when none answers at the configured
URL, or when the one that answers keeps nothing: see `redis.unpersisted`; a lean MLflow server on SQLite + local artifacts when none answers at the tracking URI, a
local Ray head unless an address is configured), registers a first predictor on an empty
registry, deploys the Serve app and waits until it is ready. It records what it started
(pids) in a state file; `down` stops exactly those, by signalling `up`, which tears down
in order (Serve, Ray, MLflow, Redis), and then by pid for anything left.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import redis

from monitor.redis_client import describe, redis_client
from serving.api.auth import key_file, with_keys
from serving.settings import Settings

log = logging.getLogger("shadowgate.up")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class LaunchError(RuntimeError):
    pass


def state_file(settings: Settings) -> Path:
    return settings.state_dir / "up.json"


def redis_answers(cfg) -> bool:
    """Whether a Redis answers at `cfg` (a URL or the settings' `redis` section, with its
    credentials). Wrong credentials are an error, not "nothing there"."""
    try:
        return bool(redis_client(cfg, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.AuthenticationError as exc:
        raise LaunchError(f"the Redis at {describe(cfg)} refused the configured credentials: {exc}") from None
    except redis.ResponseError as exc:  # NOAUTH: a password is needed and none is configured
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            raise LaunchError(f"the Redis at {describe(cfg)} needs a password (redis.password)") from None
        return False
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def redis_persists(cfg) -> bool | None:
    """Whether that Redis keeps its data across a restart (AOF on, or RDB saves configured);
    None when it does not say (CONFIG is often disabled on managed Redis)."""
    try:
        client = redis_client(cfg, socket_connect_timeout=1, socket_timeout=2)
        aof = client.config_get("appendonly").get("appendonly")
        save = client.config_get("save").get("save")
    except redis.RedisError:
        return None
    return aof == "yes" or bool((save or "").strip())


def mlflow_answers(uri: str) -> bool:
    try:
        return httpx.get(uri.rstrip("/") + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(check, what: str, timeout: float, proc: subprocess.Popen | None = None, log_path: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            hint = f"; see {log_path}" if log_path else ""
            raise LaunchError(f"{what} exited with code {proc.returncode} before it came up{hint}")
        time.sleep(0.3)
    hint = f"; see {log_path}" if log_path else ""
    raise LaunchError(f"{what} did not come up within {timeout:.0f} s{hint}")


def _spawn(cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab")
    # own session: `down` signals exactly this process group, nothing else
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=True)


def start_redis(settings: Settings) -> subprocess.Popen | None:
    """A redis-server at `redis.url` unless one answers there (then None)."""
    url = settings.redis.url
    if redis_answers(settings.redis):
        log.info("Redis answers at %s: using it", describe(url))
        return None
    parts = urlparse(url)
    if not settings.redis.start_local or parts.hostname not in LOCAL_HOSTS:
        raise LaunchError(f"no Redis answers at {describe(url)} and starting one there is not configured")
    return _spawn_redis(settings, parts.hostname, parts.port or 6379)


def _spawn_redis(settings: Settings, host: str, port: int) -> subprocess.Popen:
    exe = shutil.which("redis-server")
    if exe is None:
        raise LaunchError("redis-server is not installed: `apt-get install -y redis-server` (or point "
                          "SHADOWGATE_REDIS__URL at a running Redis)")
    folder = (settings.state_dir / "redis").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    # append-only file, written and fsynced before the replies of each event-loop turn go out:
    # control state, samples and alerts survive a restart, and a killed process (or a power
    # cut) loses nothing it acknowledged. Under `everysec` Redis postpones the write while the
    # previous second's fsync is still running and replies anyway: a SIGKILL then lost an
    # acknowledged alert (docs/RELIABILITY.md). `always` costs a few ms per write on a busy disk.
    # The settings go in a file only the owner reads: a password never shows in `ps`.
    conf = folder / "redis.conf"
    lines = [f"bind {host}", f"port {port}", f"dir {folder}", "appendonly yes", "appendfsync always",
             'save ""']
    if settings.redis.password is not None:
        user = settings.redis.username
        secret = settings.redis.password.get_secret_value()
        if user and user != "default":  # an ACL user, and no way in without it
            lines += [f"user {user} on >{secret} ~* &* +@all", "user default off"]
        else:
            lines.append(f"requirepass {secret}")
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o600)
    logf = settings.state_dir / "logs" / "redis.log"
    proc = _spawn([exe, str(conf)], logf)
    url = f"redis://{host}:{port}/{urlparse(settings.redis.url).path.lstrip('/') or 0}"
    cfg = settings.redis.model_copy(update={"url": url})
    _wait(lambda: redis_answers(cfg), "redis-server", 20, proc, logf)
    log.info("started redis-server (pid %d) at %s with AOF in %s", proc.pid, describe(url), folder)
    return proc


def own_redis(settings: Settings) -> tuple[Settings, subprocess.Popen | None, str | None]:
    """What `up` connects to: the Redis at `redis.url`, or one of its own.

    When the one that answers keeps nothing (no AOF, no saves: a kill loses the control
    state, samples and alerts), `redis.unpersisted` decides: "own" starts a redis-server with
    AOF under state_dir on the next free port and returns settings that point at it; "use"
    uses it with a warning; "refuse" stops. Returns (settings, process started, a note)."""
    proc = start_redis(settings)
    if proc is not None:
        return settings, proc, None
    if redis_persists(settings.redis) is not False:
        return settings, None, None
    url, policy = settings.redis.url, settings.redis.unpersisted
    parts = urlparse(url)
    what = f"the Redis at {describe(url)} has no persistence (no AOF, no saves)"
    if policy == "refuse":
        raise LaunchError(f"{what}: a restart would lose the control state, samples and alerts. Turn on "
                          "AOF there, or set redis.unpersisted to 'own' or 'use'")
    if policy == "use" or parts.hostname not in LOCAL_HOSTS or not settings.redis.start_local:
        log.warning("%s: using it anyway (redis.unpersisted=%s)", what, policy)
        return settings, None, f"warning: {what}; a restart loses the control state, samples and alerts"
    port = _own_redis_port(settings, parts.port or 6379)
    proc = _spawn_redis(settings, parts.hostname, port)
    new = settings.model_copy(update={"redis": settings.redis.model_copy(update={
        "url": f"redis://{parts.hostname}:{port}/{parts.path.lstrip('/') or 0}"})})
    return new, proc, (f"Redis: {what}; started our own with AOF at {describe(new.redis.url)} "
                       f"(redis.unpersisted=own; commands that read Redis directly need "
                       f"SHADOWGATE_REDIS__URL={describe(new.redis.url)})")


def _own_redis_port(settings: Settings, taken: int) -> int:
    """The port used last time (kept beside the data), else the first free one above `taken`."""
    import socket

    record = settings.state_dir / "redis" / "port"

    def free(port: int) -> bool:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return True
            except OSError:
                return False

    if record.exists() and free(int(record.read_text())):
        return int(record.read_text())
    port = next(p for p in range(taken + 1, taken + 200) if free(p))
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(str(port))
    return port


def webhook_key(folder: Path) -> str:
    """A fixed key for the webhook secrets the server stores (a new one per start would make
    the stored webhooks unreadable): made once, kept beside the database, owner-only."""
    import base64

    path = folder / "webhook.key"
    if not path.exists():
        path.write_bytes(base64.urlsafe_b64encode(os.urandom(32)))
        path.chmod(0o600)
    return path.read_text().strip()


def start_mlflow(settings: Settings) -> subprocess.Popen | None:
    uri = settings.mlflow.tracking_uri
    if not uri.startswith("http"):
        return None  # a local store (sqlite:///, file paths): no server needed
    if mlflow_answers(uri):
        log.info("MLflow answers at %s: using it", uri)
        return None
    parts = urlparse(uri)
    if not settings.mlflow.start_local or parts.hostname not in LOCAL_HOSTS:
        raise LaunchError(f"no MLflow server answers at {uri} and starting one there is not configured")
    folder = (settings.state_dir / "mlflow").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    logf = settings.state_dir / "logs" / "mlflow.log"
    proc = _spawn([sys.executable, "-m", "mlflow", "server", "--host", parts.hostname,
                   "--port", str(parts.port or 5000), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                   "--artifacts-destination", str(folder / "artifacts")], logf,
                  env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                       # registry webhooks (approvals) delivered to this service on localhost
                       "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                       "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": webhook_key(folder)})
    _wait(lambda: mlflow_answers(uri), "MLflow server", 120, proc, logf)
    log.info("started MLflow server (pid %d) at %s", proc.pid, uri)
    return proc


def start_ray(settings: Settings) -> str | None:
    import ray

    if settings.ray.address:
        ray.init(address=settings.ray.address, log_to_driver=True)
        return None
    # a single-user local head: Ray 2.60's token auth needs a token file it does not write
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # address="local": a new head of our own, never one that happens to run here already
    ctx = ray.init(address="local", num_cpus=settings.ray.num_cpus, include_dashboard=settings.ray.dashboard,
                   object_store_memory=settings.ray.object_store_mb << 20)
    return getattr(ctx, "dashboard_url", None) or None


def bootstrap_registry(settings: Settings) -> str:
    from adapter.runtime.loading import load
    from jobs.bootstrap import ensure_champion
    from jobs.registry import RegistryAuthError, registry_for

    registry = registry_for(settings)
    try:
        champion = registry.resolve("champion")
    except RegistryAuthError as exc:  # wrong credentials: say so before anything is deployed
        raise LaunchError(str(exc)) from None
    if champion is not None:
        return champion
    loaded = load(settings.model.name, settings.runtime.model_copy(update={"dtype": "float32"}))
    return ensure_champion(registry, settings.model.name, loaded, settings.mlflow.bootstrap_per_family,
                           settings.mlflow.bootstrap_epochs, settings.mlflow.reference_per_family)


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop()


def with_running_redis(settings: Settings) -> Settings:
    """The settings a command beside a running `shadowgate up` should read Redis with: when
    that `up` started a redis-server of its own (the configured one keeps nothing, see
    `redis.unpersisted`), the URL of that one, else `settings` as they are. A Redis that `up`
    started has no password, so the recorded URL is whole."""
    path = state_file(settings)
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return settings
    url = state.get("redis")
    if not _alive(state.get("pid")) or "redis" not in state.get("children", {}) or not url \
            or url == describe(settings.redis.url):
        return settings
    return settings.model_copy(update={"redis": settings.redis.model_copy(update={"url": url})})


def up(settings: Settings, say=print) -> None:
    """Start everything that is missing and serve until interrupted (Ctrl-C or `down`)."""
    path = state_file(settings)
    if path.exists():
        old = json.loads(path.read_text())
        if _alive(old.get("pid")):
            raise LaunchError(f"shadowgate is already up (pid {old['pid']}); run `shadowgate down` first")
        path.unlink()
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings, notes = with_keys(settings)
    started: dict[str, int] = {}
    procs: list[tuple[str, subprocess.Popen]] = []
    ray_started = False

    def record():
        path.write_text(json.dumps({"pid": os.getpid(), "children": started, "ray_local": ray_started,
                                    "api": f"http://{settings.host}:{settings.port}",
                                    "redis": describe(settings.redis.url)}, indent=2))

    signal.signal(signal.SIGTERM, _raise_stop)
    record()
    try:
        settings, redis_proc, note = own_redis(settings)
        if note:
            notes.append(note)
        for name, start in (("redis", lambda: redis_proc), ("mlflow", lambda: start_mlflow(settings))):
            proc = start()
            if proc is not None:
                procs.append((name, proc))
                started[name] = proc.pid
                record()
        dashboard = start_ray(settings)
        ray_started = settings.ray.address is None
        signal.signal(signal.SIGTERM, _raise_stop)  # ray.init installs its own, which exits at once
        record()
        version = bootstrap_registry(settings)
        log.info("predictor champion: %s version %s", settings.mlflow.registered_model, version)
        from serving.app import deploy

        deploy(settings)
        api = f"http://{settings.host}:{settings.port}"
        _wait(lambda: _ready(api), "the Serve app", 300)
        say(f"shadowgate is up\n  API:        {api}/v1  (health {api}/healthz, ready {api}/readyz, "
            f"metrics {api}/metrics with the admin key)\n  MLflow UI:  {settings.mlflow.tracking_uri}")
        if dashboard:
            say(f"  Ray dashboard: http://{dashboard}")
        for note in notes:
            say(f"  {note}")
        bearer = (f"$(cat {key_file(settings, 'api')})" if any(n.startswith("API key") for n in notes)
                  else "$YOUR_API_KEY")
        say(f"  try: curl -s {api}/v1/completions -H \"Authorization: Bearer {bearer}\" "
            "-H 'Content-Type: application/json' "
            "-d '{\"prompt\": \"3 + 4 = 7 ; 2 + 2 =\", \"max_tokens\": 4, \"temperature\": 0}'")
        say("  stop with Ctrl-C or `shadowgate down`")
        while True:
            time.sleep(1)
    except (KeyboardInterrupt, _Stop):
        say("shutting down")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _teardown(ray_started, procs)
        path.unlink(missing_ok=True)


def _ready(api: str) -> bool:
    try:
        return httpx.get(api + "/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _teardown(ray_started: bool, procs: list[tuple[str, subprocess.Popen]]) -> None:
    try:
        import ray
        from ray import serve

        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    except Exception:
        log.exception("Ray shutdown failed")
    for name, proc in reversed(procs):
        _stop_group(proc.pid)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            _stop_group(proc.pid, signal.SIGKILL)
        log.info("stopped %s (pid %d)", name, proc.pid)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop_group(pid: int, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(pid, sig)  # the child was started in its own session: pgid == pid
    except ProcessLookupError:
        pass


def down(settings: Settings, timeout: float = 90, say=print) -> bool:
    """Stop what `up` started; False when nothing was up."""
    path = state_file(settings)
    if not path.exists():
        say(f"nothing to stop: no state file at {path}")
        return False
    state = json.loads(path.read_text())
    pid = state.get("pid")
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + timeout
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.5)
    for name, child in state.get("children", {}).items():  # `up` died without cleaning up
        if _alive(child):
            _stop_group(child)
            say(f"stopped {name} (pid {child})")
    path.unlink(missing_ok=True)
    say(f"stopped shadowgate (pid {pid})")
    return True
