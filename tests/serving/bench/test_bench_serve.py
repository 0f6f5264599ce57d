"""bench serve's pure parts: distinct suite prompts, the per-request time breakdown from two
snapshots of the replicas' counters, throughput ratios against dense."""

from __future__ import annotations

import pytest

from adapter.embedded.suite import split
from serving.bench.serve import ReplicaTiming, ratios, suite_prompts


def test_prompts_are_distinct_and_from_the_test_split():
    prompts = suite_prompts(240)
    assert len(prompts) == len(set(prompts)) == 240
    assert set(prompts) <= {inst.prompt for inst in split("test", 40)}


def snapshot(requests, replica_ms, steps, batch_sum, **ms):
    return {"requests": requests, "replica_ms": replica_ms, "steps": steps, "batch_sum": batch_sum,
            "ms": {k: ms.get(k, 0.0) for k in ("queue", "prefill", "decode", "detokenize", "finish")}}


def test_per_request_breakdown_is_the_difference_over_the_level_per_request():
    before = snapshot(10, 1000.0, 50, 60, queue=5.0, prefill=100.0, decode=400.0, finish=20.0)
    after = snapshot(30, 3000.0, 90, 220, queue=45.0, prefill=300.0, decode=1600.0, finish=60.0)
    before["gather_hits"], after["gather_hits"], after["gather_misses"] = 3, 8, 4
    row = ReplicaTiming.per_request({7: before}, {7: after}, client_ms=130.0)
    assert row["gather_hits"] == 5 and row["gather_misses"] == 4
    assert row["queue_ms"] == 2.0 and row["prefill_ms"] == 10.0 and row["decode_ms"] == 60.0
    assert row["finish_ms"] == 2.0 and row["replica_ms"] == 100.0
    assert row["gateway_and_hops_ms"] == 30.0 and row["decode_steps"] == 40 and row["mean_batch"] == 4.0
    assert row["plans"] == {"builds": 0, "ms_each": 0.0, "into_kept_memory": 0}  # a replica that publishes no plans yet
    before.update(plan_builds=2, plan_ms=100.0, plan_attn_union=10, plan_ffn_dense=10)
    after.update(plan_builds=6, plan_ms=500.0, plan_recycled=3, plan_attn_union=25, plan_attn_dense=15, plan_ffn_dense=40)
    plans = ReplicaTiming.per_request({7: before}, {7: after}, client_ms=130.0)["plans"]
    assert plans == {"builds": 4, "ms_each": 100.0, "into_kept_memory": 3, "attn": {"union": 0.5, "dense": 0.5},
                     "ffn": {"dense": 1.0}}
    assert ReplicaTiming.per_request(None, {7: after}, 1.0) is None
    assert ReplicaTiming.per_request({7: after}, {7: after}, 1.0) is None


def test_a_replica_gone_or_new_does_not_break_the_breakdown():
    """A replica that stopped publishing keeps its key until it expires, and vanishes from a
    later read; a replacement starts from zero: neither may turn a level's figures negative
    or empty (the null levels of earlier runs)."""
    old = snapshot(250, 90000.0, 900, 2000, prefill=50000.0)
    before = snapshot(10, 1000.0, 50, 60, queue=5.0, prefill=100.0, decode=400.0, finish=20.0)
    after = snapshot(30, 3000.0, 90, 220, queue=45.0, prefill=300.0, decode=1600.0, finish=60.0)
    row = ReplicaTiming.per_request({1: old, 7: before}, {7: after}, client_ms=130.0)
    assert row["prefill_ms"] == 10.0 and row["replica_ms"] == 100.0 and row["decode_steps"] == 40
    new = snapshot(4, 400.0, 8, 16, prefill=40.0)
    row = ReplicaTiming.per_request({7: before}, {7: after, 9: new}, client_ms=130.0)
    assert row["prefill_ms"] == (200.0 + 40.0) / 24 and row["decode_steps"] == 48


def test_ratios_are_medians_over_rounds_against_dense():
    rows = [{"concurrency": c, "sparsity": s, "throughput_rps": v}
            for c, s, v in [(1, 0.0, 10), (1, 0.5, 14), (1, 0.0, 12), (1, 0.5, 15), (1, 0.0, 11), (1, 0.5, 13),
                            (4, 0.0, 20), (4, 0.5, 18)]]
    assert ratios(rows) == [{"concurrency": 1, "sparsity": 0.5, "ratio": pytest.approx(14 / 11, abs=1e-3)},
                            {"concurrency": 4, "sparsity": 0.5, "ratio": 0.9}]
