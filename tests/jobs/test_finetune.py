"""The fine-tune job against a real Redis and a real MLflow server, on the embedded model:
a champion trained on three families learns the other three from shadow samples."""

from __future__ import annotations

import json

import pytest
import redis

from jobs.finetune import GROUP, available, sample_reader
from jobs.registry import PredictorRegistry
from jobs.runner import JobRecords, run_job
from serving.bench_monitor import narrow_predictor
from serving.settings import load_settings
from tests.jobs.conftest import shadow_records, write_samples

pytestmark = pytest.mark.service
KNOWN, SHIFTED = ["mod_add", "successor", "lexicon"], ["table_lookup", "kv_recall", "reverse"]


@pytest.fixture(scope="module")
def setup(redis_url, mlflow_uri, loaded, tmp_path_factory):
    settings = load_settings(None, redis={"url": redis_url, "prefix": "ft"},
                             mlflow={"tracking_uri": mlflow_uri, "registered_model": "ft-predictor"},
                             adapt={"min_samples": 40, "replay_per_family": 30, "replay_holdout_per_family": 8,
                                    "epochs": 25, "holdout": 0.25})
    registry = PredictorRegistry(mlflow_uri, "ft-predictor")
    folder = narrow_predictor(loaded, KNOWN, tmp_path_factory.mktemp("narrow"), per_family=120, epochs=25)
    champion = registry.register(folder, tags={"source": "test-narrow", "families": ",".join(KNOWN)})
    registry.set_alias("champion", champion)
    return settings, registry, champion


def test_too_few_samples_is_a_skipped_run_that_keeps_them(setup, loaded):
    settings, registry, _ = setup
    r = redis.Redis.from_url(settings.redis.url)
    write_samples(r, "ft", shadow_records(loaded, SHIFTED, 3))
    rec = run_job(settings, "finetune")
    assert rec["status"] == "ok" and rec["result"]["status"] == "skipped"
    assert "9 new shadow samples, 40 needed" in rec["result"]["reason"]
    assert available(sample_reader(r, "ft")) == 9  # nothing consumed


def test_candidate_from_shadow_samples_beats_the_champion_and_is_registered(setup, loaded):
    settings, registry, champion = setup
    r = redis.Redis.from_url(settings.redis.url)
    write_samples(r, "ft", shadow_records(loaded, SHIFTED, 47, offset=3))  # 9 + 141 = 150 samples
    rec = run_job(settings, "finetune")
    res = rec["result"]
    assert rec["status"] == "ok" and res["status"] == "registered", json.dumps(res)
    assert res["samples"] == 150 and res["holdout"] == 38 and res["replay_rows"] == 90
    assert res["candidate_holdout_kl"] < res["champion_holdout_kl"] * (1 - settings.adapt.min_gain)
    assert res["forget"] <= settings.adapt.max_forget
    v = res["version"]
    assert registry.aliases()["candidate"] == v and registry.aliases()["champion"] == champion
    tags = registry.version(v).tags
    assert tags["parent_version"] == champion and tags["data_window"] == res["data_window"]
    assert tags["families"] == ",".join(KNOWN) and tags["model_fingerprint"]
    # the run: params, metrics, weights + reference + training data, eval and plot
    client = registry.client
    run = client.get_run(res["run_id"])
    assert run.data.params["parent_version"] == champion and run.data.tags["registered_version"] == v
    assert run.data.metrics["candidate.holdout.kl_mean"] == pytest.approx(res["candidate_holdout_kl"], abs=1e-5)
    top = {a.path for a in client.list_artifacts(res["run_id"])}
    assert {"eval.json", "fidelity.png", "predictor"} <= top
    inner = {a.path for a in client.list_artifacts(res["run_id"], "predictor")}
    assert {"predictor/predictor.safetensors", "predictor/predictor.json", "predictor/reference",
            "predictor/training"} <= inner
    folder = registry.download(v)
    assert (folder / "reference" / "features.parquet").exists()
    assert json.loads((folder / "predictor.json").read_text())["kind"] == "shadowllm"
    # everything read is acknowledged; a second run has nothing new
    assert r.xpending("ft:shadow:samples", GROUP)["pending"] == 0
    again = run_job(settings, "finetune")["result"]
    assert again["status"] == "skipped"
    assert [h["name"] for h in JobRecords(r, "ft").recent()] == ["finetune"] * 3
