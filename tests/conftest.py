"""Fixtures for every test package: tiny models, and the services the tests start for
themselves (a redis-server on a free port, an MLflow store or server), each with the scope
that keeps the tests independent and the run short."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support import RedisServer, save_tiny_model, start_mlflow, tiny_llama, tiny_opt

torch.set_num_threads(2)


@pytest.fixture(params=["llama-gqa", "llama-mha", "opt"])
def tiny_model(request):
    if request.param == "llama-gqa":
        return tiny_llama(kv_heads=2)
    if request.param == "llama-mha":
        return tiny_llama(kv_heads=8)
    return tiny_opt()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved with save_pretrained, as a user's checkpoint."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A clean redis-server of our own per module, no persistence (the machine's shared one
    is left alone)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory) -> str:
    """An MLflow tracking + registry store (SQLite, local artifacts), used in process."""
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder}/mlflow.db"


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """A real MLflow server on a free port (SQLite store), for what needs HTTP: the UI,
    webhooks, several processes."""
    with start_mlflow(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server.uri
