"""The fine-tune job against a real Redis and a real MLflow server, on the embedded model:
a champion trained on three families learns the other three from shadow samples."""

from __future__ import annotations

import json

import pytest
import redis

from adapter.pipeline.targets import Spec
from jobs.finetune import in_holdout
from jobs.registry import PredictorRegistry
from jobs.runner import JobRecords, run_job
from jobs.shadow_reader import GROUP, available, sample_reader
from monitor.keys import Keys
from serving.bench.monitor import narrow_predictor
from serving.settings import load_settings
from tests.jobs.conftest import shadow_records, write_samples

pytestmark = pytest.mark.service
KNOWN, SHIFTED = ["mod_add", "successor", "lexicon"], ["table_lookup", "kv_recall", "reverse"]


@pytest.fixture(scope="module")
def setup(redis_url, mlflow_uri, loaded, tmp_path_factory):
    settings = load_settings(None, redis={"url": redis_url, "prefix": "ft"},
                             mlflow={"tracking_uri": mlflow_uri, "registered_model": "ft-predictor"},
                             adapt={"min_samples": 40, "replay_per_family": 100, "replay_holdout_per_family": 15,
                                    "epochs": 60, "patience": 12, "lr": 1e-3, "holdout": 0.25})
    registry = PredictorRegistry(mlflow_uri, "ft-predictor")
    folder = narrow_predictor(loaded, KNOWN, tmp_path_factory.mktemp("narrow"), per_family=120, epochs=25)
    champion = registry.register(folder, tags={"source": "test-narrow", "families": ",".join(KNOWN)})
    registry.set_alias("champion", champion)
    return settings, registry, champion


def test_too_few_samples_is_a_skipped_run_that_keeps_them(setup, engine):
    settings, registry, _ = setup
    r = redis.Redis.from_url(settings.redis.url)
    write_samples(r, "ft", shadow_records(engine, SHIFTED, 3))
    rec = run_job(settings, "finetune")
    assert rec["status"] == "ok" and rec["result"]["status"] == "skipped"
    assert "9 new shadow samples, 40 needed" in rec["result"]["reason"]
    assert available(sample_reader(r, "ft")) == 9  # nothing consumed


def test_candidate_from_shadow_samples_beats_the_champion_and_is_registered(setup, engine):
    settings, registry, champion = setup
    r = redis.Redis.from_url(settings.redis.url)
    records = shadow_records(engine, SHIFTED, 44, offset=3)
    repeats = shadow_records(engine, SHIFTED, 3, offset=3)  # a client sending prompts again
    write_samples(r, "ft", records + repeats)  # 9 + 132 + 9 = 150 samples of 141 prompts
    rec = run_job(settings, "finetune")
    res = rec["result"]
    assert rec["status"] == "ok" and res["status"] == "registered", json.dumps(res)
    assert res["samples"] == 150 and res["distinct_prompts"] == 141 and res["replay_rows"] == 300
    # held out by prompt hash: exactly the prompts whose hash falls in the share
    earlier = shadow_records(engine, SHIFTED, 3)  # the 9 the first test left unconsumed
    specs = {Spec.from_meta(x.meta).key(): Spec.from_meta(x.meta) for x in earlier + records}
    assert len(specs) == 141 and res["holdout"] == sum(in_holdout(s, 0.25) for s in specs.values())
    assert res["candidate_holdout_kl"] < res["champion_holdout_kl"] * (1 - settings.adapt.min_gain)
    assert res["forget"] <= settings.adapt.max_forget
    # the absolute target is the champion's in-distribution KL times 1.1, and recorded
    assert res["target_met"] == (res["candidate_holdout_kl"] <= res["target_kl"])
    assert res["refit"]["rows"] == 141 + 300 and res["refit"]["epochs"] >= 1
    # the refit is registered only if it keeps what the gate measured
    assert res["refit"]["kept"] == (res["refit"]["holdout_kl"] <= res["candidate_holdout_kl"])
    assert res["replay_kept"] == 141
    v = res["version"]
    assert registry.aliases()["candidate"] == v and registry.aliases()["champion"] == champion
    tags = registry.version(v).tags
    assert tags["parent_version"] == champion and tags["data_window"] == res["data_window"]
    assert tags["families"] == ",".join(KNOWN) and tags["model_fingerprint"]
    assert tags["target_met"] == str(res["target_met"]).lower() and tags["replay_samples"] == "141"
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
    # what it learnt is kept as token ids (rescorable) with its policy, one row per prompt
    rows = [json.loads(x) for x in (folder / "training" / "shadow.jsonl").read_text().splitlines()]
    assert len(rows) == 141 and {Spec.from_meta(x).key() for x in rows} == set(specs)
    assert json.loads((folder / "training" / "policy.json").read_text()) == settings.adapt.targets.model_dump()
    # everything read is acknowledged; a second run has nothing new
    assert r.xpending(Keys("ft").shadow_samples, GROUP)["pending"] == 0
    again = run_job(settings, "finetune")["result"]
    assert again["status"] == "skipped"
    assert [h["name"] for h in JobRecords(r, "ft").recent()] == ["finetune"] * 3


