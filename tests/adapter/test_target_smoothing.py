"""Targets averaged over neighbours in predictor-input space (TrainConfig.smooth_k)."""

import pytest
import torch

from adapter.pipeline import train as training


def _two_clusters(n=6, d=16):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    x = torch.stack([a + 0.01 * torch.randn(d, generator=g) for _ in range(n)]
                    + [b + 0.01 * torch.randn(d, generator=g) for _ in range(n)])
    y = torch.rand(2 * n, 3, 4, generator=g)
    return x, y


def test_neighbour_mean_averages_within_a_cluster():
    x, y = _two_clusters()
    (same,) = training.neighbour_mean(x, (y,), 1)
    torch.testing.assert_close(same, y)  # the nearest example is the example itself
    (within,) = training.neighbour_mean(x, (y,), 6, chunk=5)
    torch.testing.assert_close(within[:6], y[:6].mean(0).expand(6, 3, 4))
    torch.testing.assert_close(within[6:], y[6:].mean(0).expand(6, 3, 4))
    (every,) = training.neighbour_mean(x, (y,), 12)
    torch.testing.assert_close(every, y.mean(0).expand(12, 3, 4))
    with pytest.raises(ValueError, match="smooth_k"):
        training.neighbour_mean(x, (y,), 13)


def test_neighbour_mean_reads_the_input_as_the_predictor_does():
    # min-max normalised per example: a scaled and shifted input is the same input
    x, y = _two_clusters()
    moved = x.clone()
    moved[0] = 3 * x[0] + 2
    a = training.neighbour_mean(x, (y,), 6)[0]
    b = training.neighbour_mean(moved, (y,), 6)[0]
    torch.testing.assert_close(a, b)


def test_train_records_the_smoothing(tmp_path):
    import json

    from adapter.pipeline.build import train_one
    from adapter.pipeline.collect import collect
    from adapter.runtime.loading import load

    m = load("default")
    data = collect(m.runtime.model, m.tokenizer, tmp_path / "t", {"train": 2, "validation": 1, "test": 1})
    cfg = training.TrainConfig(epochs=2, patience=2, hidden=32, neuron_rank=8, smooth_k=4)
    metrics = train_one("shadowllm", "plainact", data, tmp_path / "s", m.runtime, cfg)
    assert -1.0 <= metrics["rho_heads"] <= 1.0
    assert json.loads((tmp_path / "s" / "predictor.json").read_text())["train_config"]["smooth_k"] == 4
    with pytest.raises(ValueError, match="smooth_k"):
        train_one("shadowllm", "plainact", data, tmp_path / "x", m.runtime,
                  training.TrainConfig(epochs=1, hidden=32, neuron_rank=8, smooth_k=13))
