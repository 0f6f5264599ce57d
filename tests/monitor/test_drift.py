"""Drift features, a version's reference and the Evidently check (real Evidently, no mocks)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from adapter.selection import predictors as P
from adapter.config import RuntimeConfig
from adapter.runtime.loading import load
from adapter.selection.artifact import LoadedPredictor
from monitor import drift as dr
from tests.support import save_tiny_model

# ---- basis ------------------------------------------------------------------------------------


def structured_inputs(n: int = 600, d: int = 32, seed: int = 0):
    """Rows whose min is 0 and max is 1 already (columns 0 and 1), so minmax leaves them
    unchanged: 0.5 + a 3-dim signal of std 0.1 / 0.05 / 0.02 along orthonormal W + noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.linalg.qr(torch.randn(d - 2, 3, generator=g, dtype=torch.float64))[0].T  # (3, d-2)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([0.1, 0.05, 0.02], dtype=torch.float64)
    body = 0.5 + z @ w + 1e-4 * torch.randn(n, d - 2, generator=g, dtype=torch.float64)
    assert 0 < body.min() and body.max() < 1
    x = torch.cat([torch.zeros(n, 1, dtype=torch.float64), torch.ones(n, 1, dtype=torch.float64), body], 1)
    return x.float(), torch.cat([torch.zeros(3, 2, dtype=torch.float64), w], 1).float()


def test_fit_basis_recovers_known_structure():
    x, w = structured_inputs()
    basis = dr.fit_basis(x, k=5)
    assert basis.components.shape == (5, 32) and basis.mean.shape == (32,)
    torch.testing.assert_close(basis.components @ basis.components.T, torch.eye(5), atol=1e-5, rtol=0)
    # the top 3 components span W: cosines of the principal angles are all ~1
    cosines = torch.linalg.svdvals(basis.components[:3] @ w.T)
    assert cosines.min() > 0.999
    var = dr.project(basis, x).var(0)
    assert (var[:-1] >= var[1:]).all()
    torch.testing.assert_close(var[:3].sqrt(), torch.tensor([0.1, 0.05, 0.02]), rtol=0.1, atol=0)
    assert var[3] < 1e-6  # only noise beyond the third direction
    again = dr.fit_basis(x, k=5)
    assert torch.equal(again.components, basis.components)
    assert dr.project(basis, x[0]).shape == (1, 5)


def test_basis_save_load_round_trip(tmp_path):
    x, _ = structured_inputs(n=100)
    basis = dr.fit_basis(x, k=4)
    loaded = dr.load_basis(dr.save_basis(basis, tmp_path / "b.safetensors"))
    assert torch.equal(loaded.mean, basis.mean) and torch.equal(loaded.components, basis.components)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(dr.MissingReference):
        dr.load_basis(tmp_path / "bad.safetensors")


def test_fit_basis_rejects_k_above_rank():
    with pytest.raises(ValueError, match=r"k <= min\(N, D\); got \(5, 8\) and k=6"):
        dr.fit_basis(torch.rand(5, 8), k=6)


# ---- feature rows ---------------------------------------------------------------------------------


