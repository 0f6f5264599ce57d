"""MLflow basic-auth credentials from settings reach the server with every registry call (a
real MLflow client against a real HTTP server that demands them), and a refusal is not
retried as if the server were down."""

from __future__ import annotations

import base64
import json
import time

import pytest

from jobs.registry import PredictorRegistry, RegistryError, Retry, registry_for
from serving.settings import load_settings
from tests.support import Receiver

USER, PASSWORD = "jobs", "mlflow-Pa55-for-tests"


@pytest.fixture
def guarded():
    seen = {"authorized": 0, "refused": 0}
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def guard(req):
        if req["headers"].get("authorization") != expected:
            seen["refused"] += 1
            return 401, {"content-type": "application/json"}, \
                b'{"error_code": "UNAUTHENTICATED", "message": "credentials required"}'
        seen["authorized"] += 1
        body = {"registered_model": {"name": "m", "aliases": [{"alias": "champion", "version": "3"}]}}
        return 200, {"content-type": "application/json"}, json.dumps(body).encode()

    with Receiver(respond=guard) as server:
        yield server.url, seen


def test_basic_auth_from_settings(guarded, monkeypatch):
    uri, seen = guarded
    # whatever the registry sets in this process is undone after the test
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    anonymous = PredictorRegistry(uri, "m", retry=Retry(5, 0.5, 1.0))
    t0 = time.monotonic()
    with pytest.raises(RegistryError, match=r"requires credentials \(401 unauthenticated\): set mlflow.username"):
        anonymous.aliases()
    # a refusal: asked once, no backoff
    assert time.monotonic() - t0 < 0.5 and seen == {"authorized": 0, "refused": 1}
    s = load_settings(None, mlflow={"tracking_uri": uri, "registered_model": "m", "username": USER,
                                    "password": PASSWORD})
    assert PASSWORD not in repr(s.mlflow)
    registry = registry_for(s, retry=Retry(5, 0.5, 1.0))
    assert registry.aliases() == {"champion": "3"} and seen["authorized"] == 1
