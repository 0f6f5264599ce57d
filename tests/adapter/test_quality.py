"""`shadowgate eval` machinery on the shipped predictors of the default model (a few prompts)."""

import pytest

from adapter.embedded import suite as tasks
from adapter.embedded.recipe import default_predictor_dir
from adapter.evaluation import scoring
from adapter.evaluation import sweep as quality
from adapter.runtime.loading import load


def test_eval_report_and_plot(tmp_path):
    loaded = load("default")
    plot = tmp_path / "eval.png"
    report = quality.run_eval(loaded.runtime, loaded.tokenizer, "default", default_predictor_dir("default"),
                              None, plot_path=plot, sparsities=(0.5,), modes=("per_layer",),
                              per_family=3, text_sentences=6)
    assert {"model", "dense", "results", "spearman"} <= report.keys()
    # the dense row is the plain transformers model's exact-match accuracy on the same prompts
    ref = scoring.accuracy(scoring.hf_score_fn(loaded.runtime.model), loaded.tokenizer, tasks.split("test", 3))
    assert report["n_test"] == ref["n"] == 18
    assert report["dense"]["families"] == pytest.approx(ref["families"], abs=1e-4)
    assert report["dense"]["accuracy"] == pytest.approx(ref["mean"], abs=1e-4) and ref["mean"] >= 0.6
    assert report["dense"]["perplexity"] > 1.0
    methods = {(r["method"], r["criterion"]) for r in report["results"]}
    assert {("shadowllm", "plainact"), ("dejavu", "l2norm"), ("static", "plainact")} <= methods
    for r in report["results"]:
        assert r["sparsity"] == 0.5 and 0.0 < r["effective_sparsity"] < 1.0 and r["perplexity"] > 1.0
    assert report["spearman"]["plainact"]["heads"] > 0.5
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
