"""GatedLLM: a Ray Serve deployment that serves the gated model.

Each replica holds the champion predictor and, during a canary, the challenger, chooses per
request (deterministically from the request id), and follows the control state in place.
One decode loop per replica (serving/replica/batcher.py) owns the model in its own thread and
batches every request kind continuously; the replica's event loop keeps following the
control state, and hands each request's tokens back through its own asyncio queue. A caller
that goes away (Ray Serve cancels the call when the client disconnects) takes its sequence
out of the batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Callable

import psutil

from ray import serve

import redis

from adapter.runtime.gather import PLAN_LAYER_KEYS
from jobs.registry import registry_for
from monitor.alerts import AlertStore
from monitor.keys import Keys
from monitor.redis_client import redis_client
from serving.replica.control import ControlState, StateFollower
from serving.replica.batcher import Batcher
from serving.replica.engine import Engine, GenRequest, GenResult
from serving.api.openai_format import format_result
from serving.settings import Settings

log = logging.getLogger(__name__)


@serve.deployment(name="GatedLLM")
class GatedLLM:
    async def __init__(self, settings: Settings):
        t_init = time.time()
        self.settings = settings
        registry = registry_for(settings)
        self.engine = await asyncio.to_thread(Engine, settings, registry)
        t_engine = time.time()
        self.batcher = Batcher(self.engine, settings.serve.max_ongoing_requests).start()
        self.handled, self.handler_ms = 0, 0.0  # requests answered, and their time in this replica
        self.follower = StateFollower(settings.redis, settings.redis.prefix, "llm",
                                      settings.serve.defaults, self._apply, settings.serve.reconcile_s)
        self.r = redis_client(settings.redis)
        self.alerts = AlertStore(self.r, settings.redis.prefix, settings.alerts)
        self.degraded: str | None = None
        self.warm = False
        self.startup: dict | None = None  # where this replica's start went, once it is ready
        self._timing_task = asyncio.get_running_loop().create_task(self._publish_timing())
        await self._ensure_started()
        t_ready = time.time()
        # where a (replacement) replica's start goes: what `bench faults` reports beside the
        # recovery time, and what an operator reads in the replica's log. The worker process
        # may be one Ray started before this actor was asked for; everything between its
        # start (or the actor's creation) and init_at is Ray starting the actor and imports.
        self.startup = {"process_started_at": round(psutil.Process().create_time(), 3), "init_at": round(t_init, 3),
                        "engine_s": round(t_engine - t_init, 2), "state_and_warmup_s": round(t_ready - t_engine, 2),
                        "ready_at": round(t_ready, 3)}
        log.info("GatedLLM replica %d ready: %s", os.getpid(), self.startup)

    async def _apply(self, state: ControlState) -> str | None:
        problem = await asyncio.to_thread(self.engine.apply, state)
        await asyncio.to_thread(self._report_degraded, self.engine.problem)
        if self.engine.challenger_problem:
            await asyncio.to_thread(self._report_refused_challenger, state, self.engine.challenger_problem)
        return problem

    def _report_refused_challenger(self, state: ControlState, problem: str) -> None:
        """A challenger the state names but this replica cannot load (corrupt, mismatched,
        unreachable): the replica serves the champion alone, and says so once per version."""
        try:
            self.alerts.raise_alert("reconcile", "warning", f"a GatedLLM replica serves no canary: {problem}",
                                    predictor_version=state.challenger,
                                    evidence={"reason": problem, "replica": os.getpid()},
                                    dedup_key=f"reconcile:challenger-refused:{state.challenger}")
        except redis.RedisError as exc:
            log.warning("could not raise the refused-challenger alert: %s", exc)

    def _report_degraded(self, problem: str | None) -> None:
        """A replica that cannot have its champion serves dense and says so once per incident;
        when the champion loads again, that is said too."""
        if problem == self.degraded:
            return
        try:
            if problem:
                self.alerts.raise_alert("fallback", "critical", f"a GatedLLM replica serves dense: {problem}",
                                        evidence={"reason": problem, "replica": os.getpid()},
                                        dedup_key="fallback:champion-unavailable")
            else:
                self.alerts.clear_dedup("fallback:champion-unavailable")
                self.alerts.raise_alert("recovered", "info",
                                        f"a GatedLLM replica serves predictor {self.engine.champion} again",
                                        predictor_version=self.engine.champion,
                                        evidence={"previous": self.degraded, "replica": os.getpid()},
                                        dedup_key=f"recovered:champion-available:{self.engine.champion}")
        except redis.RedisError as exc:  # the alert is retried with the next reconcile
            log.warning("could not raise the replica's fallback alert: %s", exc)
            return
        self.degraded = problem

    async def _ensure_started(self) -> None:
        if not self.warm:
            await self.follower.start()
            # warm-up: one real request through the served path before taking traffic
            await self.complete(GenRequest("warmup", [0, 1], max_tokens=2, temperature=0.0), _warmup=True)
            self.warm = True

    async def _publish_timing(self) -> None:
        """The decode loop's counters (steps, batch sizes, ms per phase) to Redis every
        second, off the request path: `bench serve` reads them to show where time goes."""
        key = Keys(self.settings.redis.prefix).llm_timing(os.getpid())
        while True:
            await asyncio.sleep(1.0)
            try:
                await asyncio.to_thread(self.r.set, key, json.dumps(self.timing()), ex=120)
            except redis.RedisError as exc:
                log.debug("could not publish the decode loop's timing: %s", exc)

    def timing(self) -> dict:
        cache = self.engine.runtime.cache.stats()  # the mask copies: found vs made
        plans = self.engine.runtime.plans.stats()  # decode steps' plans: built, and their layers' kinds
        return {**self.batcher.stats.as_dict(), "replica_ms": round(self.handler_ms, 3),
                "requests": self.handled, "pid": os.getpid(), "startup": self.startup,
                "gather_hits": cache["hits"], "gather_misses": cache["misses"],
                "copy_faults": cache["faults"], "gather_recycled": cache["recycled"],
                "plan_builds": plans["misses"], "plan_ms": plans["build_ms"], "plan_recycled": cache["plan_recycled"],
                **{f"plan_{k}": plans[k] for k in PLAN_LAYER_KEYS}}

    def _channel(self) -> tuple[asyncio.Queue, Callable[[tuple], None]]:
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        return queue, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)

    async def ready(self) -> dict:
        await self._ensure_started()
        return {"pid": os.getpid(), "generation": self.follower.state.generation,
                "champion": self.engine.champion, "challenger": self.engine.challenger}

    async def stats(self) -> dict:
        """The decode loop's counters and the sequences running now (tests, benchmarks)."""
        return {**self.timing(), "running": self.batcher.running()}

    async def complete(self, req: GenRequest, _warmup: bool = False) -> GenResult | dict:
        if not _warmup:
            await self._ensure_started()
        t0 = time.perf_counter()
        queue, emit = self._channel()
        ticket = self.batcher.submit(req, emit)
        try:
            event = await queue.get()
        except asyncio.CancelledError:  # the caller went away: the sequence leaves the batch
            self.batcher.cancel(ticket)
            raise
        if event[0] == "error":
            return {"error": event[1]}
        res = format_result(self.engine.tokenizer, event[1], req.echo)
        self._count(t0)
        return res

    async def stream(self, req: GenRequest):
        """Yields {"token_ids", "text"} chunks, then {"result": GenResult} (or {"error"}).
        When the consumer goes away (cancelled, or the generator closed), the sequence leaves
        the batch at the loop's next step."""
        await self._ensure_started()
        t0 = time.perf_counter()
        queue, emit = self._channel()
        ticket = self.batcher.submit(req, emit, stream=True)
        over = False
        try:
            while True:
                event = await queue.get()
                if event[0] == "tokens":
                    if event[2]:
                        yield {"token_ids": event[1], "text": event[2]}
                    continue
                over = True
                if event[0] == "error":
                    yield {"error": event[1]}
                elif event[0] == "done":
                    res = format_result(self.engine.tokenizer, event[1], req.echo)
                    self._count(t0)
                    yield {"result": res}
                return
        finally:
            if not over:
                self.batcher.cancel(ticket)

    def _count(self, t0: float) -> None:
        self.handled += 1
        self.handler_ms += (time.perf_counter() - t0) * 1000

    async def check_health(self) -> None:
        if self.warm and self.follower.state is None:
            raise RuntimeError("no control state applied")
