"""Control state, settings, fidelity and the sample store against a real Redis (no Ray)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import redis
import torch
from mlflow.exceptions import MlflowException
from pydantic import ValidationError

from adapter.pipeline.traces import SCHEMA, TraceRecord
from monitor.fidelity import compare
from monitor.samples import SampleStore
from serving.replica.control import ControlStore, ControlUpdate, StateFollower, canary_arm, shadow_sampled
from serving.settings import ConfigError, ControlDefaults, load_settings
from tests.support import until


def test_api_keys_from_env_are_comma_separated(monkeypatch):
    monkeypatch.setenv("SHADOWGATE_API_KEYS", "sk-one, sk-two,sk-three")
    monkeypatch.setenv("SHADOWGATE_ADMIN_KEY", "sk-admin-secret")
    monkeypatch.setenv("SHADOWGATE_PORT", "9001")
    s = load_settings()
    assert [k.key.get_secret_value() for k in s.api_keys] == ["sk-one", "sk-two", "sk-three"]
    assert s.admin_key.get_secret_value() == "sk-admin-secret" and s.port == 9001 and s.host == "127.0.0.1"
    assert "sk-admin-secret" not in repr(s) and "sk-one" not in repr(s)  # secrets never show in logs


def test_per_key_policy_from_yaml_and_bad_bounds(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("api_keys:\n  - key: strict\n    name: medical\n    policy: {max_sparsity: 0.0, shadow: false}\n"
                   "  - plain\n")
    s = load_settings(cfg)
    assert s.policy_for(s.api_keys[0]).max_sparsity == 0.0 and not s.policy_for(s.api_keys[0]).shadow
    assert s.policy_for(s.api_keys[1]) == s.default_policy
    cfg.write_text("api_keys:\n  - key: k\n    policy: {min_sparsity: 0.6, max_sparsity: 0.2}\n")
    with pytest.raises(ConfigError, match="min_sparsity 0.6 exceeds max_sparsity 0.2"):
        load_settings(cfg)


def test_canary_and_shadow_choices_are_deterministic_fractions():
    ids = [f"req-{i}" for i in range(4000)]
    share = sum(canary_arm(i, 0.25) == "challenger" for i in ids) / len(ids)
    assert abs(share - 0.25) < 0.03
    assert [canary_arm(i, 0.25) for i in ids[:50]] == [canary_arm(i, 0.25) for i in ids[:50]]
    assert not any(canary_arm(i, 0.0) == "challenger" for i in ids) and all(shadow_sampled(i, 1.0) for i in ids)


def test_update_bumps_generation_and_followers_apply_it(redis_url):
    r = redis.Redis.from_url(redis_url)
    store = ControlStore(r, "t1")
    first = store.ensure(ControlDefaults(sparsity=0.4))
    assert first.generation == 1 and first.sparsity == 0.4
    applied = []

    async def scenario():
        async def apply(state):
            applied.append(state.generation)

        follower = StateFollower(redis_url, "t1", "llm", ControlDefaults(), apply, reconcile_s=30.0)
        await follower.start()
        new = await asyncio.to_thread(store.update, ControlUpdate(sparsity=0.2, challenger="7"), "test")
        # the notification, not the 30 s reconcile, brings it
        await until(lambda: follower.state.generation == new.generation, 2.5, interval=0.05)
        reports = store.replica_reports(10)
        await follower.stop()
        return new, follower.state, reports

    new, seen, reports = asyncio.run(scenario())
    assert new.generation == 2 and seen.sparsity == 0.2 and seen.challenger == "7"
    assert applied == [1, 2] and reports[0]["generation"] == 2
    with pytest.raises(ValidationError, match=r"sparsity\n  Input should be less than 1"):
        ControlUpdate(sparsity=1.5)


def test_fidelity_numbers():
    logits = torch.randn(5, 11)
    cont = logits.argmax(-1).tolist()
    same = compare(logits, logits, cont)
    assert same.kl == pytest.approx([0.0] * 5, abs=1e-6) and all(same.top1) and same.exact_match
    other = logits.clone()
    other[0] = -other[0]
    fid = compare(logits, other, cont)
    p, q = torch.softmax(logits[0], -1), torch.softmax(other[0], -1)
    assert fid.kl[0] == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-4)
    assert fid.top1[0] is False and fid.top1[1:] == [True] * 4 and math.isfinite(fid.kl_mean)
    assert not compare(logits, logits, [(c + 1) % 11 for c in cont]).exact_match


def test_sample_store_caps_and_honours_retention(redis_url):
    store = SampleStore(redis.Redis.from_url(redis_url), "t2", maxlen=10)
    rec = TraceRecord({"schema": SCHEMA, "request_id": "x"}, {"predictor_input": torch.ones(4)})
    short = store.add(rec, {"kl_mean": 0.1}, retention_s=1)
    for _ in range(3):
        store.add(rec, {"kl_mean": 0.2}, retention_s=3600)
    assert len(store) == 4
    assert store.sweep(now=time.time() + 2) == 1
    assert short not in [e for e, _, _ in store.read()] and len(store) == 3
    _, back, fid = store.read()[0]
    assert torch.equal(back.tensors["predictor_input"], torch.ones(4)) and fid["kl_mean"] == 0.2
    for _ in range(300):
        store.add(rec, {}, retention_s=3600)
    assert len(store) < 200  # MAXLEN ~ 10 trims in whole macro-nodes


def test_config_driven_app_builder_binds_the_three_deployments(tmp_path):
    from serving.app import app_builder

    cfg = tmp_path / "c.yaml"
    cfg.write_text("serve:\n  llm_replicas: 2\n")
    gateway = app_builder({"config": str(cfg)})._bound_deployment
    settings, *bound = gateway.init_args
    assert gateway.name == "Gateway" and settings.serve.llm_replicas == 2  # the file's settings, bound
    replicas = {a._bound_deployment.name: a._bound_deployment._deployment_config.num_replicas for a in bound}
    assert replicas == {"GatedLLM": 2, "ShadowDense": 1, "Monitor": 1}


def test_the_model_replicas_are_health_checked_as_often_as_the_settings_say():
    """A SIGKILLed replica is noticed at Serve's next health check: GatedLLM and ShadowDense
    take the period from settings (2 s by default, Serve's own is 10 s)."""
    from serving.app import build_app
    from serving.settings import load_settings

    for period in (None, 0.5):
        settings = load_settings(None, **({"serve": {"health_check_period_s": period}} if period else {}))
        gateway = build_app(settings)._bound_deployment
        bound = {a._bound_deployment.name: a._bound_deployment for a in gateway.init_args[1:] if a is not None}
        for name in ("GatedLLM", "ShadowDense"):
            cfg = bound[name]._deployment_config
            assert cfg.health_check_period_s == (period or 2.0)
            assert cfg.health_check_timeout_s == settings.serve.health_check_timeout_s


def test_registry_versions_aliases_and_download(tmp_path, monkeypatch):
    from jobs.registry import PredictorRegistry, RegistryError

    uri = f"sqlite:///{tmp_path}/db/mlflow.db"
    (tmp_path / "db").mkdir()
    reg = PredictorRegistry(uri, "p", tmp_path / "cache")
    assert reg.resolve("champion") is None  # empty registry
    folder = tmp_path / "pred"
    folder.mkdir()
    (folder / "predictor.json").write_text('{"kind": "shadowllm"}')
    (folder / "predictor.safetensors").write_bytes(b"x")
    with pytest.raises(RegistryError, match="holds no drift reference"):  # every version has one
        reg.register(folder)
    (folder / "reference").mkdir()
    (folder / "reference" / "features.parquet").write_bytes(b"p")
    (folder / "reference" / "basis.safetensors").write_bytes(b"b")
    v1, v2 = reg.register(folder, tags={"source": "test"}), reg.register(folder)
    assert (v1, v2) == ("1", "2") and reg.resolve("champion") is None
    reg.set_alias("champion", v2)
    assert reg.resolve("champion") == "2" and reg.resolve("1") == "1"
    got = reg.download("2")
    assert (got / "predictor.json").read_text() == '{"kind": "shadowllm"}'
    assert (got / "reference" / "basis.safetensors").read_bytes() == b"b"
    assert reg.exists("2") and not reg.exists("999")
    assert (tmp_path / "db" / "artifacts").exists()  # artifacts beside the store, not ./mlruns
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = PredictorRegistry("http://127.0.0.1:9", "p", tmp_path / "c2")
    with pytest.raises(MlflowException, match=r"127\.0\.0\.1:9.*Connection refused"):  # an error, not "no champion"
        down.resolve("champion")
