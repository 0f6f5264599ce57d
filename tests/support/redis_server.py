"""A redis-server of the tests' own on a free port (the machine's shared one on 6379 is never
touched): started, SIGKILLed (a crash) or stopped, and started again on the same port and
folder, so that only what it persisted comes back."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Callable

import pytest
import redis

from tests.support.poll import wait_until
from tests.support.ports import free_port


class RedisServer:
    """`aof`: append-only file (fsync every second; a SIGKILLed server loses no write it
    acknowledged, the kernel holds it), else no persistence at all. `extra`: more
    redis-server arguments; a later one wins (`--port 0 --tls-port N` for TLS only)."""

    def __init__(self, folder: Path, aof: bool = False, extra: tuple[str, ...] = (), port: int | None = None):
        self.folder, self.aof, self.extra = Path(folder), aof, tuple(extra)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, ready: Callable[[], object] | None = None, timeout: float = 20.0) -> "RedisServer":
        """Start it and wait until `ready()` (default: a PING) answers."""
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed: `apt-get install -y redis-server` (`make redis`)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes" if self.aof else "no", "--dir", str(self.folder),
                                      *self.extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(ready or self.ping, timeout, interval=0.05, what=f"redis-server on port {self.port}",
                   proc=self.proc, ignore=(redis.ConnectionError,))
        return self

    def ping(self) -> bool:
        with redis.Redis.from_url(self.url, socket_timeout=2) as client:
            return client.ping()

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)

    def kill(self) -> None:
        """SIGKILL: nothing flushed on the way out."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def __enter__(self) -> "RedisServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
