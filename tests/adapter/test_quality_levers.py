"""The quality levers: targets averaged over several continuations, the predictor width,
and DejaVu's decode-only variant."""

import json

import pytest
import torch

from adapter.evaluation import sweep
from adapter.pipeline import traces
from adapter.pipeline.build import train_one
from adapter.pipeline.collect import collect
from adapter.pipeline.train import TrainConfig
from adapter.selection.artifact import load_predictor
from adapter.runtime.loading import load
from adapter.selection import methods, predictors as P

SPLITS = {"train": 6, "validation": 2, "test": 2}


@pytest.fixture(scope="module")
def default_llama():
    return load("default")


def _collect(m, root, **kw):
    return collect(m.runtime.model, m.tokenizer, root, SPLITS, **kw)


def test_continuations_average_the_targets(default_llama, tmp_path):
    one = traces.load_split(_collect(default_llama, tmp_path / "a"), "train")
    # near-zero temperature: every sample is the greedy answer, which the dense model gets
    # right, so the average of identical passes is the single pass
    cold_dir = _collect(default_llama, tmp_path / "b", continuations=3, temperature=0.01)
    cold = traces.load_split(cold_dir, "train")
    assert json.loads((cold_dir / "manifest.json").read_text())["continuations"] == 3
    torch.testing.assert_close(cold.heads("plainact"), one.heads("plainact"), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cold.neurons("fisher"), one.neurons("fisher"), rtol=1e-4, atol=1e-8)
    # hot samples are other answers: the targets move, the predictor input does not
    hot = traces.load_split(_collect(default_llama, tmp_path / "c", continuations=3, temperature=5.0), "train")
    assert torch.equal(hot.tensors["predictor_input"], one.tensors["predictor_input"])
    assert torch.equal(hot.tensors["token_heads_l2"], one.tensors["token_heads_l2"])
    moved = (hot.heads("plainact") - one.heads("plainact")).abs().amax((1, 2)) > 1e-3 * one.heads("plainact").amax()
    assert moved.float().mean() > 0.5
    with pytest.raises(ValueError, match="continuations"):
        _collect(default_llama, tmp_path / "d", continuations=0)


def test_predictor_width_is_saved_and_loaded(default_llama, tmp_path):
    data = _collect(default_llama, tmp_path / "t")
    rt = default_llama.runtime
    cfg = TrainConfig(epochs=2, patience=2, hidden=96, neuron_rank=8, dejavu_rank=24)
    train_one("shadowllm", "plainact", data, tmp_path / "s", rt, cfg)
    train_one("dejavu", "l2norm", data, tmp_path / "d", rt, cfg)
    fp = traces.model_fingerprint(rt.model)
    s = load_predictor(tmp_path / "s", rt.shape, fp)
    d = load_predictor(tmp_path / "d", rt.shape, fp)
    assert s.module.hidden == 96 and s.module.heads[0].out_features == 96
    assert d.module.layers[0].rank == 24 and d.module.layers[0].trunk.out_features == 48


def test_dejavu_decode_only_variant(default_llama):
    rt = default_llama.runtime
    preds = {"dejavu-l2norm": load_predictor_obj(rt)}
    configs = sweep._configs(preds, (0.5,), ("per_layer",), dejavu_variants=("all_tokens", "decode_only"))
    assert [(c[2], c[4].sparse_prompt, c[5]) for c in configs] == [
        ("per_layer", True, "dejavu-l2norm"), ("decode_only", False, "dejavu-l2norm")]
    with pytest.raises(ValueError, match="dejavu variants"):
        sweep._configs(preds, (0.5,), ("per_layer",), dejavu_variants=("prompt",))
    prompt, cont = [1, 5, 9, 12, 7, 3], [4, 8, 2]
    dense = rt.score(prompt, cont, methods.dense())
    decode_only = rt.score(prompt, cont, configs[1][4])
    all_tokens = rt.score(prompt, cont, configs[0][4])
    # the prompt runs densely, so the first answer token's logits are the dense ones; the
    # later tokens run gated (and differ)
    torch.testing.assert_close(decode_only[0], dense[0], rtol=1e-4, atol=1e-4)
    assert (decode_only[1:] - dense[1:]).abs().max() > 1e-3
    assert (all_tokens[0] - dense[0]).abs().max() > 1e-3


def load_predictor_obj(rt):
    from adapter.selection.artifact import LoadedPredictor

    module = P.random_dejavu(rt.shape, 16, seed=1)
    return LoadedPredictor("dejavu", "l2norm", {"shape": rt.shape.as_dict()}, module)
