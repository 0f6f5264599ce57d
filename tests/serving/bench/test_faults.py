"""Faults under a steady client load on one private stack (real redis-server with AOF, real
MLflow server, real Ray): the scenarios of `shadowgate bench faults`, with shorter outages.
Figures and the goals they are held to are in docs/RELIABILITY.md."""

from __future__ import annotations

import pytest

from serving.bench import faults as bench

# 5.5 min on 2 idle cores, 7-11 min on 2 shared ones (a private stack, a replica replaced,
# Redis and MLflow restarted): run with -m faults (or -m slow)
pytestmark = [pytest.mark.service, pytest.mark.slow, pytest.mark.faults]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from serving.ops.stack import private_stack

    work = tmp_path_factory.mktemp("faults")
    with private_stack(work / "stack", **bench.stack_overrides()) as stack:
        load = bench.Load(stack, clients=4).start()
        try:
            yield stack, load, work
        finally:
            load.stop()


def test_replica_sigkill_loses_few_requests_and_recovers(env):
    stack, load, _ = env
    res = bench.replica_kill(stack, load, settle_s=3.0)
    assert res["requests"] > 0 and res["recovery_s"] is not None, res
    # goal: served again within 30 s. Two replicas: the survivor takes every request at once
    # (measured 4.6 s on a loaded machine: the gateway's retry, then one request's latency)
    assert res["served_again_s"] is not None and res["served_again_s"] < 15, res
    # the replacement itself: 31-58 s measured under load (docs/RELIABILITY.md), most of it a
    # new Ray worker importing torch, transformers and Ray Serve on 2 shared cores
    assert res["recovery_s"] < 120, res
    assert res["failed_pct"] <= 5.0, res  # goal: 0.5 % (0 failed in every run measured)


def test_redis_sigkill_and_restart_loses_nothing_acknowledged(env):
    stack, load, _ = env
    res = bench.redis_kill(stack, load, down_s=3.0, settle_s=3.0)
    assert res["failed"] == 0, res
    assert res["acknowledged"]["probe_entries"] > 0 and res["acknowledged"]["alerts"] > 0
    assert res["lost"] == {"shadow_samples": 0, "alerts": 0, "probe_entries": 0}, \
        (res["lost"], res["lost_written_after_kill_s"], res["probe_writer_stuck"])
    assert res["put_status"] == 200 and res["epoch_kept"], res
    # every replica serves the PUT's generation or a later one of the same document (the
    # monitor may pull the fallback lever meanwhile: `later_writes`)
    assert res["followed_after_restart_s"] is not None and res["followed_after_restart_s"] < 5.0, res


def test_mlflow_outage_serves_on_jobs_retry_and_alert_and_a_fallback_applies(env):
    stack, load, _ = env
    # SIGKILL: the server refuses at once (a graceful stop leaves requests hanging until
    # MLflow's 10 s request timeout, per try: docs/RELIABILITY.md)
    res = bench.mlflow_outage(stack, load, down_s=20.0, settle_s=2.0, how="kill")
    assert res["failed"] == 0, res
    assert res["fallback"]["put_status"] == 200 and res["fallback"]["served_s"] is not None
    assert res["job_failure_alert_after_s"] is not None and "failed 5 times" in res["job_failure_message"]
    assert res["job_ok_after_restart_s"] is not None


def test_corrupt_and_mismatched_artifacts_are_refused_and_the_champion_kept(env):
    stack, load, work = env
    res = bench.bad_artifact(stack, load, work)
    for how in ("corrupt", "mismatched"):
        r = res["approved"][how]
        assert r["decision"] == "refused" and r["alert"], r
        assert r["challenger_after"] is None and r["champion_alias"] == res["champion"]
    # the forced state names the champion without a fallback (the monitor's lever would have
    # the champion's arm serve dense): every response of it names the champion's version
    forced = res["forced_challenger"]
    assert forced["put_status"] == 200 and forced["applied_by_every_replica"], forced
    assert forced["responses"] > 0, forced
    assert forced["served_by_bad"] == 0 and forced["served_by_champion"] == forced["responses"], forced
    assert res["failed"] == 0
