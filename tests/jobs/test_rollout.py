"""The rollout controller against a real Redis and a real MLflow server: approval by alias
or tag, canary on the monitor's windows, promotion, automatic rollback, reconciliation, the
operator's rollback, and the scheduler that runs it (recovery of an interrupted job, a
failing job alerts)."""

from __future__ import annotations

import json
import time

import pytest
import redis

from jobs.approval import sign, verify
from jobs.registry import PredictorRegistry
from jobs.rollout import Controller
from jobs.rollout_store import RolloutStore
from jobs.runner import JobRecords, run_job
from jobs.scheduler import Scheduler
from monitor.alerts import AlertStore
from monitor.keys import Keys
from monitor.state import ControlDefaults, ControlStore, ControlUpdate
from serving.settings import load_settings
from tests.support import Receiver, free_port, wait_until

pytestmark = pytest.mark.service
KEYS = Keys("ro")


@pytest.fixture(scope="module")
def env(redis_url, mlflow_uri, loaded, tmp_path_factory):
    from jobs.bootstrap import shipped_predictor, with_reference

    settings = load_settings(None, redis={"url": redis_url, "prefix": "ro"},
                             mlflow={"tracking_uri": mlflow_uri, "registered_model": "ro-predictor"},
                             canary={"share": 0.3, "min_samples": 10, "timeout_s": 600, "margin": 0.02},
                             monitor={"slo": {"min_samples": 8}}, jobs={"rollout_every_s": 0.5})
    registry = PredictorRegistry(mlflow_uri, "ro-predictor")
    folder = with_reference(shipped_predictor("default", loaded.runtime), loaded,
                            tmp_path_factory.mktemp("ref"), per_family=10)
    versions = [registry.register(folder, tags={"source": f"test-{i}"}) for i in range(4)]
    registry.set_alias("champion", versions[0])
    r = redis.Redis.from_url(redis_url)
    ControlStore(r, "ro").ensure(ControlDefaults(shadow_rate=0.05))
    return settings, registry, versions, r, folder


def rows(r, version, arm, n, kl, top1, generation):
    key = KEYS.monitor_window(version, arm)
    for i in range(n):
        r.rpush(key, json.dumps({"sample_id": f"{version}-{arm}-{generation}-{i}", "kl_mean": kl, "top1": top1,
                                 "exact_match": top1 == 1.0, "generation": generation}))


def test_signed_webhook_deliveries_only():
    body = json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": "m", "alias": "approved", "version": "2"}})
    ts = str(int(time.time()))
    sig = sign("s3cret", "d-1", ts, body)
    assert verify("s3cret", "d-1", ts, body.encode(), sig) is None
    assert "does not match" in verify("other", "d-1", ts, body.encode(), sig)
    assert "does not match" in verify("s3cret", "d-2", ts, body.encode(), sig)  # id is signed too
    old = str(int(time.time()) - 3600)
    assert "replay" in verify("s3cret", "d-1", old, body.encode(), sign("s3cret", "d-1", old, body))
    assert "missing" in verify("s3cret", None, ts, body.encode(), sig)


