"""`shadowgate up` / `shadowgate down` as an operator runs them: a fresh state directory, no
keys configured, nothing answering at the configured Redis and MLflow addresses."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import httpx
import pytest

from tests.support import free_port, shadowgate, spawn_shadowgate, wait_until

pytestmark = pytest.mark.service


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


# 150 s on 2 cores (a whole `shadowgate up`: Redis, MLflow, Ray, bootstrap, Serve): in
# `make test-extended` (CI runs both), keeping the default run inside its time budget
@pytest.mark.slow
def test_up_starts_what_is_missing_and_down_stops_exactly_that(tiny_model_dir, tmp_path):
    port, redis_port, mlflow_port = free_port(), free_port(), free_port()
    env = {"SHADOWGATE_STATE_DIR": str(tmp_path / "state"),
           "SHADOWGATE_PORT": str(port), "SHADOWGATE_REDIS__URL": f"redis://127.0.0.1:{redis_port}/0",
           "SHADOWGATE_MLFLOW__TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
           "SHADOWGATE_MODEL__NAME": str(tiny_model_dir), "SHADOWGATE_RUNTIME__THREADS": "1",
           "SHADOWGATE_MLFLOW__BOOTSTRAP_PER_FAMILY": "4", "SHADOWGATE_MLFLOW__BOOTSTRAP_EPOCHS": "2",
           "SHADOWGATE_API_KEYS": None, "SHADOWGATE_ADMIN_KEY": None}  # no keys configured
    log = tmp_path / "up.log"
    proc = spawn_shadowgate("up", log=log, env=env)
    state = tmp_path / "state"
    try:
        wait_until(lambda: "shadowgate is up" in log.read_text(), 420, interval=1, what="shadowgate up", proc=proc,
                   detail=lambda: log.read_text()[-3000:])
        out = log.read_text()
        key_path = state / "api_key"
        assert f"API key created: {key_path}" in out and "try: curl" in out
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        key = key_path.read_text().strip()
        assert key not in out  # the secret itself is never printed
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       headers={"Authorization": f"Bearer {key}"},
                       json={"prompt": "3 + 4 = 7 ; 2 + 2 =", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["shadowgate"]["predictor_version"] == "1"  # bootstrapped champion
        started = json.loads((state / "up.json").read_text())
        assert set(started["children"]) == {"redis", "mlflow"}
        down = shadowgate("down", env=env, timeout=180)
        assert down.returncode == 0, down.stderr
        proc.wait(60)
        for pid in [started["pid"], *started["children"].values()]:
            assert not alive(pid)
        assert not (state / "up.json").exists()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