def test_feature_rows_entropy_and_margin():
    g = torch.Generator().manual_seed(0)
    basis = dr.fit_basis(torch.rand(20, 8, generator=g), k=3)
    inputs = torch.rand(2, 8, generator=g)
    heads = torch.stack([
        torch.tensor([[4.0, 3.0, 1.0, 0.0], [0.0, 0.0, math.log(2.0), 0.0]]),  # request 0: 2 layers
        torch.zeros(2, 4),  # request 1: uniform scores
    ])
    neurons = torch.zeros(2, 2, 6)
    rows = dr.feature_rows(basis, inputs, [11, 7], heads, neurons)
    assert list(rows[0]) == dr.feature_columns(3)
    assert rows[0]["prompt_len"] == 11 and rows[1]["prompt_len"] == 7
    # uniform -> entropy 1.0 and margin 0
    assert rows[1]["head_entropy"] == pytest.approx(1.0)
    assert rows[1]["neuron_entropy"] == pytest.approx(1.0)
    assert rows[1]["keep_margin"] == pytest.approx(0.0)
    # layer 1: softmax [e^4, e^3, e, 1]; layer 2: probs [0.2, 0.2, 0.4, 0.2]
    p1 = torch.softmax(torch.tensor([4.0, 3.0, 1.0, 0.0]), 0)
    h1 = float(-(p1 * p1.log()).sum()) / math.log(4)
    h2 = -(3 * 0.2 * math.log(0.2) + 0.4 * math.log(0.4)) / math.log(4)
    assert rows[0]["head_entropy"] == pytest.approx((h1 + h2) / 2, rel=1e-5)
    # keep 2 of 4: layer 1 gap 3 - 1 over std([4, 3, 1, 0]) = sqrt(10/3); layer 2 gap 0
    assert rows[0]["keep_margin"] == pytest.approx((2 / math.sqrt(10 / 3)) / 2, rel=1e-5)
    pcs = [rows[0][c] for c in dr.feature_columns(3)[:3]]
    assert pcs == pytest.approx(dr.project(basis, inputs[0])[0].tolist(), rel=1e-5, abs=1e-6)


def test_feature_rows_without_scores_are_nan():
    g = torch.Generator().manual_seed(1)
    basis = dr.fit_basis(torch.rand(20, 8, generator=g), k=2)
    rows = dr.feature_rows(basis, torch.rand(3, 8, generator=g), [5, 6, 7], None, None)
    for row in rows:
        assert all(math.isnan(row[c]) for c in ("head_entropy", "neuron_entropy", "keep_margin"))
        assert all(math.isfinite(row[c]) for c in ("pc00", "pc01", "prompt_len"))


# ---- the Evidently check ----------------------------------------------------------------------------


def gaussian(n: int, seed: int, shift: float = 0.0, shifted: int = 0, cols: int = 10) -> pd.DataFrame:
    x = np.random.default_rng(seed).normal(size=(n, cols))
    x[:, :shifted] += shift
    return pd.DataFrame(x, columns=[f"c{i:02d}" for i in range(cols)])


def assert_consistent(result: dr.DriftResult):
    """Evidently's per-column statuses agree with the score rule and with its own count."""
    for v in result.columns.values():
        assert v["drifted"] == dr._column_drifted(v["score"], v["method"], v["threshold"])
    assert result.drifted_count == len(result.drifted_columns)
    assert result.share == pytest.approx(result.drifted_count / result.n_columns)
    assert result.drift == (result.share >= result.drift_share)


def test_same_distribution_no_drift():
    result = dr.check_drift(gaussian(300, 0), gaussian(300, 1))
    assert not result.drift
    assert result.n_columns == 10 and (result.n_reference, result.n_current) == (300, 300)
    assert result.drifted_count <= 3
    assert {v["method"] for v in result.columns.values()} == {"K-S p_value"}
    assert result.html is None and "html" not in result.as_dict()
    assert_consistent(result)


def test_shifted_current_drifts():
    result = dr.check_drift(gaussian(300, 0), gaussian(300, 1, shift=2.0, shifted=8))
    assert result.drift
    shifted = {f"c{i:02d}" for i in range(8)}
    assert shifted <= set(result.drifted_columns)
    assert all(result.columns[c]["score"] < 1e-10 for c in shifted)  # K-S p-values
    assert result.share >= 0.8
    assert_consistent(result)


def test_columns_restrict_the_check_and_nan_columns_are_skipped():
    ref, cur = gaussian(300, 0), gaussian(300, 1, shift=2.0, shifted=8)
    result = dr.check_drift(ref, cur, columns=["c07", "c08", "c09"])
    assert set(result.columns) == {"c07", "c08", "c09"} and result.n_columns == 3
    assert not result.drift  # one of three drifted: share 1/3 < 0.5
    cur["c09"] = np.nan
    result = dr.check_drift(ref, cur, columns=["c00", "c09"])
    assert result.skipped_columns == ("c09",) and set(result.columns) == {"c00"}
    assert result.drift and result.as_dict()["skipped_columns"] == ["c09"]


