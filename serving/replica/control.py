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

from monitor.keys import Keys
from monitor.redis_client import async_redis_client
from monitor.state import (ControlDefaults, ControlState, ControlStore, ControlUpdate, initial_state, reseeded,
                           supersedes)

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

    `apply` runs for every new generation (in order, never concurrently) and for every new
    document (another epoch, whatever its generation); the replica reports the generation and
    epoch it has applied in the heartbeat hash. When the document is gone (Redis restarted
    empty), the follower writes back what it serves as a new epoch (the first replica to
    notice wins; the others follow that one), so a reset loses no champion, fallback or
    canary. `redis` is a URL or the settings' `redis` section (AUTH, TLS)."""

    RETRY_MIN_S, RETRY_MAX_S = 0.05, 0.25

    def __init__(self, redis, prefix: str, role: str, defaults: ControlDefaults,
                 apply: Callable[[ControlState], Awaitable[str | None]], reconcile_s: float):
        self.redis, self.role, self.defaults, self.apply = redis, role, defaults, apply
        keys = Keys(prefix)
        self.key, self.channel = keys.control_state, keys.control_notify
        self.replicas, self.history = keys.control_replicas, keys.control_history
        self.reconcile_s = reconcile_s
        self.replica = f"{role}-{os.getpid()}"
        self.state: ControlState | None = None
        self.incomplete = False
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> ControlState:
        self.r = async_redis_client(self.redis)
        # a blocking pub/sub read must not hit the client's socket timeout: its own client
        self.rb = async_redis_client(self.redis, blocking=True)
        first = initial_state(self.defaults).model_copy(update={"updated_at": time.time()})
        await self.r.set(self.key, first.model_dump_json(), nx=True)
        await self.reconcile()
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self.state

    async def reconcile(self) -> None:
        async with self._lock:
            raw = await self.r.get(self.key)
            if raw is None and self.state is not None:
                raw = await self._reseed()
            if raw:
                new = ControlState.model_validate_json(raw)
                if supersedes(new, self.state) or self.incomplete:
                    try:
                        # apply may return a problem (the champion could not be had): the state
                        # is in force, and applied again at the next reconcile until it is whole
                        problem = await self.apply(new)
                        if self.state is None or (self.state.epoch, self.state.generation) != (new.epoch,
                                                                                             new.generation):
                            log.info("%s applied control state generation %d (epoch %s)", self.replica,
                                     new.generation, new.epoch)
                        self.state, self.incomplete = new, bool(problem)
                    except Exception:  # keep serving the last good state; retried next reconcile
                        log.exception("%s could not apply generation %d", self.replica, new.generation)
            await self._report()

    async def _reseed(self) -> bytes | None:
        """The document is missing: write back the one served, as a new epoch (SET NX: one
        replica wins), and return whatever document is there now."""
        seeded = reseeded(self.state, f"{self.replica} (re-seeded: the document was missing)")
        if await self.r.set(self.key, seeded.model_dump_json(), nx=True):
            log.warning("%s: the control state was missing from Redis; wrote back generation %d as epoch %s",
                        self.replica, seeded.generation, seeded.epoch)
            await self.r.xadd(self.history, {"state": seeded.model_dump_json()},
                              maxlen=ControlStore.history_maxlen, approximate=True)
            await self.r.publish(self.channel, str(seeded.generation))
        return await self.r.get(self.key)

    async def _report(self) -> None:
        report = {"replica": self.replica, "role": self.role, "pid": os.getpid(), "ts": time.time(),
                  "generation": self.state.generation if self.state else 0,
                  "epoch": self.state.epoch if self.state else None}
        await self.r.hset(self.replicas, self.replica, json.dumps(report))

    async def _loop(self) -> None:
        wait = self.RETRY_MIN_S
        while True:
            pubsub = self.rb.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                # at once after (re)subscribing: a write made while the subscription was down
                # (Redis restarted) is not notified again
                await self.reconcile()
                if wait > self.RETRY_MIN_S:
                    log.info("%s follows the control state again", self.replica)
                wait = self.RETRY_MIN_S
                while True:
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.reconcile_s)
                    await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or restarting: the replica serves on what it has
                # short retries first, so a Redis that is back is followed within a fraction of
                # a second; one warning per outage
                (log.warning if wait == self.RETRY_MIN_S else log.debug)(
                    "%s lost its control-state subscription (%s: %s); retrying", self.replica,
                    type(exc).__name__, exc)
                await asyncio.sleep(wait)
                wait = min(2 * wait, self.RETRY_MAX_S)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self.r.hdel(self.replicas, self.replica)