def test_during_a_drift_episode_the_job_learns_from_the_episodes_traffic_not_a_backlog(setup, engine):
    import time

    from jobs.rollout_store import RolloutStore

    settings, registry, champion = setup
    r = redis.Redis.from_url(settings.redis.url)
    write_samples(r, "ft", shadow_records(engine, KNOWN, 3, offset=60))  # served before the drift
    time.sleep(0.05)
    store = RolloutStore(r, "ft")
    store.save({"drift": {"since": time.time() + settings.adapt.drift_lookback_s, "shadow_rate": 0.05}})
    time.sleep(0.05)
    try:
        write_samples(r, "ft", shadow_records(engine, SHIFTED, 14, offset=60))
        res = run_job(settings, "finetune")["result"]
    finally:
        store.save({})
    assert res["skipped_before_drift"] == 9 and res["samples"] == 42, json.dumps(res)
    # the mixture is recorded: all 42 came within the lookback, none after the episode's start
    assert res["episode_samples"] == 0
    assert r.xpending(Keys("ft").shadow_samples, GROUP)["pending"] == 0 and available(sample_reader(r, "ft")) == 0


def test_scheduler_sigkilled_mid_finetune_runs_it_again_once_and_registers_once(redis_url, mlflow_uri, loaded,
                                                                                 engine, tmp_path):
    """The scheduler lives in the active monitor process: `shadowgate monitor run`."""
    import os
    import signal
    import subprocess
    import time

    import yaml

    from tests.support import spawn_shadowgate, wait_until

    registry = PredictorRegistry(mlflow_uri, "kill-predictor")
    folder = narrow_predictor(loaded, KNOWN, tmp_path / "narrow", per_family=60, epochs=10)
    registry.set_alias("champion", registry.register(folder, tags={"families": ",".join(KNOWN)}))
    r = redis.Redis.from_url(redis_url)
    write_samples(r, "kill", shadow_records(engine, SHIFTED, 20))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "redis": {"url": redis_url, "prefix": "kill"},
        "mlflow": {"tracking_uri": mlflow_uri, "registered_model": "kill-predictor"},
        "monitor": {"lease_ttl_s": 2, "poll_ms": 100},
        "jobs": {"finetune_every_s": 1, "rollout_every_s": 60, "lock_ttl_s": 2},
        # long enough training that the kill lands in it
        "adapt": {"min_samples": 40, "replay_per_family": 20, "epochs": 400, "patience": 400, "min_gain": 0.0,
                  "max_forget": 10.0}}))
    records = JobRecords(r, "kill")
    log = tmp_path / "monitor.log"

    def start():
        return spawn_shadowgate("monitor", "run", "--config", str(cfg), log=log)

    first = start()
    try:
        phase = lambda: json.loads(r.hget(records.running, "finetune") or "{}").get("phase")  # noqa: E731
        wait_until(lambda: phase() == "training", 120, interval=0.05, what="the fine-tune training", proc=first,
                   detail=lambda: log.read_text()[-2000:])
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        # the rerun needs no long training to prove it runs once: early stopping keeps a busy machine in time
        short = yaml.safe_load(cfg.read_text())
        short["adapt"].update(patience=10)
        cfg.write_text(yaml.safe_dump(short))
        second = start()
        try:
            done = lambda: [h for h in records.recent(name="finetune") if h["trigger"] == "recovery"]  # noqa: E731
            rec = wait_until(done, 240, what="the recovery run", proc=second, detail=lambda: log.read_text()[-3000:])[0]
            time.sleep(3)  # scheduled runs after it find nothing new
            hist = records.recent(name="finetune")
        finally:
            second.terminate()
            try:
                second.wait(60)
            except subprocess.TimeoutExpired:  # a job still running holds the process: do not hide the failure
                second.kill()
    finally:
        if first.poll() is None:
            first.kill()
    assert rec["status"] == "ok" and rec["result"]["status"] == "registered", rec
    assert [h["status"] for h in hist].count("interrupted") == 1
    assert sum(1 for h in hist if (h.get("result") or {}).get("status") == "registered") == 1
    assert len(registry.versions(tag="source", value="finetune")) == 1
    assert r.xpending(Keys("kill").shadow_samples, GROUP)["pending"] == 0


def test_a_refit_that_does_worse_than_the_gated_weights_is_not_registered(setup, engine, monkeypatch):
    """The refit (train + held-out data, the first fit's epoch count) is measured too: one
    that does worse on the held-out samples than the weights the gate passed is dropped, and
    the gated weights are registered."""
    import torch
    from safetensors.torch import load_file

    import jobs.finetune as finetune

    settings, registry, champion = setup
    r = redis.Redis.from_url(settings.redis.url)
    real, broken = finetune._fit, {}

    def fit(champ, train_all, cfg, epochs=None, select_with=None, seed=0):
        module, metrics, tcfg, train = real(champ, train_all, cfg, epochs=epochs, select_with=select_with, seed=seed)
        if epochs is not None:  # the refit: weights that rank units at random
            gen = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for prm in module.parameters():
                    prm.copy_(torch.randn(prm.shape, generator=gen))
            broken.update({k: v.clone() for k, v in module.state_dict().items()})
        return module, metrics, tcfg, train

    monkeypatch.setattr(finetune, "_fit", fit)
    write_samples(r, "ft", shadow_records(engine, SHIFTED, 44, offset=90))
    res = run_job(settings, "finetune")["result"]
    assert res["status"] == "registered", json.dumps(res)
    assert res["refit"]["kept"] is False and res["refit"]["holdout_kl"] > res["candidate_holdout_kl"]
    weights = load_file(str(registry.download(res["version"]) / "predictor.safetensors"))
    assert broken and not all(torch.equal(weights[k], v) for k, v in broken.items() if k in weights)
    assert registry.client.get_run(res["run_id"]).data.params["refit_kept"] == "False"
