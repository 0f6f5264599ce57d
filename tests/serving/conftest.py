"""Fixtures of the serving tests: a tiny model saved like a user's checkpoint, a private
redis-server on a free port, an MLflow registry (a real SQLite store) with a trained
predictor registered as 'champion'."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from serving.ops.stack import free_port  # noqa: F401  (tests import it from here)


def save_tiny_model(folder: Path) -> Path:
    """A small Llama (GQA) with the embedded word-level tokenizer, saved with save_pretrained."""
    from adapter.embedded.recipe import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A clean redis-server of our own (the machine's shared one is left alone)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: `apt-get install -y redis-server` (see Makefile)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield url
    client.close()
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory) -> str:
    """An MLflow tracking + registry store (SQLite, local artifacts), used in process."""
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder}/mlflow.db"