def test_approved_good_challenger_is_canaried_and_promoted(env):
    settings, registry, (v1, v2, v3, v4), r, folder = env
    ctl = Controller(settings, r, registry)
    assert ctl.tick()["phase"] == "idle"  # nothing approved: nothing happens
    registry.set_alias("approved", v2)
    out = ctl.tick()
    assert [d["decision"] for d in out["decisions"]] == ["canary_started"]
    state = ControlStore(r, "ro").get()
    assert state.challenger == v2 and state.canary_share == 0.3 and state.shadow_rate == 0.5
    canary = RolloutStore(r, "ro").state()["canary"]
    gen = canary["generation"]
    rows(r, v1, "champion", 30, 0.10, 0.90, gen - 1)  # served before the canary: not evidence
    rows(r, v2, "challenger", 9, 0.09, 0.91, gen)
    rows(r, v1, "champion", 12, 0.10, 0.90, gen)
    assert ctl.tick()["decisions"] == []  # 9 < canary.min_samples challenger samples
    rows(r, v2, "challenger", 3, 0.09, 0.91, gen)
    out = ctl.tick()["decisions"]
    assert [d["decision"] for d in out] == ["promoted"]
    ev = out[0]["evidence"]
    assert ev["challenger"]["count"] == 12 and ev["champion"]["count"] == 12
    assert registry.aliases()["champion"] == v2
    assert "retired" in registry.version(v1).tags and "promoted_at" in registry.version(v2).tags
    state = ControlStore(r, "ro").get()
    assert state.champion == v2 and state.challenger is None and state.canary_share == 0.0
    assert state.shadow_rate == 0.05  # back to its value
    promo = AlertStore(r, "ro", settings.alerts).list(kind="promotion")
    assert promo and promo[0].predictor_version == v2 and promo[0].evidence["previous"] == v1
    assert ctl.tick()["decisions"] == []  # the promoted version is not canaried again


def test_challenger_breaking_the_slo_is_rolled_back_at_once_and_not_served(env):
    settings, registry, (v1, v2, v3, v4), r, folder = env
    ctl = Controller(settings, r, registry)
    registry.set_tag(v3, "approval", "approved")  # the tag approves too
    assert [d["decision"] for d in ctl.tick()["decisions"]] == ["canary_started"]
    gen = RolloutStore(r, "ro").state()["canary"]["generation"]
    rows(r, v3, "challenger", 8, 1.7, 0.45, gen)  # min(slo.min_samples, canary.min_samples) = 8
    out = ctl.tick()["decisions"]
    assert [d["decision"] for d in out] == ["rolled_back"] and "broke the SLO" in out[0]["evidence"]["reason"]
    state = ControlStore(r, "ro").get()
    assert state.challenger is None and state.canary_share == 0.0 and state.champion == v2
    assert "rolled_back" in registry.version(v3).tags
    alert = AlertStore(r, "ro", settings.alerts).list(kind="rollback")[0]
    assert alert.predictor_version == v3 and alert.evidence["challenger"]["kl_mean"] == pytest.approx(1.7)
    assert ctl.tick()["decisions"] == []  # still approved by tag, but decided: never canaried again
    assert ControlStore(r, "ro").get().challenger is None


def test_operator_rollback_and_reconcile(env):
    settings, registry, (v1, v2, v3, v4), r, folder = env
    ctl = Controller(settings, r, registry)
    store = RolloutStore(r, "ro")
    store.command({"action": "rollback", "reason": "x", "by": "test"})
    assert [d["decision"] for d in ctl.tick()["decisions"]] == ["rollback_refused"]
    registry.set_alias("approved", v4)
    ctl.tick()
    assert ControlStore(r, "ro").get().challenger == v4
    store.command({"action": "rollback", "reason": "looks odd", "by": "test"})
    out = ctl.tick()["decisions"]
    assert out[0]["decision"] == "rolled_back" and out[0]["evidence"]["reason"] == "operator: looks odd"
    assert "approved" not in registry.aliases() and ControlStore(r, "ro").get().challenger is None
    # someone wrote another champion into the state: the alias wins, and it is an alert
    ControlStore(r, "ro").update(ControlUpdate(champion=v1), by="someone")
    assert [d["decision"] for d in ctl.reconcile(registry.aliases())] == ["reconciled"]  # at a start
    assert ControlStore(r, "ro").get().champion == v2
    assert AlertStore(r, "ro", settings.alerts).list(kind="reconcile")[0].evidence["state_champion"] == v1
    status = ctl.status()
    assert status["champion"] == v2 and status["challenger"] is None and status["canary_share"] == 0.0
    assert status["fallback"] == "none" and status["decisions"][0]["decision"] == "reconciled"


