"""Trace records, predictor training, save/load and refusal of mismatched predictors."""

import json
from dataclasses import replace

import pytest
import torch

from adapter.pipeline import traces
from adapter.pipeline import train as training
from adapter.pipeline.build import train_one
from adapter.pipeline.collect import collect
from adapter.pipeline.targets import TargetPolicy
from adapter.pipeline.train import TrainConfig
from adapter.runtime.loading import load
from adapter.selection import artifact
from adapter.selection import predictors as P
from adapter.selection.artifact import PredictorMismatch
from tests.support import tiny_llama

FAST = TrainConfig(epochs=25, patience=25, hidden=128, neuron_rank=16, dejavu_rank=16)


@pytest.fixture(scope="module")
def default_llama():
    return load("default")


@pytest.fixture(scope="module")
def dataset(default_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("traces")
    return collect(default_llama.runtime.model, default_llama.tokenizer, root,
                   {"train": 40, "validation": 10, "test": 10}, policy=TargetPolicy(prompt="predictable"))


def test_dataset_layout_and_record_round_trip(dataset, default_llama):
    manifest = json.loads((dataset / "manifest.json").read_text())
    shape = default_llama.runtime.shape
    assert manifest["schema"] == traces.SCHEMA and manifest["splits"] == {"train": 240, "validation": 60, "test": 60}
    train = traces.load_split(dataset.parent, "train")  # the root resolves to the latest version
    assert train.heads("plainact").shape == (240, shape.layers, shape.heads)
    assert train.neurons("fisher").shape == (240, shape.layers, shape.ffn)
    assert train.tensors["predictor_input"].shape == (240, shape.hidden)
    offsets = train.tensors["token_offsets"]
    assert offsets[-1] == train.tensors["layer_inputs"].shape[0] and offsets[-1] > 240  # predictable prompt positions are targets too
    assert torch.isfinite(train.heads("plainact")).all()
    # one record through the wire format (what a Redis stream entry carries)
    rec = traces.TraceRecord(meta={"schema": traces.SCHEMA, "family": "x"},
                             tensors={"heads.plainact": train.heads("plainact")[0]})
    back = traces.TraceRecord.from_fields(rec.to_fields())
    assert back.meta == rec.meta and torch.equal(back.tensors["heads.plainact"], rec.tensors["heads.plainact"])
    with pytest.raises(ValueError, match="schema"):
        traces.TraceRecord.from_fields({"meta": json.dumps({"schema": "other"}), "tensors": b""})


def test_trained_predictor_beats_random_and_round_trips(dataset, default_llama, tmp_path):
    gm = default_llama.runtime
    out = tmp_path / "shadowllm-plainact"
    metrics = train_one("shadowllm", "plainact", dataset, out, gm, FAST)
    test = traces.load_split(dataset, "test")
    yh, yn = training._unified_targets(test, "plainact")
    x = test.tensors["predictor_input"]
    fp = traces.model_fingerprint(gm.model)
    loaded = artifact.load_predictor(out, gm.shape, fp)
    with torch.no_grad():
        ph, pn = loaded.module(x)
        rh, rn = P.random_unified(gm.shape, 128, 16)(x)
    trained_rho = float(training.spearman(ph, yh).mean())
    random_rho = float(training.spearman(rh, yh).mean())
    assert trained_rho > random_rho + 0.2, (trained_rho, random_rho)
    # neurons are harder to learn from 240 prompts in 25 epochs; still clearly above random
    assert float(training.spearman(pn, yn).mean()) > float(training.spearman(rn, yn).mean()) + 0.05
    assert metrics["rho_heads"] > 0.3
    # round trip: the saved predictor reproduces the trained one's masks
    method = loaded.method(0.5)
    st, _ = gm.prefill(default_llama.tokenizer.encode("1 + 2 = 3 ; 4 + 4 ="), method, 0)
    assert st.effective_sparsity > 0.3
    cfg = json.loads((out / "predictor.json").read_text())
    assert cfg["model_fingerprint"] == fp and cfg["criterion"] == "plainact"
    assert cfg["normalisation"]["targets"] == "minmax_per_example_per_layer"


def test_dejavu_and_static_train(dataset, default_llama, tmp_path):
    gm = default_llama.runtime
    dj = train_one("dejavu", "l2norm", dataset, tmp_path / "dj", gm, FAST)
    st = train_one("static", "plainact", dataset, tmp_path / "st", gm, FAST)
    assert dj["rho_heads"] > 0.3
    # one ranking for every prompt (the training mean) ranks heads well above chance, and below
    # the per-prompt predictor (the default model's shipped pair: 0.47 and 0.87)
    assert 0.3 < st["rho_heads"] < dj["rho_heads"] - 0.1, (st, dj)
    fp = traces.model_fingerprint(gm.model)
    static = artifact.load_predictor(tmp_path / "st", gm.shape, fp).method(0.5, "per_layer", gm.shape)
    assert static.mask.layers[1].heads.numel() == 4
    with pytest.raises(ValueError, match="l2norm"):
        train_one("dejavu", "plainact", dataset, tmp_path / "x", gm, FAST)


def test_mismatched_predictor_is_refused(dataset, default_llama, tmp_path):
    gm = default_llama.runtime
    out = tmp_path / "p"
    train_one("shadowllm", "l2norm", dataset, out, gm, replace(FAST, epochs=1))
    other = tiny_llama()
    from adapter.runtime.gated import GatedModel

    other_gm = GatedModel(other)
    with pytest.raises(PredictorMismatch, match="shape"):
        artifact.load_predictor(out, other_gm.shape, traces.model_fingerprint(other))
    with pytest.raises(PredictorMismatch, match="not for the loaded model"):
        artifact.load_predictor(out, gm.shape, "0" * 32)
    # traces of another model are refused for training
    with pytest.raises(PredictorMismatch, match="collected on model"):
        train_one("shadowllm", "plainact", dataset, tmp_path / "q", other_gm, FAST)
