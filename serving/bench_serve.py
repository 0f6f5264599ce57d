"""`shadowgate bench serve`: drives the running service over HTTP.

For each shadow rate (set through the admin API, restored afterwards) and each concurrency
level: `requests` completions, measured from the client: throughput (requests/s and
completion tokens/s), p50/p99 latency and failed requests; plus the shadow path's sampled
and dropped counts from /metrics.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np

PROMPTS = ["3 + 4 = 7 ; 2 + 5 = 7 ; 9 + 9 = 8 ; 1 + 0 = 1 ; 6 + 2 = 8 ; 4 + 4 =",
           "the cat sees the dog ; the dog sees the", "a b c ; b c d ; c d e ; d e"]


def _counter(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.split()[-1])
    return total


async def _level(client: httpx.AsyncClient, headers: dict, concurrency: int, requests: int,
                 max_tokens: int) -> dict:
    latencies, failed, tokens = [], 0, 0
    queue = list(range(requests))

    async def worker():
        nonlocal failed, tokens
        while queue:
            i = queue.pop()
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/completions", headers=headers,
                                      json={"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                                            "temperature": 0})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            if ok:
                tokens += r.json()["usage"]["completion_tokens"]
            else:
                failed += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": requests, "failed": failed,
            "throughput_rps": round(requests / wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1)}


async def run(base: str, api_key: str, admin_key: str, concurrencies=(1, 4, 16), rates=(0.0, 0.05),
              requests: int = 64, max_tokens: int = 8) -> dict:
    headers, admin = {"Authorization": f"Bearer {api_key}"}, {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        r = await client.get("/admin/state", headers=admin)
        r.raise_for_status()
        original = r.json()["state"]["shadow_rate"]
        results = []
        try:
            for rate in rates:
                (await client.put("/admin/state", headers=admin, json={"shadow_rate": rate})).raise_for_status()
                await asyncio.sleep(1.5)  # every replica follows the new generation
                await _level(client, headers, 1, 4, max_tokens)  # warm
                for c in concurrencies:
                    m0 = (await client.get("/metrics")).text
                    row = await _level(client, headers, c, max(requests, c), max_tokens)
                    m1 = (await client.get("/metrics")).text
                    row["shadow_rate"] = rate
                    row["shadow_sampled"] = int(_counter(m1, "shadowgate_shadow_sampled_total")
                                                - _counter(m0, "shadowgate_shadow_sampled_total"))
                    row["shadow_dropped"] = int(_counter(m1, "shadowgate_shadow_dropped_total")
                                                - _counter(m0, "shadowgate_shadow_dropped_total"))
                    results.append(row)
        finally:
            await client.put("/admin/state", headers=admin, json={"shadow_rate": original})
    return {"url": base, "max_tokens": max_tokens, "results": results}