def test_default_method_follows_reference_size_and_can_be_forced():
    ref, cur = gaussian(1100, 0, cols=3), gaussian(100, 1, cols=3)
    default = dr.check_drift(ref, cur)
    assert {v["method"] for v in default.columns.values()} == {"Wasserstein distance (normed)"}
    assert {v["threshold"] for v in default.columns.values()} == {0.1}
    forced = dr.check_drift(ref, cur, method="ks", threshold=0.01)
    assert {(v["method"], v["threshold"]) for v in forced.columns.values()} == {("K-S p_value", 0.01)}
    assert_consistent(default)
    assert_consistent(forced)


def test_html_report():
    result = dr.check_drift(gaussian(200, 0, cols=3), gaussian(200, 1, cols=3), html=True)
    assert isinstance(result.html, str) and "<html" in result.html[:2000].lower()


# ---- a version's reference on a saved tiny model ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
    loaded = load(str(folder), RuntimeConfig(device="cpu"))
    module = P.random_unified(loaded.runtime.shape, hidden=32, neuron_rank=4)
    return loaded, LoadedPredictor("shadowllm", "plainact", {}, module)


def test_build_reference_and_round_trip(tiny, tmp_path):
    loaded, predictor = tiny
    prompts = dr.reference_prompts(per_family=10)
    assert len(prompts) == 60
    basis, rows = dr.build_reference(loaded.runtime, loaded.tokenizer, predictor, prompts, k=8,
                                     batch_size=16, progress=False)
    d = loaded.runtime.shape.hidden
    assert basis.components.shape == (8, d) and basis.mean.shape == (d,)
    assert list(rows.columns) == dr.feature_columns(8) and len(rows) == 60
    assert not rows.isna().any().any()
    assert ((rows["head_entropy"] > 0) & (rows["head_entropy"] <= 1 + 1e-6)).all()
    ids = loaded.tokenizer.encode(prompts[0])
    assert ids[0] == loaded.tokenizer.bos_token_id and rows["prompt_len"][0] == len(ids)
    # one request on the serving path gives the same row as the batched reference
    u = loaded.runtime.prefill(ids, P.Dense())[0].predictor_input
    single = dr.feature_rows(basis, u[None], [len(ids)], *dr.scores_for(predictor, u[None]))[0]
    assert list(single.values()) == pytest.approx(rows.iloc[0].tolist(), rel=1e-4, abs=1e-5)

    out = dr.write_reference(tmp_path, basis, rows)
    assert out == tmp_path / dr.REFERENCE_DIR
    basis2, rows2 = dr.load_reference(tmp_path)
    assert torch.equal(basis2.components, basis.components) and torch.equal(basis2.mean, basis.mean)
    pd.testing.assert_frame_equal(rows2, rows)


def test_missing_reference(tmp_path):
    with pytest.raises(dr.MissingReference, match="no drift reference"):
        dr.load_reference(tmp_path)
    (tmp_path / dr.REFERENCE_DIR).mkdir()
    (tmp_path / dr.REFERENCE_DIR / dr.FEATURES_FILE).write_bytes(b"garbage")
    dr.save_basis(dr.fit_basis(torch.rand(10, 8), k=2), tmp_path / dr.REFERENCE_DIR / dr.BASIS_FILE)
    with pytest.raises(dr.MissingReference, match="cannot read"):
        dr.load_reference(tmp_path)


def test_scores_for_other_kinds_is_none():
    assert dr.scores_for(LoadedPredictor("static", "plainact", {}, (None, None)), torch.rand(2, 8)) == (None, None)