def test_under_a_fallback_the_challenger_is_judged_on_the_slo_and_its_promotion_ends_it(env):
    settings, registry, (v1, v2, v3, v4), r, folder = env
    ctl = Controller(settings, r, registry)
    v5 = registry.register(folder, tags={"source": "test-5"})
    ControlStore(r, "ro").update(ControlUpdate(fallback="dense"), by="monitor")  # the champion broke
    registry.set_alias("approved", v5)
    assert [d["decision"] for d in ctl.tick()["decisions"]] == ["canary_started"]
    gen = RolloutStore(r, "ro").state()["canary"]["generation"]
    rows(r, v5, "challenger", 10, 0.08, 0.92, gen)  # the champion arm is dense: no window of its own
    out = ctl.tick()["decisions"]
    assert [d["decision"] for d in out] == ["promoted"] and out[0]["evidence"]["champion"]["count"] == 0
    state = ControlStore(r, "ro").get()
    assert state.champion == v5 and state.fallback == "none"


def test_scheduler_runs_the_controller_reruns_an_interrupted_job_and_alerts_a_failure(env):
    settings, registry, versions, r, _ = env
    records = JobRecords(r, "ro")
    r.hset(records.running, "finetune", json.dumps({"name": "finetune", "run_id": "dead", "trigger": "schedule",
                                                     "pid": 1, "started": time.time() - 60}))
    sched = Scheduler(settings)
    sched.start()
    try:
        wait_until(lambda: (records.recent(name="finetune") or [None])[0] and
                   records.recent(name="finetune")[0]["trigger"] == "recovery", 60, what="the recovery run")
        hist = records.recent(name="finetune")
        assert [h["status"] for h in hist[:2]] == ["ok", "interrupted"] and hist[1]["run_id"] == "dead"
        assert not r.hexists(records.running, "finetune")
        wait_until(lambda: json.loads(r.hget(records.last, "rollout") or "{}").get("status") == "ok", 30,
                   what="a rollout run that ended ok")
        listing = {j["name"]: j for j in records.listing()}
        assert listing["rollout"]["next_run"] and listing["finetune"]["schedule"] == "every 3600 s"
    finally:
        sched.shutdown()
    broken = settings.model_copy(update={"mlflow": settings.mlflow.model_copy(
        update={"tracking_uri": "http://127.0.0.1:9"})})
    for _ in range(5):  # enough samples that the job asks the (unreachable) registry
        r.xadd(KEYS.shadow_samples, {"meta": "{}", "tensors": b""})
    broken = broken.model_copy(update={"adapt": broken.adapt.model_copy(update={"min_samples": 4}),
                                       "jobs": broken.jobs.model_copy(update={"registry_backoff_s": 0.05})})
    rec = run_job(broken, "finetune", client=r)
    assert rec["status"] == "failed" and rec["error"]
    fail = AlertStore(r, "ro", settings.alerts).list(kind="job_failure")[0]
    assert fail.evidence["job"] == "finetune" and fail.evidence["run_id"] == rec["run_id"]


