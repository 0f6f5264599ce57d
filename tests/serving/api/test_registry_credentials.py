"""The service against an MLflow server that demands basic auth (`mlflow server --app-name
basic-auth`): with the credentials in settings, every part that reads the registry sends them
(registry_for), so a completion is served by the champion version and the admin API can
approve a version; with a wrong password, startup fails before anything is deployed, with a
message that names the problem and the user, never the password."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time

import httpx
import pytest

from serving.ops.launcher import LaunchError
from serving.ops.stack import free_port, private_stack

pytestmark = pytest.mark.service
USER = "shadowgate-svc"
PASSWORD = "mlflow-Pa55-" + secrets.token_hex(6)
PROMPT = "3 + 4 = 7 ; 2 + 2 = 4 ; 1 + 5 ="


@pytest.fixture(scope="module")
def basic_auth_mlflow(tmp_path_factory):
    """A lean MLflow server with the basic-auth app; its admin user is the service's."""
    work = tmp_path_factory.mktemp("mlflow-basic-auth")
    (work / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{work}/auth.db\n"
        f"admin_username = {USER}\nadmin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(work / "auth.ini"),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(work / "server.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                 "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
                                 "--artifacts-destination", str(work / "artifacts")],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(uri + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"the basic-auth MLflow server did not start: {(work / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    # the server demands credentials: an anonymous registry call is refused
    assert httpx.get(uri + "/api/2.0/mlflow/registered-models/search").status_code == 401
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


@pytest.fixture
def no_ambient_credentials(monkeypatch):
    """Nothing in this process's environment sends credentials (and whatever registry_for sets
    here is undone after the test): each Serve replica must send its own, from settings."""
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)


def overrides(uri: str, model_dir, password: str) -> dict:
    return {"model": {"name": str(model_dir)}, "runtime": {"threads": 1}, "monitor": {"enabled": False},
            "mlflow": {"tracking_uri": uri, "username": USER, "password": password, "bootstrap_per_family": 4,
                       "bootstrap_epochs": 3, "reference_per_family": 20},
            "serve": {"replica_cpus": 0.1, "reconcile_s": 1.0, "defaults": {"shadow_rate": 0.0, "sparsity": 0.5}}}


def test_wrong_credentials_stop_startup_with_a_clear_message(basic_auth_mlflow, tiny_model_dir, tmp_path,
                                                             no_ambient_credentials, caplog):
    wrong = "not-the-" + PASSWORD
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO), pytest.raises(LaunchError) as failed:
        with private_stack(tmp_path / "stack", **overrides(basic_auth_mlflow, tiny_model_dir, wrong)):
            pytest.fail("the service started with a wrong MLflow password")
    message = str(failed.value)
    assert message == (f"the MLflow server at {basic_auth_mlflow} refused the credentials of user {USER!r} "
                       "(401 unauthenticated): check mlflow.username and mlflow.password")
    assert wrong not in caplog.text and PASSWORD not in caplog.text
    assert time.monotonic() - t0 < 120  # a refusal is not retried as if the server were down


def test_the_champion_serves_when_the_service_has_the_credentials(basic_auth_mlflow, tiny_model_dir, tmp_path,
                                                                   no_ambient_credentials):
    with private_stack(tmp_path / "stack", **overrides(basic_auth_mlflow, tiny_model_dir, PASSWORD)) as st:
        assert st.champion is not None
        assert httpx.get(st.base + "/readyz", timeout=30).json()["llm"]["champion"] == st.champion
        with st.client() as client, st.client(admin=True) as admin:
            r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200, r.text
            ext = r.json()["shadowgate"]
            # GatedLLM read the champion from the registry (without credentials it serves dense)
            assert (ext["predictor_version"], ext["arm"], ext["sparsity"]) == (st.champion, "champion", 0.5)
            assert "fallback_reason" not in ext
            # the gateway's own registry (version checks, the approved alias) sends them too
            r = admin.post(f"/admin/rollout/approve/{st.champion}")
            assert r.status_code == 200, r.text
            assert r.json() == {"version": st.champion, "alias": "approved"}
        assert st.registry().aliases()["approved"] == st.champion
