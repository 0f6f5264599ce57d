"""bfloat16 serving and device placement: a predictor matches a model by a fingerprint that
does not depend on the serving dtype or device, and runs on the model's device (in its
dtype where that is safe). End to end in bfloat16 on CPU: generate, eval, the service."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch

from adapter.config import RuntimeConfig
from adapter.embedded.recipe import default_predictor_dir
from adapter.evaluation.sweep import run_eval
from adapter.pipeline import traces
from adapter.runtime.gated import GatedModel
from adapter.runtime.loading import load
from adapter.selection import predictors as P
from adapter.selection.by_name import TRAINED, build_method
from adapter.selection.methods import dense, make_method
from tests.support import free_port, serve_app, shadowgate, tiny_llama

BF16 = RuntimeConfig(dtype="bfloat16")
PROMPT = "1 + 2 = 3 ; 4 + 4 ="


@pytest.fixture(scope="module")
def bf16_llama():
    return load("default", BF16)


def shipped_fingerprints() -> set[str]:
    folder = default_predictor_dir("default")
    return {json.loads((folder / sub / "predictor.json").read_text())["model_fingerprint"]
            for sub in TRAINED.values()}


def test_fingerprint_does_not_depend_on_the_serving_dtype(bf16_llama):
    fp32 = load("default")
    assert next(bf16_llama.runtime.model.parameters()).dtype == torch.bfloat16
    fp = traces.model_fingerprint(fp32.runtime.model)
    # the same value as the fingerprint the shipped predictors were registered with (fp32)
    assert shipped_fingerprints() == {fp}
    assert traces.model_fingerprint(bf16_llama.runtime.model) == fp
    # what the bug did: hashing the weights after the cast gives another identity
    assert traces._weights_fingerprint(bf16_llama.runtime.model) != fp
    # a model that is not pinned is hashed as it is; another checkpoint is another model
    assert traces.model_fingerprint(tiny_llama(seed=0)) == traces.model_fingerprint(tiny_llama(seed=0))
    assert traces.model_fingerprint(tiny_llama(seed=0)) != traces.model_fingerprint(tiny_llama(seed=1))


def test_generate_cli_in_bfloat16_uses_the_shipped_predictor():
    """The command of the issue, as a user runs it."""
    run = shadowgate("generate", "--model", "default", "--method", "shadowllm", "--prompt", PROMPT,
                     "--max-tokens", "4", "--json", env={"SHADOWGATE_RUNTIME__DTYPE": "bfloat16"})
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["predictor"].endswith("shadowllm-plainact") and out["method"] == "shadowllm"
    assert out["text"].split()[0] == "8"  # 4 + 4, as in float32
    assert 0.45 < out["effective_sparsity"] < 0.5


@pytest.mark.parametrize("name", ["shadowllm", "dejavu", "static"])
def test_every_shipped_method_generates_in_bfloat16(bf16_llama, name):
    rt, tok = bf16_llama.runtime, bf16_llama.tokenizer
    built = build_method(rt.shape, name, 0.5, predictor_dir=default_predictor_dir("default"),
                         fingerprint=traces.model_fingerprint(rt.model))
    assert built.predictor.endswith(TRAINED[name])
    gen = rt.generate([tok.encode(PROMPT)], built.method, 2)[0]
    assert tok.decode(gen.token_ids[:1]).strip() == "8"
    assert gen.effective_sparsity > 0.4


def test_eval_in_bfloat16_keeps_the_float32_accuracy(bf16_llama, tmp_path):
    """`shadowgate eval` on the served predictor (shadowllm) only: bfloat16 matmuls are slow
    on CPUs without bf16 units; the slow test below runs every method."""
    shutil.copytree(default_predictor_dir("default") / TRAINED["shadowllm"], tmp_path / TRAINED["shadowllm"])
    report = run_eval(bf16_llama.runtime, bf16_llama.tokenizer, "default", tmp_path, None,
                      sparsities=(0.5,), modes=("per_layer",), per_family=2, text_sentences=4)
    assert report["n_test"] == 12 and report["dense"]["accuracy"] == 1.0  # float32: 1.000
    [row] = report["results"]
    assert row["method"] == "shadowllm" and row["accuracy"] >= 0.75  # float32 at 0.5: 0.960 on 300 prompts
    assert 0.4 < row["effective_sparsity"] < 0.5 and report["dense"]["perplexity"] < 10


@pytest.mark.slow
def test_eval_in_bfloat16_of_every_shipped_method(bf16_llama):
    report = run_eval(bf16_llama.runtime, bf16_llama.tokenizer, "default", default_predictor_dir("default"),
                      None, sparsities=(0.5,), modes=("per_layer",), per_family=4, text_sentences=8)
    assert report["n_test"] == 24 and report["dense"]["accuracy"] >= 0.95  # float32: 1.000
    by = {r["method"]: r for r in report["results"]}
    assert set(by) == {"shadowllm", "dejavu", "static"}
    assert by["shadowllm"]["accuracy"] >= 0.75
    assert all(0.4 < r["effective_sparsity"] < 0.5 for r in report["results"])


# ---- placement -----------------------------------------------------------------------------


def test_predictors_are_placed_on_the_model_device_and_dtype():
    """The meta device stands in for an accelerator (this machine has none)."""
    shape = GatedModel(tiny_llama()).shape
    meta = torch.device("meta")
    unified, per_layer = P.random_unified(shape, 16), P.random_dejavu(shape, 8)
    sl = make_method("shadowllm", 0.5, shape, unified).placed(meta, torch.bfloat16)
    p = next(sl.predictor.parameters())
    assert p.device == meta and p.dtype == torch.float32  # the unified predictor stays float32
    dv = make_method("dejavu", 0.5, shape, per_layer).placed(meta, torch.bfloat16)
    p = next(dv.predictors.parameters())
    assert p.device == meta and p.dtype == torch.bfloat16
    # the originals are untouched (drift features and training read them on the CPU)
    assert {(q.device.type, q.dtype) for q in unified.parameters()} == {("cpu", torch.float32)}
    assert {(q.device.type, q.dtype) for q in per_layer.parameters()} == {("cpu", torch.float32)}
    # one copy per (device, dtype), not one per request
    again = make_method("dejavu", 0.7, shape, per_layer).placed(meta, torch.bfloat16)
    assert again.predictors is dv.predictors and again.sparsity == 0.7
    cpu = make_method("shadowllm", 0.5, shape, unified)
    assert cpu.placed(torch.device("cpu"), torch.bfloat16) is cpu  # already there: no copy
    static = make_method("static", 0.5, shape, P.random_static_scores(shape))
    assert static.placed(meta, torch.bfloat16) is static and dense().placed(meta, torch.bfloat16) == dense()


def test_dejavu_runs_in_bfloat16_and_picks_what_float32_picks():
    model = tiny_llama()
    fp32, bf16 = GatedModel(model), GatedModel(tiny_llama(), RuntimeConfig(dtype="bfloat16"))
    method = make_method("dejavu", 0.5, fp32.shape, P.random_dejavu(fp32.shape, 8))
    ids = list(range(5, 25))
    st, _ = bf16.prefill(ids, method, 4)
    assert next(st.method.predictors.parameters()).dtype == torch.bfloat16
    assert len(bf16.generate([ids], method, 4)[0].token_ids) == 4
    # the same token's units under both dtypes: mostly the same heads and neurons
    h = torch.randn(fp32.shape.hidden, generator=torch.Generator().manual_seed(0))
    kh, kf = method.counts(fp32.shape)
    a = method.units(1, h, kh, kf)
    b = method.placed(torch.device("cpu"), torch.bfloat16).units(1, h.bfloat16(), kh, kf)
    shared_neurons = len(set(a[1].tolist()) & set(b[1].tolist())) / kf
    assert shared_neurons > 0.8 and len(set(a[0].tolist()) & set(b[0].tolist())) >= kh - 1


# ---- the service ---------------------------------------------------------------------------


@pytest.mark.service
@pytest.mark.slow  # about 100 s on 2 cores: Ray, Serve, the registry, warm-up
def test_service_in_bfloat16_serves_the_shipped_predictor(redis_url, registry_uri, tmp_path_factory):
    from jobs.bootstrap import ensure_champion
    from jobs.registry import PredictorRegistry
    from serving.settings import load_settings

    key, port = "sk-test-bf16", free_port()
    settings = load_settings(
        None, model={"name": "default"}, runtime={"threads": 1, "dtype": "bfloat16"}, port=port,
        api_keys=[{"key": key, "name": "main"}], redis={"url": redis_url}, mlflow={"tracking_uri": registry_uri},
        serve={"reconcile_s": 1.0, "replica_cpus": 0.1, "defaults": {"shadow_rate": 0.0, "sparsity": 0.5}})
    registry = PredictorRegistry(registry_uri, settings.mlflow.registered_model,
                                 tmp_path_factory.mktemp("predictor-cache"))
    loaded = load("default", settings.runtime)
    version = ensure_champion(registry, "default", loaded, reference_per_family=10)
    assert registry.client.get_model_version(settings.mlflow.registered_model, version).tags["source"] == "shipped"
    with serve_app(settings) as base:
        r = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                       json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ext = body["shadowgate"]
    assert ext["predictor_version"] == version and ext["arm"] == "champion" and ext["sparsity"] == 0.5
    assert 0.4 < ext["effective_sparsity"] < 0.5
    assert body["choices"][0]["text"].split()[0] == "8"


def test_a_model_handed_to_the_runtime_directly_keeps_its_float32_identity():
    """GatedModel(model, bf16) without the loader: the fingerprint is the weights' as given."""
    fp = traces.model_fingerprint(tiny_llama(seed=3))
    gm = GatedModel(tiny_llama(seed=3), BF16)
    assert next(gm.model.parameters()).dtype == torch.bfloat16
    assert traces.model_fingerprint(gm.model) == fp
    # a loader's pin stands: pinned first, then handed over
    model = tiny_llama(seed=4)
    pinned = traces.pin_fingerprint(model)
    assert traces.model_fingerprint(GatedModel(model, BF16).model) == pinned