def _broken_copy(folder, dest, how: str):
    import shutil

    shutil.copytree(folder, dest)
    if how == "corrupt":
        (dest / "predictor.safetensors").write_bytes(b"\x00garbage, not a safetensors header" * 10)
    else:  # built for another model
        cfg = json.loads((dest / "predictor.json").read_text())
        cfg["model_fingerprint"] = "0" * len(cfg["model_fingerprint"])
        (dest / "predictor.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize("how", ["corrupt", "mismatched"])
def test_an_approved_corrupt_or_mismatched_artifact_is_refused_before_its_canary(env, how, tmp_path):
    settings, registry, versions, r, folder = env
    store, control = RolloutStore(r, "ro"), ControlStore(r, "ro")
    champion = registry.aliases()["champion"]
    bad = registry.register(_broken_copy(folder, tmp_path / how, how), tags={"source": how})
    registry.set_alias("approved", bad)
    before = control.get()
    out = Controller(settings, r, registry).tick()
    refused = [d for d in out["decisions"] if d["decision"] == "refused"]
    assert [d["version"] for d in refused] == [bad] and out["phase"] == "idle"
    after = control.get()
    assert after.challenger is None and after.canary_share == 0.0 and after.generation == before.generation
    assert registry.aliases()["champion"] == champion and "approved" not in registry.aliases()
    assert registry.version(bad).tags["refused"]
    alert = AlertStore(r, "ro", settings.alerts).list(kind="rollback")[0]
    assert alert.predictor_version == bad and alert.evidence["refused"] is True
    assert ("Safetensor" in alert.evidence["reason"] or "header" in alert.evidence["reason"]) if how == "corrupt" \
        else "built for model" in alert.evidence["reason"]
    assert Controller(settings, r, registry).tick()["decisions"] == []  # decided: not tried again


def test_registry_calls_retry_with_backoff_then_fail(mlflow_uri, caplog):
    """A server that answers 503 twice, then is MLflow again: the call succeeds on the third
    try; a dead server: RegistryUnavailable after the bounded waits."""
    import httpx

    from jobs.registry import Retry, RegistryUnavailable

    def proxy(req):  # MLflow again
        resp = httpx.request(req["method"], mlflow_uri + req["path"], content=req["body"],
                             headers={"content-type": req["headers"].get("content-type", "application/json")})
        return resp.status_code, {"content-type": resp.headers.get("content-type", "application/json")}, resp.content

    with Receiver(respond=proxy) as flaky_server:
        flaky_server.statuses = [503, 503]
        flaky = PredictorRegistry(flaky_server.url, "ro-predictor", retry=Retry(4, 0.2, 1.0))
        t0 = time.monotonic()
        got = flaky.aliases()
        waited = time.monotonic() - t0
    # the client's own HTTP retry takes one 503, our backoff (0.2 s first) the other
    assert [q["status"] for q in flaky_server.requests][:2] == [503, 503] and len(flaky_server.requests) >= 3
    assert waited >= 0.2
    assert got == PredictorRegistry(mlflow_uri, "ro-predictor").aliases() and got["champion"]  # what MLflow holds
    dead = PredictorRegistry(f"http://127.0.0.1:{free_port()}", "ro-predictor", retry=Retry(3, 0.1, 1.0))
    t0 = time.monotonic()
    with pytest.raises(RegistryUnavailable, match="failed 3 times"):
        dead.client.get_registered_model("ro-predictor")
    assert 0.3 <= time.monotonic() - t0 < 5  # 0.1 + 0.2 s of backoff, bounded


def _approve_and_start(ctl, registry, r, folder, source):
    v = registry.register(folder, tags={"source": source})
    registry.set_alias("approved", v)
    assert [d["decision"] for d in ctl.tick()["decisions"]] == ["canary_started"]
    canary = RolloutStore(r, "ro").state()["canary"]
    return v, canary["champion"], canary["generation"]


def _noisy(r, version, arm, n, top1_values, generation, kl=0.05):
    key = KEYS.monitor_window(version, arm)
    for i in range(n):
        r.rpush(key, json.dumps({"sample_id": f"{version}-{arm}-{generation}-n{i}", "kl_mean": kl,
                                 "top1": top1_values[i % len(top1_values)], "exact_match": False,
                                 "generation": generation}))


def test_the_canary_waits_for_a_confident_difference_then_rolls_a_worse_challenger_back(env):
    """Champion 0.95 top-1, challenger 0.85 on noisy samples: after 10 samples the 95% bound
    of the difference still reaches above -margin (undecided), after 40 it does not."""
    settings, registry, versions, r, folder = env
    ctl = Controller(settings, r, registry)
    v, champion, gen = _approve_and_start(ctl, registry, r, folder, "test-noisy-worse")
    _noisy(r, champion, "champion", 30, [1.0, 0.9], gen)
    _noisy(r, v, "challenger", 10, [1.0, 0.7], gen)
    assert ctl.tick()["decisions"] == []  # -0.10 +- 0.11: could still be within the margin
    ev = ctl.evidence(RolloutStore(r, "ro").state()["canary"])
    d = ev["top1_difference"]
    assert d["estimate"] == pytest.approx(-0.10) and d["lower"] < -0.02 < d["upper"]
    _noisy(r, v, "challenger", 30, [1.0, 0.7], gen)
    out = ctl.tick()["decisions"]
    assert [x["decision"] for x in out] == ["rolled_back"], out
    assert "upper bound" in out[0]["evidence"]["reason"] and out[0]["evidence"]["top1_difference"]["upper"] < -0.02
    assert ControlStore(r, "ro").get().challenger is None and registry.aliases()["champion"] == champion


def test_a_noisy_equal_challenger_is_promoted_once_the_bound_clears_the_margin(env):
    settings, registry, versions, r, folder = env
    ctl = Controller(settings, r, registry)
    v, champion, gen = _approve_and_start(ctl, registry, r, folder, "test-noisy-equal")
    _noisy(r, champion, "champion", 12, [1.0, 0.8], gen)
    _noisy(r, v, "challenger", 12, [0.8, 1.0], gen)
    assert ctl.tick()["decisions"] == []  # 0 +- 0.07: not yet shown within 0.02
    _noisy(r, champion, "champion", 400, [1.0, 0.8], gen)
    _noisy(r, v, "challenger", 400, [0.8, 1.0], gen)
    out = ctl.tick()["decisions"]
    assert [x["decision"] for x in out] == ["promoted"]
    assert out[0]["evidence"]["top1_difference"]["lower"] >= -0.02
    assert registry.aliases()["champion"] == v


def test_under_a_fallback_the_challenger_must_clear_the_slo_against_dense_with_the_bound(env):
    """Against the dense outputs: top-1 0.82 on noisy samples is above the SLO's 0.8, but
    after 10 samples its lower bound is not; after 410 it is, and it is promoted."""
    settings, registry, versions, r, folder = env
    ctl = Controller(settings, r, registry)
    ControlStore(r, "ro").update(ControlUpdate(fallback="dense"), by="monitor")
    v, champion, gen = _approve_and_start(ctl, registry, r, folder, "test-fallback-bound")
    _noisy(r, v, "challenger", 10, [1.0, 0.64], gen)
    assert ctl.tick()["decisions"] == []
    ev = ctl.evidence(RolloutStore(r, "ro").state()["canary"])
    assert ev["challenger_top1"]["estimate"] == pytest.approx(0.82) and ev["challenger_top1"]["lower"] < 0.8
    _noisy(r, v, "challenger", 400, [1.0, 0.64], gen)
    out = ctl.tick()["decisions"]
    assert [x["decision"] for x in out] == ["promoted"] and out[0]["evidence"]["against"] == "dense"
    assert out[0]["evidence"]["challenger_top1"]["lower"] >= 0.8
    assert ControlStore(r, "ro").get().fallback == "none"


class _Soon:
    def __init__(self):
        self.calls = []

    def __call__(self, name):
        self.calls.append(name)


def test_early_finetunes_continue_while_the_drift_episode_has_not_met_the_target(env):
    settings, registry, versions, r, folder = env
    soon = _Soon()
    fast = settings.model_copy(update={"adapt": settings.adapt.model_copy(update={"min_samples": 4,
                                                                                   "early_retry_s": 0.01})})
    ctl = Controller(fast, r, registry, run_soon=soon)
    store = RolloutStore(r, "ro")
    champion = ControlStore(r, "ro").get().champion or registry.aliases()["champion"]
    ControlStore(r, "ro").update(ControlUpdate(champion=champion), by="test")
    r.delete(KEYS.shadow_samples)
    for _ in range(6):
        r.xadd(KEYS.shadow_samples, {"meta": "{}", "tensors": b""})
    r.hset(KEYS.monitor_drift, champion, json.dumps({"drift": True, "run_id": "d1"}))
    names = [d["decision"] for d in ctl.drift()]
    assert names == ["drift_shadow_rate", "finetune_early"] and soon.calls == ["finetune"]
    # a candidate short of the target awaits approval: no second run meanwhile
    store.decide("candidate", "c1", {"target_met": False}, by="finetune")
    assert ctl.drift() == [] and soon.calls == ["finetune"]
    # promoted, the drift check of the new champion is clear, but the target was not met:
    # the episode goes on and the job runs again
    store.decide("promoted", "c1", {})
    r.hset(KEYS.monitor_drift, champion, json.dumps({"drift": False}))
    time.sleep(0.02)
    assert [d["decision"] for d in ctl.drift()] == ["finetune_early"] and soon.calls == ["finetune"] * 2
    assert store.recent(1)[0]["evidence"]["drifting"] is False
    # a candidate that met it, promoted: the episode ends and the shadow rate is restored
    store.decide("candidate", "c2", {"target_met": True}, by="finetune")
    store.decide("promoted", "c2", {})
    out = ctl.drift()
    assert [d["decision"] for d in out] == ["drift_ended"] and out[0]["evidence"]["target_met"] is True
    assert soon.calls == ["finetune"] * 2 and "drift" not in store.state()
    r.hdel(KEYS.monitor_drift, champion)


def test_a_champion_promoted_in_a_drift_episode_that_drifts_itself_begins_a_new_episode(env):
    """A second switch of the traffic: the episode's own promoted champion reports drift. The
    next fine-tune must read the new traffic (a new `since`), with its own early runs."""
    settings, registry, versions, r, folder = env
    soon = _Soon()
    fast = settings.model_copy(update={"adapt": settings.adapt.model_copy(update={"min_samples": 4,
                                                                                   "early_retry_s": 0.01,
                                                                                   "early_max_runs": 1})})
    ctl = Controller(fast, r, registry, run_soon=soon)
    store = RolloutStore(r, "ro")
    champion = ControlStore(r, "ro").get().champion or registry.aliases()["champion"]
    new = next(v for v in versions if v != champion)
    ControlStore(r, "ro").update(ControlUpdate(champion=champion), by="test")
    r.delete(KEYS.shadow_samples)
    for _ in range(6):
        r.xadd(KEYS.shadow_samples, {"meta": "{}", "tensors": b""})
    r.hset(KEYS.monitor_drift, champion, json.dumps({"drift": True, "run_id": "d1"}))
    try:
        assert [d["decision"] for d in ctl.drift()] == ["drift_shadow_rate", "finetune_early"]
        first = store.state()["drift"]
        assert first["episode"] == 1 and first["champion"] == champion
        # its candidate is promoted short of the target; the new champion is not drifting yet:
        # the episode goes on, its one early run spent
        store.decide("candidate", new, {"target_met": False}, by="finetune")
        store.decide("promoted", new, {})
        ControlStore(r, "ro").update(ControlUpdate(champion=new), by="test")
        time.sleep(0.02)
        assert ctl.drift() == [] and soon.calls == ["finetune"]
        # the traffic moves again: c1's own drift check says drift -> episode 2, run again
        r.hset(KEYS.monitor_drift, new, json.dumps({"drift": True, "run_id": "d2"}))
        out = ctl.drift()
        assert [d["decision"] for d in out] == ["drift_episode", "finetune_early"], out
        second = store.state()["drift"]
        assert second["episode"] == 2 and second["champion"] == new and second["since"] > first["since"]
        assert second["early_runs"] == 1 and second["shadow_rate"] == first["shadow_rate"]
        assert soon.calls == ["finetune"] * 2
        # the same champion drifting on is the same episode
        time.sleep(0.02)
        assert ctl.drift() == [] and store.state()["drift"]["episode"] == 2
    finally:
        ControlStore(r, "ro").update(ControlUpdate(champion=champion), by="test")
        r.hdel(KEYS.monitor_drift, champion, new)
        store.save({})
