"""A lean MLflow server on a free port (`--workers 1`, no job runner, no telemetry: about 5 s
to healthy), with registry webhooks to http receivers on localhost allowed and a fixed key
for the stored webhook secrets (a new key per start would make them unreadable)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.poll import wait_until
from tests.support.ports import free_port

WEBHOOK_KEY = "aGVsbG8taGVsbG8taGVsbG8taGVsbG8taGVsbG8tISE="


@dataclass
class MlflowServer:
    uri: str
    proc: subprocess.Popen
    log: Path

    def healthy(self) -> bool:
        return httpx.get(f"{self.uri}/health", timeout=2).status_code == 200

    def stop(self) -> None:
        """SIGTERM to its process group (gunicorn/uvicorn workers included)."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        self.proc.wait(30)

    def __enter__(self) -> "MlflowServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_mlflow(folder: Path, store_uri: str | None = None, args: tuple[str, ...] = (), env: dict | None = None,
                 timeout: float = 120.0) -> MlflowServer:
    """A server whose store is `store_uri` (default: SQLite in `folder`), artifacts and log in
    `folder`; `args` and `env` add server arguments and environment (the basic-auth app:
    ("--app-name", "basic-auth") and MLFLOW_AUTH_CONFIG_PATH). Returns once /health answers
    (AssertionError with the log tail if it does not)."""
    folder.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), folder / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": WEBHOOK_KEY, **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1",
                             "--backend-store-uri", store_uri or f"sqlite:///{folder}/mlflow.db",
                             "--artifacts-destination", str(folder / "artifacts")],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_until(server.healthy, timeout, interval=0.5, what="the MLflow server", proc=proc,
                   ignore=(httpx.HTTPError,), detail=lambda: log.read_text()[-3000:])
    except AssertionError:
        server.stop()
        raise
    return server
