"""Following the control state inside a replica, and the per-request hashes of canary arm and
shadow sampling. The document and its store are in monitor/state.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from typing import Awaitable, Callable

import redis.asyncio as aioredis

from monitor.state import ControlDefaults, ControlState, ControlStore, ControlUpdate, initial_state

__all__ = ["ControlDefaults", "ControlState", "ControlStore", "ControlUpdate", "StateFollower", "canary_arm",
           "initial_state", "shadow_sampled", "unit_hash"]
log = logging.getLogger(__name__)


def unit_hash(request_id: str, salt: str) -> float:
    """A request id -> a number in [0, 1), the same in every replica and process."""
    digest = hashlib.sha256(f"{salt}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def canary_arm(request_id: str, share: float) -> str:
    return "challenger" if unit_hash(request_id, "canary") < share else "champion"


def shadow_sampled(request_id: str, rate: float) -> bool:
    return unit_hash(request_id, "shadow") < rate


class StateFollower:
    """Runs inside a replica: keeps `apply(state)` called with the newest document.

    `apply` runs for every new generation (in order, never concurrently); the replica
    reports the generation it has applied in the heartbeat hash."""

    def __init__(self, url: str, prefix: str, role: str, defaults: ControlDefaults,
                 apply: Callable[[ControlState], Awaitable[str | None]], reconcile_s: float):
        self.url, self.role, self.defaults, self.apply = url, role, defaults, apply
        self.key, self.channel = f"{prefix}:control:state", f"{prefix}:control:notify"
        self.replicas = f"{prefix}:control:replicas"
        self.reconcile_s = reconcile_s
        self.replica = f"{role}-{os.getpid()}"
        self.state: ControlState | None = None
        self.incomplete = False
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
                if self.state is None or new.generation > self.state.generation or self.incomplete:
                    try:
                        # apply may return a problem (the champion could not be had): the state
                        # is in force, and applied again at the next reconcile until it is whole
                        problem = await self.apply(new)
                        if self.state is None or self.state.generation != new.generation:
                            log.info("%s applied control state generation %d", self.replica, new.generation)
                        self.state, self.incomplete = new, bool(problem)
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
