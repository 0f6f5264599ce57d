"""What the benchmarks and scenarios share: a sequential client of the real HTTP API that
counts failures (`Driver`), prompts from the task suite, polling with a deadline, bearer-key
clients, and the record of the machine a report was measured on."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field

import httpx

from adapter.embedded import suite as tasks


def bearer(key: str) -> dict[str, str]:
    """The request headers that authenticate with `key` (an API or the admin key)."""
    return {"Authorization": f"Bearer {key}"}


def bearer_client(base: str, key: str, timeout: float) -> httpx.Client:
    return httpx.Client(base_url=base, headers=bearer(key), timeout=timeout)


@dataclass
class Driver:
    """Sequential completions through the real HTTP API, counting failures."""

    client: httpx.Client
    admin: httpx.Client
    max_tokens: int = 4
    requests: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def complete(self, prompt: str, **extra) -> dict | None:
        self.requests += 1
        try:
            r = self.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": self.max_tokens,
                                                          "temperature": 0, **extra})
        except httpx.HTTPError as exc:
            self.failed += 1
            self.errors.append(type(exc).__name__)
            return None
        if r.status_code != 200:
            self.failed += 1
            self.errors.append(f"{r.status_code}: {r.text[:120]}")
            return None
        return r.json()

    def put_state(self, **change) -> dict:
        r = self.admin.put("/admin/state", json=change)
        r.raise_for_status()
        gen = r.json()["state"]["generation"]
        deadline = time.time() + 30
        while time.time() < deadline:  # every replica serves it
            reps = self.admin.get("/admin/state").json()["replicas"]
            if reps and all(rep["generation"] >= gen for rep in reps):
                return r.json()["state"]
            time.sleep(0.2)
        raise RuntimeError(f"replicas did not converge on generation {gen}")

    def alerts(self, kind: str) -> list[dict]:
        return self.admin.get("/admin/alerts", params={"kind": kind, "limit": 1000}).json()["alerts"]

    def monitor(self) -> dict:
        return self.admin.get("/admin/monitor").json()

    def window(self, version: str, arm: str = "champion") -> dict | None:
        summary = self.monitor()["summary"] or {}
        return next((w for w in summary.get("windows", []) if w["version"] == version and w["arm"] == arm), None)


def suite_prompts(split: str, families: list[str] | None, n: int, offset: int = 0) -> list[str]:
    """n prompts of a suite split (`families` only, or every family), skipping `offset` first."""
    per = n // (len(families) if families else len(tasks.FAMILIES)) + 1 + offset
    out = [i.prompt for i in tasks.split(split, per) if families is None or i.family in families]
    return out[offset:offset + n]


def wait_until(fn, timeout: float, interval: float = 0.25):
    """Call `fn` every `interval` s until it returns something true (returned) or `timeout`
    s have passed (None)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = fn()
        if out:
            return out
        time.sleep(interval)
    return None


def machine() -> dict:
    """The machine a report was measured on."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
