"""What many tests need, written once: free ports, waiting for a condition, a redis-server
and an MLflow server of the tests' own, a local HTTP receiver, the `shadowgate` CLI as a
subprocess, the Serve app in process, and tiny models. The fixtures built on these are in
tests/conftest.py."""

from tests.support.cli import SHADOWGATE, operator_cli, shadowgate, spawn_shadowgate
from tests.support.http_receiver import Receiver
from tests.support.mlflow_server import MlflowServer, start_mlflow
from tests.support.models import save_tiny_model, tiny_llama, tiny_opt
from tests.support.poll import until, wait_until
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer
from tests.support.service import put_state, serve_app

__all__ = ["SHADOWGATE", "MlflowServer", "Receiver", "RedisServer", "free_port", "operator_cli", "put_state",
           "save_tiny_model", "serve_app", "shadowgate", "spawn_shadowgate", "start_mlflow", "tiny_llama",
           "tiny_opt", "until", "wait_until"]
