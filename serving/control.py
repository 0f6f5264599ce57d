"""The control state: one versioned JSON document in Redis, applied in place by every replica.

Everything that changes at run time (champion/challenger predictor versions, canary share,
sparsity, shadow rate, fallback) lives in one document with a generation number. A writer
(the admin API, a rollout controller) replaces it atomically with generation + 1 and
publishes the new generation; every replica applies it without a restart, on the
notification or, when one was missed (pub/sub is fire-and-forget), on the periodic
reconcile, and reports the generation it serves in a heartbeat hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from typing import Awaitable, Callable, Literal

import redis
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from serving.settings import ControlDefaults

log = logging.getLogger(__name__)


class ControlState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    generation: int = Field(1, ge=1)
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    shadow_rate: float = Field(0.05, ge=0.0, le=1.0)
    canary_share: float = Field(0.0, ge=0.0, le=1.0)
    fallback: Literal["none", "dense", "lower"] = "none"
    fallback_sparsity: float = Field(0.25, ge=0.0, lt=1.0, description="ceiling when fallback is 'lower'")
    champion: str | None = None  # a registry version; None: whatever alias 'champion' names
    challenger: str | None = None  # a registry version served to canary_share of requests
    updated_at: float = 0.0
    updated_by: str = "defaults"


class ControlUpdate(BaseModel):
    """A PUT body: any subset of the live fields."""

    model_config = ConfigDict(extra="forbid")
    sparsity: float | None = Field(None, ge=0.0, lt=1.0)
    shadow_rate: float | None = Field(None, ge=0.0, le=1.0)
    canary_share: float | None = Field(None, ge=0.0, le=1.0)
    fallback: Literal["none", "dense", "lower"] | None = None
    fallback_sparsity: float | None = Field(None, ge=0.0, lt=1.0)
    champion: str | None = Field(None, pattern=r"^(\d+|champion)$")
    challenger: str | None = Field(None, pattern=r"^(\d+|none)$")


def initial_state(defaults: ControlDefaults) -> ControlState:
    return ControlState(sparsity=defaults.sparsity, shadow_rate=defaults.shadow_rate,
                        canary_share=defaults.canary_share, fallback=defaults.fallback)


def unit_hash(request_id: str, salt: str) -> float:
    """A request id -> a number in [0, 1), the same in every replica and process."""
    digest = hashlib.sha256(f"{salt}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def canary_arm(request_id: str, share: float) -> str:
    return "challenger" if unit_hash(request_id, "canary") < share else "champion"


def shadow_sampled(request_id: str, rate: float) -> bool:
    return unit_hash(request_id, "shadow") < rate


class ControlStore:
    """Synchronous access (admin API, launcher, tests)."""

    def __init__(self, client: redis.Redis, prefix: str):
        self.r = client
        self.key, self.channel = f"{prefix}:control:state", f"{prefix}:control:notify"
        self.replicas = f"{prefix}:control:replicas"

    def ensure(self, defaults: ControlDefaults) -> ControlState:
        """Write generation 1 unless a document exists (first replica wins)."""
        first = initial_state(defaults).model_copy(update={"updated_at": time.time()})
        self.r.set(self.key, first.model_dump_json(), nx=True)
        return self.get()

    def get(self) -> ControlState | None:
        raw = self.r.get(self.key)
        return ControlState.model_validate_json(raw) if raw else None

    def update(self, change: ControlUpdate, by: str) -> ControlState:
        """Apply a partial change atomically: generation + 1, then notify."""
        fields = change.model_dump(exclude_unset=True)
        if fields.get("challenger") == "none":
            fields["challenger"] = None
        if fields.get("champion") == "champion":
            fields["champion"] = None
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.key)
                    raw = pipe.get(self.key)
                    cur = ControlState.model_validate_json(raw) if raw else ControlState()
                    new = ControlState.model_validate({**cur.model_dump(), **fields,
                                                       "generation": cur.generation + 1,
                                                       "updated_at": time.time(), "updated_by": by})
                    pipe.multi()
                    pipe.set(self.key, new.model_dump_json())
                    pipe.publish(self.channel, str(new.generation))
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue

    def replica_reports(self, stale_s: float) -> list[dict]:
        now, out = time.time(), []
        for raw in self.r.hvals(self.replicas):
            rep = json.loads(raw)
            if now - rep["ts"] <= stale_s:
                out.append(rep)
        return sorted(out, key=lambda r: (r["role"], r["replica"]))


class StateFollower:
    """Runs inside a replica: keeps `apply(state)` called with the newest document.

    `apply` runs for every new generation (in order, never concurrently); the replica
    reports the generation it has applied in the heartbeat hash."""

    def __init__(self, url: str, prefix: str, role: str, defaults: ControlDefaults,
                 apply: Callable[[ControlState], Awaitable[None]], reconcile_s: float):
        self.url, self.role, self.defaults, self.apply = url, role, defaults, apply
        self.key, self.channel = f"{prefix}:control:state", f"{prefix}:control:notify"
        self.replicas = f"{prefix}:control:replicas"
        self.reconcile_s = reconcile_s
        self.replica = f"{role}-{os.getpid()}"
        self.state: ControlState | None = None
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> ControlState:
        # a blocking pub/sub read must not hit the client's socket timeout
        self.r = aioredis.from_url(self.url, socket_timeout=None)
        first = initial_state(self.defaults).model_copy(update={"updated_at": time.time()})
        await self.r.set(self.key, first.model_dump_json(), nx=True)
        await self.reconcile()
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self.state

    async def reconcile(self) -> None:
        async with self._lock:
            raw = await self.r.get(self.key)
            if raw:
                new = ControlState.model_validate_json(raw)
                if self.state is None or new.generation > self.state.generation:
                    try:
                        await self.apply(new)
                        self.state = new
                        log.info("%s applied control state generation %d", self.replica, new.generation)
                    except Exception:  # keep serving the last good state; retried next reconcile
                        log.exception("%s could not apply generation %d", self.replica, new.generation)
            await self._report()

    async def _report(self) -> None:
        report = {"replica": self.replica, "role": self.role, "pid": os.getpid(), "ts": time.time(),
                  "generation": self.state.generation if self.state else 0}
        await self.r.hset(self.replicas, self.replica, json.dumps(report))

    async def _loop(self) -> None:
        while True:
            pubsub = self.r.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.reconcile_s)
                    await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s lost its control-state subscription; retrying", self.replica)
                await asyncio.sleep(1.0)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self.r.hdel(self.replicas, self.replica)
