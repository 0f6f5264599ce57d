"""The oracle masks (adapter/evaluation/oracle.py): each test prompt's own importance, and
the batched masked scorer that stands in for the gated runtime in oracle sweeps."""

import pytest
import torch

from adapter.embedded import suite
from adapter.evaluation import oracle, scoring
from adapter.pipeline import traces
from adapter.pipeline.collect import collect
from adapter.runtime import masks
from adapter.runtime.loading import load
from adapter.selection.artifact import load_predictor
from adapter.embedded.recipe import default_predictor_dir


@pytest.fixture(scope="module")
def default_llama():
    return load("default")


@pytest.fixture(scope="module")
def test_truths(default_llama):
    m = default_llama
    return oracle.truths(m.runtime.model, m.tokenizer, m.runtime.shape, suite.split("test", 1))


def test_masked_scorer_equals_the_gated_runtime(default_llama):
    rt = default_llama.runtime
    lp = load_predictor(default_predictor_dir("default") / "shadowllm-plainact", rt.shape,
                        traces.model_fingerprint(rt.model))
    pairs = scoring.encode_pairs(default_llama.tokenizer, suite.split("test", 1))
    for sparsity, mode in ((0.7, "global"), (0.5, "per_layer")):
        method = lp.method(sparsity, mode, None, "heads")
        chosen = {tuple(p): rt.prefill(p, method, 0)[0].mask for p, _ in pairs}
        masked = oracle.masked_score_fn(rt.model, rt.shape, lambda p: chosen[tuple(p)])(pairs)
        for (p, c), logits in zip(pairs, masked):
            gated = rt.score(p, c, method)
            torch.testing.assert_close(logits, gated, rtol=1e-4, atol=1e-4)
    # and it is not the dense model: a sparse mask moves the logits
    dense = scoring.hf_score_fn(rt.model)(pairs)
    assert max(float((a - b).abs().max()) for a, b in zip(dense, masked)) > 1e-2


def test_truths_are_the_collected_targets(default_llama, test_truths, tmp_path):
    m = default_llama
    folder = collect(m.runtime.model, m.tokenizer, tmp_path, {"test": 1})
    ts = traces.load_split(folder, "test")
    prompts = [tuple(meta["prompt_ids"]) for meta in ts.metas]
    assert set(prompts) == set(test_truths)
    for j, p in enumerate(prompts):
        torch.testing.assert_close(test_truths[p].heads["plainact"], ts.heads("plainact")[j])
        torch.testing.assert_close(test_truths[p].neurons["fisher"], ts.neurons("fisher")[j])
        torch.testing.assert_close(test_truths[p].predictor_input, ts.tensors["predictor_input"][j])


def test_oracle_mask_keeps_the_top_units(default_llama, test_truths):
    shape = default_llama.runtime.shape
    t = next(iter(test_truths.values()))
    h, n = t.heads["plainact"], t.neurons["plainact"]
    per_layer = oracle.oracle_mask(shape, h, n, 0.5, "per_layer")
    assert per_layer.layers[0].full
    for i, lm in enumerate(per_layer.layers[1:], 1):
        assert set(lm.heads.tolist()) == set(h[i].topk(4).indices.tolist())
        assert set(lm.neurons.tolist()) == set(n[i].topk(256).indices.tolist())
    # the per-layer ranking does not depend on the scale; the global one ranks raw values
    assert oracle.oracle_mask(shape, h, n, 0.5, "per_layer", "raw").key == per_layer.key
    raw = oracle.oracle_mask(shape, h, n, 0.7, "global", "raw")
    kept = torch.zeros(shape.layers - 1, shape.heads, dtype=torch.bool)
    for i, lm in enumerate(raw.layers[1:]):
        kept[i, lm.heads] = True
    dropped = h[1:].masked_fill(kept, float("-inf")).amax()
    for i, lm in enumerate(raw.layers[1:], 1):
        # beyond each layer's best head (kept by the floor), a kept head outranks every dropped one
        assert all(float(h[i, k]) >= float(dropped) for k in lm.heads.tolist() if k != int(h[i].argmax()))
    assert int(kept.sum()) == masks.keep_count(kept.numel(), 0.7, floor=shape.layers - 1)
    with pytest.raises(ValueError, match="scale"):
        oracle.oracle_mask(shape, h, n, 0.5, "global", "rank")


def test_oracle_at_sparsity_zero_is_dense(default_llama):
    m = default_llama
    report = oracle.run_oracle(m.runtime, m.tokenizer, per_family=1, sparsities=(0.0, 0.7), modes=("global",),
                               scales=("layer", "raw"))
    assert report["n_test"] == len(suite.FAMILIES)
    zero = [r for r in report["results"] if r["sparsity"] == 0.0]
    assert len(zero) == 2 and all(r["accuracy"] == report["dense"]["accuracy"] for r in zero)
    assert {(r["scale"], r["sparsity"]) for r in report["results"]} == {
        ("layer", 0.0), ("raw", 0.0), ("layer", 0.7), ("raw", 0.7)}
