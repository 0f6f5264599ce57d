"""MLflow basic-auth credentials from settings reach the server with every registry call (a
real MLflow client against a real HTTP server that demands them), and a refusal is not
retried as if the server were down."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs.registry import PredictorRegistry, RegistryError, Retry
from serving.settings import load_settings
from serving.ops.stack import free_port

USER, PASSWORD = "jobs", "mlflow-Pa55-for-tests"


@pytest.fixture
def guarded():
    seen = {"authorized": 0, "refused": 0}
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    class Guarded(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.headers.get("authorization") != expected:
                seen["refused"] += 1
                self.send_response(401)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"error_code": "UNAUTHENTICATED", "message": "credentials required"}')
                return
            seen["authorized"] += 1
            body = {"registered_model": {"name": "m", "aliases": [{"alias": "champion", "version": "3"}]}}
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Guarded)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_basic_auth_from_settings(guarded, monkeypatch):
    uri, seen = guarded
    # whatever the registry sets in this process is undone after the test
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    anonymous = PredictorRegistry(uri, "m", retry=Retry(5, 0.5, 1.0))
    t0 = time.monotonic()
    with pytest.raises(RegistryError):
        anonymous.aliases()
    assert time.monotonic() - t0 < 0.5 and seen["authorized"] == 0  # a refusal: no backoff
    s = load_settings(None, mlflow={"tracking_uri": uri, "registered_model": "m", "username": USER,
                                    "password": PASSWORD})
    assert PASSWORD not in repr(s.mlflow)
    registry = PredictorRegistry.from_settings(s.mlflow, retry=Retry(5, 0.5, 1.0))
    assert registry.aliases() == {"champion": "3"} and seen["authorized"] == 1
