"""GatedLLM: a Ray Serve deployment that serves the gated model.

Each replica holds the champion predictor and, during a canary, the challenger, chooses per
request (deterministically from the request id), and follows the control state in place.
The token loop runs in a worker thread so the replica's event loop keeps following the
control state while it generates.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

from ray import serve

import redis

from adapter.runtime.gated import RequestError
from jobs.registry import PredictorRegistry
from monitor.alerts import AlertStore
from serving.control import ControlState, StateFollower
from serving.engine import Engine, GenRequest, GenResult
from serving.settings import Settings

log = logging.getLogger(__name__)
_DONE = object()


@serve.deployment(name="GatedLLM")
class GatedLLM:
    async def __init__(self, settings: Settings):
        self.settings = settings
        registry = PredictorRegistry(settings.mlflow.tracking_uri, settings.mlflow.registered_model)
        self.engine = await asyncio.to_thread(Engine, settings, registry)
        self.lock = threading.Lock()  # one token loop at a time per replica: the CPU is the limit
        self.follower = StateFollower(settings.redis.url, settings.redis.prefix, "llm",
                                      settings.serve.defaults, self._apply, settings.serve.reconcile_s)
        self.alerts = AlertStore(redis.Redis.from_url(settings.redis.url), settings.redis.prefix, settings.alerts)
        self.degraded: str | None = None
        self.warm = False
        await self._ensure_started()

    async def _apply(self, state: ControlState) -> str | None:
        problem = await asyncio.to_thread(self.engine.apply, state)
        await asyncio.to_thread(self._report_degraded, self.engine.problem)
        return problem

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
            await asyncio.to_thread(self._complete, GenRequest("warmup", [0, 1], max_tokens=2, temperature=0.0))
            self.warm = True

    def _complete(self, req: GenRequest) -> GenResult:
        with self.lock:
            return self.engine.complete(req)

    async def ready(self) -> dict:
        await self._ensure_started()
        return {"pid": os.getpid(), "generation": self.follower.state.generation,
                "champion": self.engine.champion, "challenger": self.engine.challenger}

    async def complete(self, req: GenRequest) -> GenResult | dict:
        await self._ensure_started()
        if self.engine.batchable(req):
            return await self._batched(req)
        try:
            return await asyncio.to_thread(self._complete, req)
        except RequestError as exc:
            return {"error": str(exc)}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batched(self, reqs: list[GenRequest]) -> list[GenResult | dict]:
        """Concurrent plain requests share decode steps, grouped by max_tokens."""
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.max_tokens, []).append(i)
        out: list[GenResult | dict] = [None] * len(reqs)
        for idx in groups.values():
            results = await asyncio.to_thread(self._batch_or_each, [reqs[i] for i in idx])
            for i, res in zip(idx, results):
                out[i] = res
        return out

    def _batch_or_each(self, reqs: list[GenRequest]) -> list[GenResult | dict]:
        with self.lock:
            try:
                return self.engine.complete_batch(reqs)
            except RequestError:  # one bad prompt: run each alone so the error lands on its own
                pass
            out = []
            for r in reqs:
                try:
                    out.append(self.engine.complete(r))
                except RequestError as exc:
                    out.append({"error": str(exc)})
            return out

    async def stream(self, req: GenRequest):
        """Yields {"token_ids", "text"} chunks, then {"result": GenResult} (or {"error"})."""
        await self._ensure_started()
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def produce():
            try:
                with self.lock:
                    for toks, text, res in self.engine.run(req):
                        loop.call_soon_threadsafe(queue.put_nowait, (toks, text, res))
            except RequestError as exc:
                loop.call_soon_threadsafe(queue.put_nowait, {"error": str(exc)})
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        worker = asyncio.ensure_future(asyncio.to_thread(produce))
        last = None
        while (item := await queue.get()) is not _DONE:
            if isinstance(item, dict):
                yield item
                continue
            toks, text, last = item
            if text:
                yield {"token_ids": toks, "text": text}
        await worker
        if last is not None:
            yield {"result": last}

    async def check_health(self) -> None:
        if self.warm and self.follower.state is None:
            raise RuntimeError("no control state applied")
