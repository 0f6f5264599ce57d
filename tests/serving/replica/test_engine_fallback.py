"""A replica whose champion cannot be had serves dense and says so; a fallback never needs
MLflow (the Engine, without Ray, against a dead MLflow address and a mismatched artifact)."""

from __future__ import annotations

import json

import pytest
import torch

from adapter.selection import predictors as P
from adapter.runtime.gated import SamplingParams
from jobs.registry import PredictorRegistry
from monitor.state import ControlState
from serving.replica.control import canary_arm
from serving.replica.engine import Engine, GenRequest
from serving.settings import load_settings
from tests.support import free_port

PROMPT = "3 + 4 = 7 ; 2 + 2 = 4 ; 1 + 5 ="


def dense_tokens(engine: Engine, prompt: str, n: int) -> list[int]:
    ids = engine.prompt_ids(prompt)
    return engine.runtime.generate([ids], P.Dense(), n, SamplingParams(), engine.stop_ids)[0].token_ids


@pytest.fixture(scope="module")
def settings(tiny_model_dir):
    return load_settings(None, model={"name": str(tiny_model_dir)}, runtime={"threads": 1})


def test_mlflow_down_at_start_serves_dense_and_says_why(settings, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    engine = Engine(settings, PredictorRegistry(f"http://127.0.0.1:{free_port()}", "p", tmp_path))
    problem = engine.apply(ControlState(sparsity=0.5))
    assert problem and "unavailable" in problem
    res = engine.complete(GenRequest("r1", PROMPT, max_tokens=4, temperature=0.0))
    assert res.arm == "dense" and res.version is None and res.fallback == "dense"
    assert "unavailable" in res.fallback_reason
    assert res.token_ids == dense_tokens(engine, PROMPT, 4)
    # a fallback (or any state) applies without MLflow: nothing raises
    assert engine.apply(ControlState(generation=2, fallback="dense"))
    assert engine.complete(GenRequest("r2", PROMPT, max_tokens=2, temperature=0.0)).fallback == "dense"


def test_a_mismatched_champion_artifact_is_refused_at_load_and_dense_is_served(settings, tmp_path):
    from adapter.runtime.loading import load

    registry = PredictorRegistry(f"sqlite:///{tmp_path}/mlflow.db", "p", tmp_path / "cache")
    loaded = load(settings.model.name, settings.runtime)
    src = tmp_path / "pred"
    src.mkdir()
    module = P.random_unified(loaded.runtime.shape, 16)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(src / "predictor.safetensors"))
    (src / "predictor.json").write_text(json.dumps({
        "kind": "shadowllm", "criterion": "plainact", "model_fingerprint": "someone-elses-model",
        "shape": loaded.runtime.shape.as_dict(), "sizes": {"hidden": 16, "neuron_rank": 0}}))
    (src / "reference").mkdir()
    (src / "reference" / "features.parquet").write_bytes(b"not parquet")
    (src / "reference" / "basis.safetensors").write_bytes(b"not safetensors")
    version = registry.register(src)
    registry.set_alias("champion", version)
    engine = Engine(settings, registry)
    problem = engine.apply(ControlState())
    assert "PredictorMismatch" in problem and engine.champion is None
    res = engine.complete(GenRequest("r3", PROMPT, max_tokens=3, temperature=0.0))
    assert res.fallback == "dense" and res.token_ids == dense_tokens(engine, PROMPT, 3)
    # named as a challenger, the same artifact is refused too: no canary on this replica, said why
    engine.apply(ControlState(generation=2, challenger=version, canary_share=0.5))
    assert engine.challenger is None and "PredictorMismatch" in engine.challenger_problem
    rids = [f"r4-{i}" for i in range(16)]
    assert "challenger" in {canary_arm(rid, 0.5) for rid in rids}  # ids a loaded challenger would serve
    assert {engine.plan(GenRequest(rid, PROMPT)).arm for rid in rids} == {"dense"}


def test_predictable_positions_are_the_prompt_tokens_the_dense_model_predicts():
    from adapter.runtime.loading import load
    from adapter.pipeline.targets import predictable_positions

    loaded = load("default")
    model, tok = loaded.runtime.model, loaded.tokenizer
    prompt = tok.encode("3 + 4 = 7 ; 2 + 5 = 7 ; 1 + 1 = 2 ; 4 + 4 = 8 ; 2 + 2 =")
    got = predictable_positions(model, prompt)
    with torch.no_grad():
        pred = model(input_ids=torch.tensor([prompt])).logits[0].argmax(-1)
    assert got == [t for t in range(2, len(prompt)) if int(pred[t - 1]) == prompt[t]]
    assert got and all(2 <= t < len(prompt) for t in got)
    assert predictable_positions(model, prompt[:2]) == []
