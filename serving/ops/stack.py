"""A private, complete service on free local ports, for benchmarks and end-to-end tests: its
own redis-server (AOF), a lean MLflow server, a local Ray head and the Serve app, started
with the launcher's own functions and torn down in order."""

from __future__ import annotations

import os
import random
import secrets
import signal
import socket
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from serving.settings import Settings, load_settings


# Ports for the stack's servers, below Linux's ephemeral range (32768-60999): a port the
# kernel hands out (bind to 0) is also what any outgoing connection may take as its local
# port, so a server that binds it seconds later (MLflow starts in about 7 s) could find it
# taken; and above Ray's default worker ports (10002-19999).
PORTS = range(20000, 32768)


def free_port() -> int:
    """A local port nothing listens on or is connected from now, outside the ephemeral range."""
    for port in random.sample(PORTS, 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free local port in {PORTS.start}-{PORTS.stop - 1}")


@dataclass
class Stack:
    settings: Settings
    base: str
    api_key: str
    admin_key: str
    procs: dict[str, subprocess.Popen]
    champion: str

    def client(self, admin: bool = False, timeout: float = 60) -> httpx.Client:
        key = self.admin_key if admin else self.api_key
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

    def registry(self):
        from jobs.registry import registry_for

        return registry_for(self.settings)

    def restart_mlflow(self) -> None:
        from serving.ops.launcher import start_mlflow

        self.procs["mlflow"] = start_mlflow(self.settings)

    def stop(self, name: str) -> None:
        from serving.ops.launcher import _stop_group

        proc = self.procs.pop(name)
        _stop_group(proc.pid)
        proc.wait(30)

    def kill(self, name: str) -> None:
        """SIGKILL one of the stack's processes (a crash, not a shutdown)."""
        from serving.ops.launcher import _stop_group

        proc = self.procs.pop(name)
        _stop_group(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def restart_redis(self) -> None:
        """The same redis-server again: same port, same folder, its AOF replayed."""
        from serving.ops.launcher import start_redis

        self.procs["redis"] = start_redis(self.settings)

    def redis(self):
        from monitor.redis_client import redis_client

        return redis_client(self.settings.redis)


@contextmanager
def private_stack(work: Path, **overrides) -> Iterator[Stack]:
    """Start everything on free ports under `work`; `overrides` are Settings fields."""
    import ray

    from serving.app import deploy
    from serving.ops.launcher import _ready, _teardown, _wait, bootstrap_registry, start_mlflow, start_redis

    api_key, admin_key = "sg-" + secrets.token_urlsafe(16), "sg-admin-" + secrets.token_urlsafe(16)
    base_overrides = {"state_dir": work / "state", "port": free_port(),
                      "redis": {"url": f"redis://127.0.0.1:{free_port()}/0"},
                      "mlflow": {"tracking_uri": f"http://127.0.0.1:{free_port()}"},
                      "api_keys": [{"key": api_key, "name": "bench"}], "admin_key": admin_key}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base_overrides.get(key), dict):
            base_overrides[key] = {**base_overrides[key], **value}
        else:
            base_overrides[key] = value
    settings = load_settings(None, **base_overrides)
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["redis"] = start_redis(settings)
        procs["mlflow"] = start_mlflow(settings)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=settings.ray.num_cpus, include_dashboard=False,
                 object_store_memory=settings.ray.object_store_mb << 20, log_to_driver=False)
        champion = bootstrap_registry(settings)
        deploy(settings)
        base = f"http://{settings.host}:{settings.port}"
        _wait(lambda: _ready(base), "the Serve app", 300)
        yield Stack(settings, base, api_key, admin_key, procs, champion)
    finally:
        _teardown(ray.is_initialized(), [(n, p) for n, p in procs.items() if p is not None])
