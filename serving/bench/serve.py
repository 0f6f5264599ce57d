"""`shadowgate bench serve`: drives the running service over HTTP.

The same load runs against every sparsity in one run (the control state is switched between
them through the admin API and restored afterwards): for each concurrency level and each
sparsity, `requests` completions of distinct prompts drawn from the task suite's test split,
measured from the client: throughput (requests/s, completion tokens/s), p50/p99 latency,
failures, the effective sparsity the responses report, and the shadow path's sampled and
dropped counts from /metrics.

Where the time goes, per request: the GatedLLM replicas publish their decode loop's counters
to Redis every second (serving/replica/llm.py); the difference over a level, divided by its
requests, gives the mean ms a request spent queued for admission, in prefill, in decode
steps (a shared step's time split among its sequences), detokenizing, and finishing (mask
record and drift features), plus the replica's handler time; the client's mean latency
minus that handler time is the gateway, the proxy and the network (auth, validation, the
audit and feature writes it starts, the two Ray hops).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np

from adapter.runtime.gather import PLAN_KINDS, PLAN_LAYER_KEYS
from monitor.keys import Keys
from serving.bench.harness import bearer
from serving.replica.batcher import PHASES


def suite_prompts(n: int) -> list[str]:
    """n distinct prompts of the task suite's test split, every family in turn."""
    from adapter.embedded.suite import split

    per_family = max(1, -(-n // 6))
    out, seen = [], set()
    for inst in split("test", per_family):
        if inst.prompt not in seen:
            seen.add(inst.prompt)
            out.append(inst.prompt)
    return out[:n]


def save_bench_checkpoint(folder, arch: str = "llama-gqa") -> dict:
    """The decode-speed bench's model shape (random weights, vocab 32000, hidden 1024, 16
    layers: about 309 M parameters for llama-gqa) saved like a user's checkpoint, with the
    suite's word-level tokenizer (its ids are a prefix of the vocabulary; generated ids past
    it decode to no text, which does not matter for speed)."""
    from pathlib import Path

    from adapter.benchmarks.decode_speed import bench_model
    from adapter.embedded.recipe import build_tokenizer

    folder = Path(folder)
    model, info = bench_model(arch, quick=False)
    tok = build_tokenizer()
    model.config.pad_token_id, model.config.bos_token_id = tok.pad_token_id, tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return info


def _counter(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.split()[-1])
    return total


class ReplicaTiming:
    """The GatedLLM replicas' published decode-loop counters, per replica pid (None without
    Redis). A replica that is gone leaves its last snapshot for up to two minutes (the key's
    expiry), and a new one starts from zero, so a level's figures are the differences of the
    replicas alive at its end, each against its own earlier snapshot."""

    def __init__(self, redis_url: str | None, prefix: str):
        import redis

        self.r = redis.Redis.from_url(redis_url) if redis_url else None
        self.prefix = prefix

    def read(self) -> dict[int, dict] | None:
        if self.r is None:
            return None
        snaps = [json.loads(self.r.get(k) or "null") for k in self.r.scan_iter(Keys(self.prefix).llm_timing("*"))]
        return {int(s.get("pid", i)): s for i, s in enumerate(snaps) if s} or None

    @staticmethod
    def delta(before: dict[int, dict] | None, after: dict[int, dict] | None) -> dict | None:
        """The counters' growth between two reads, summed over the replicas in `after` (a
        replica not in `before` counts from zero; one gone since is left out)."""
        if before is None or after is None:
            return None
        counters = ("requests", "replica_ms", "steps", "batch_sum", "gather_hits", "gather_misses", "gather_faults",
                    "copy_faults", "gather_recycled", "plan_builds", "plan_ms", "plan_recycled",
                    *(f"plan_{k}" for k in PLAN_LAYER_KEYS))
        total = {**{k: 0 for k in counters}, "ms": {k: 0.0 for k in PHASES}}
        for pid, s in after.items():
            b = before.get(pid)
            for k in counters:  # .get: a replica of an older version publishes fewer
                total[k] += s.get(k, 0) - (b.get(k, 0) if b else 0)
            for k in PHASES:  # .get: a replica of an older version has fewer phases
                total["ms"][k] += s["ms"].get(k, 0.0) - (b["ms"].get(k, 0.0) if b else 0.0)
        return total

    @staticmethod
    def per_request(before: dict[int, dict] | None, after: dict[int, dict] | None, client_ms: float) -> dict | None:
        """Mean ms per request of each phase over a level (its requests only: the caller
        waits for the replicas' next publication on both sides)."""
        d = ReplicaTiming.delta(before, after)
        if d is None or d["requests"] <= 0:
            return None
        n = d["requests"]
        row = {f"{k}_ms": round(d["ms"][k] / n, 2) for k in PHASES}
        replica = d["replica_ms"] / n
        row["replica_ms"] = round(replica, 2)
        row["gateway_and_hops_ms"] = round(client_ms - replica, 2)
        row["client_ms"] = round(client_ms, 2)
        row["gather_hits"], row["gather_misses"] = d["gather_hits"], d["gather_misses"]  # mask copies found / made
        row["gather_faults"] = d["gather_faults"]  # minor page faults while prefills copied: fresh memory
        # every copy's (prefills' and those decode steps make), and copies made into kept memory
        row["copy_faults"], row["gather_recycled"] = d["copy_faults"], d["gather_recycled"]
        row["plans"] = plan_summary(d)
        row["decode_steps"] = d["steps"]
        row["mean_batch"] = round(d["batch_sum"] / d["steps"], 2) if d["steps"] else 0.0
        return row


def plan_summary(d: dict) -> dict:
    """The decode steps' plans built over a level (counter growth `d`): how many, ms each
    (their union copies included), how many made their copies into kept memory, and per part
    the share of gated layers run as each kind."""
    n = d["plan_builds"]
    out = {"builds": n, "ms_each": round(d["plan_ms"] / n, 1) if n else 0.0,
           "into_kept_memory": d["plan_recycled"]}  # plans whose union copies reused a union block
    for part in ("attn", "ffn"):
        counts = {kind: d[f"plan_{part}_{kind}"] for kind in PLAN_KINDS}
        if total := sum(counts.values()):
            out[part] = {kind: round(v / total, 3) for kind, v in counts.items() if v}
    return out


async def _published(timing: ReplicaTiming, before: dict | None, n: int, timeout: float = 6.0) -> dict | None:
    """The replicas' counters once they include a level's n requests (they publish every
    second; a busy replica can publish late), or the last read after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        await asyncio.sleep(1.2)
        after = await asyncio.to_thread(timing.read)
        grown = ReplicaTiming.delta(before, after)
        done = grown is None or grown["requests"] >= n
        if done or time.monotonic() > deadline:
            return after


async def _level(client: httpx.AsyncClient, headers: dict, prompts: list[str], concurrency: int, requests: int,
                 max_tokens: int) -> dict:
    latencies, failed, tokens, effective = [], 0, 0, []
    queue = list(range(requests))

    async def worker():
        nonlocal failed, tokens
        while queue:
            i = queue.pop(0)
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/completions", headers=headers,
                                      json={"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                                            "temperature": 0})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            if ok:
                body = r.json()
                tokens += body["usage"]["completion_tokens"]
                effective.append(body["shadowgate"]["effective_sparsity"])
            else:
                failed += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": requests, "failed": failed,
            "throughput_rps": round(requests / wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "mean_ms": float(lat.mean()),
            "effective_sparsity": round(float(np.mean(effective)), 4) if effective else None}


async def _set_state(client: httpx.AsyncClient, admin: dict, change: dict, timeout: float = 60.0) -> None:
    """Write the control state and wait until every replica serves its generation."""
    r = await client.put("/admin/state", headers=admin, json=change)
    r.raise_for_status()
    gen = r.json()["state"]["generation"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        reps = (await client.get("/admin/state", headers=admin)).json()["replicas"]
        if reps and all(rep["generation"] >= gen for rep in reps):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the replicas did not apply control generation {gen} within {timeout:.0f} s")


async def run(base: str, api_key: str, admin_key: str, concurrencies=(1, 4, 16), sparsities=(0.0, 0.5),
              requests: int = 64, max_tokens: int = 8, shadow_rate: float = 0.0, prompts: int = 240,
              rounds: int = 1, redis_url: str | None = None, prefix: str = "shadowgate",
              progress=lambda line: None) -> dict:
    """Rows per (round, concurrency, sparsity); the sparsities alternate inside each
    concurrency level, so the machine's drift hits them alike."""
    headers, admin = bearer(api_key), bearer(admin_key)
    texts = suite_prompts(prompts)
    timing = ReplicaTiming(redis_url, prefix)
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        r = await client.get("/admin/state", headers=admin)
        r.raise_for_status()
        original = {k: r.json()["state"][k] for k in ("shadow_rate", "sparsity")}
        results, offset = [], 0
        try:
            await _set_state(client, admin, {"shadow_rate": shadow_rate})
            top = max(concurrencies)
            for s in sparsities:  # warm every arm at the highest load it will see: predictor loaded,
                await _set_state(client, admin, {"sparsity": s})  # the memory of that many masks' gathers
                await _level(client, headers, texts[-max(4, top):], top, max(4, top), max_tokens)
            for rnd in range(rounds):
                for c in concurrencies:
                    n = max(requests, c)
                    for s in sparsities:
                        await _set_state(client, admin, {"sparsity": s})
                        # each level its own prompts: the same prompts for every sparsity
                        level_prompts = [texts[(offset + i) % len(texts)] for i in range(n)]
                        await asyncio.sleep(1.2)  # the replicas publish their counters every second
                        t_before = await asyncio.to_thread(timing.read)
                        m0 = (await client.get("/metrics", headers=admin)).text  # /metrics: admin key
                        row = await _level(client, headers, level_prompts, c, n, max_tokens)
                        m1 = (await client.get("/metrics", headers=admin)).text
                        t_after = await _published(timing, t_before, n)
                        row.update(round=rnd, sparsity=s, shadow_rate=shadow_rate,
                                   shadow_sampled=int(_counter(m1, "shadowgate_shadow_sampled_total")
                                                      - _counter(m0, "shadowgate_shadow_sampled_total")),
                                   shadow_dropped=int(_counter(m1, "shadowgate_shadow_dropped_total")
                                                      - _counter(m0, "shadowgate_shadow_dropped_total")),
                                   per_request=ReplicaTiming.per_request(t_before, t_after, row.pop("mean_ms")))
                        if row["per_request"] is None and t_before is not None and t_after is not None:
                            # why a level has no phases: what the replicas had published around it
                            row["timing_missing"] = {"requests_before": {p: v["requests"] for p, v in t_before.items()},
                                                     "requests_after": {p: v["requests"] for p, v in t_after.items()}}
                        results.append(row)
                        progress(f"round {rnd} concurrency {c} sparsity {s}: {row['throughput_rps']} req/s")
                    offset += n
        finally:
            await client.put("/admin/state", headers=admin, json=original)
    return {"url": base, "max_tokens": max_tokens, "prompts": len(texts), "prompt_source": "suite test split",
            "rounds": rounds, "results": results, "ratios": ratios(results)}


def ratios(results: list[dict]) -> list[dict]:
    """Throughput of each sparsity over sparsity 0 per concurrency (medians over rounds)."""
    by: dict[tuple[int, float], list[float]] = {}
    for r in results:
        by.setdefault((r["concurrency"], r["sparsity"]), []).append(r["throughput_rps"])
    out = []
    for (c, s), vals in sorted(by.items()):
        dense = by.get((c, 0.0))
        if s == 0.0 or not dense:
            continue
        out.append({"concurrency": c, "sparsity": s,
                    "ratio": round(float(np.median(vals)) / float(np.median(dense)), 3)})
    return out
