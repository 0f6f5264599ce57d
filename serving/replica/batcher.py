"""The decode loop of a GatedLLM replica: continuous batching over the engine's primitives.

One thread owns the model. Every iteration it admits the requests that arrived since the
last step (prefill each, their first-token logits join the batch), picks one token for
every running sequence, hands tokens and finished results to each request's own channel,
drops the finished and the cancelled, and runs one batched decode step for the rest. Every
request kind goes through it: plain, streamed, stop strings, echo/logprobs (an echo's prompt
scoring is its prefill, with all logits). A cancelled request (a client that went away)
leaves the batch at the next step.

Channels are callables `emit(event)` called from the loop thread; the replica wraps an
asyncio.Queue with loop.call_soon_threadsafe. Events:
  ("tokens", [ids], text)   streamed requests only, per accepted token (text may be "")
  ("done", GenResult)       the finished request
  ("error", message)        a request the model cannot run (a client error)
  ("cancelled", None)       acknowledged cancellation

Shapes: B running sequences, V vocab.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from adapter.runtime.gated import RequestError
from serving.replica.engine import Active, Engine, GenRequest

log = logging.getLogger(__name__)

Emit = Callable[[tuple], None]


@dataclass
class Ticket:
    """A submitted request: what the caller holds to cancel it."""

    req: GenRequest
    emit: Emit
    stream: bool
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    active: Active | None = None
    steps: int = 0  # decode steps this request took part in


@dataclass
class LoopStats:
    """Counters of the loop (read by tests and the bench; written by the loop thread only)."""

    steps: int = 0  # batched decode steps run
    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    errors: int = 0
    max_batch: int = 0  # the largest batch a decode step ran
    gather_faults: int = 0  # minor page faults of the process while prefills copied their masks' weights
    batch_sum: int = 0  # sum of batch sizes over steps (mean = batch_sum / steps)
    ms: dict = field(default_factory=lambda: {k: 0.0 for k in PHASES})
    recent: deque = field(default_factory=lambda: deque(maxlen=256))  # (request_id, tokens, reason, steps)

    def as_dict(self) -> dict:
        return {"steps": self.steps, "admitted": self.admitted, "finished": self.finished,
                "cancelled": self.cancelled, "errors": self.errors, "max_batch": self.max_batch,
                "batch_sum": self.batch_sum, "gather_faults": self.gather_faults, "ms": {k: round(v, 3) for k, v in self.ms.items()},
                "recent": list(self.recent)}


# where a request's time goes inside the replica (summed over requests); "gather" is the part
# of "prefill" spent finding or copying the request's own mask weights (not a phase of its own)
PHASES = ("queue", "prefill", "gather", "decode", "detokenize", "finish")


class Batcher:
    def __init__(self, engine: Engine, max_batch: int = 32):
        self.engine = engine
        self.max_batch = max_batch
        self.stats = LoopStats()
        self._waiting: deque[Ticket] = deque()
        self._running: list[Ticket] = []
        self._logits: torch.Tensor | None = None  # (B, V) rows for self._running, in order
        # how many steps a batch composition lasts before a sequence joins or leaves (moving
        # average): a union copy is weighed over that, since arrivals end a composition too
        self._composition: tuple[int, ...] = ()
        self._since_change = 0
        self._lifetime = 32.0
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout)

    # ---- callers (any thread) ----------------------------------------------------------------
    def submit(self, req: GenRequest, emit: Emit, stream: bool = False) -> Ticket:
        ticket = Ticket(req, emit, stream)
        with self._wake:
            self._waiting.append(ticket)
            self._wake.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The request leaves the batch before the next step (a flag read by the loop)."""
        ticket.cancelled = True
        with self._wake:
            self._wake.notify()

    def running(self) -> int:
        return len(self._running)

    # ---- the loop thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stop:
                    return
                new = [self._waiting.popleft()
                       for _ in range(min(len(self._waiting), self.max_batch - len(self._running)))]
            try:
                self._step(new)
            except Exception as exc:  # a bug, not a client error: fail what runs, keep the loop
                log.exception("decode loop step failed")
                for t in self._running + [t for t in new if t.active is None]:
                    self._emit(t, ("error", f"internal error in the decode loop: {type(exc).__name__}"))
                self._running, self._logits = [], None

    def _step(self, new: list[Ticket]) -> None:
        eng, st = self.engine, self.stats
        rows = [] if self._logits is None else [self._logits]
        # a sequence that will decode by itself needs its mask's own weight copy; one that
        # joins others shares their products and keeps none (a long prompt borrows one)
        alone = not self._running and len(new) == 1 and not self._waiting
        for t in new:
            if t.cancelled:
                self._cancelled(t)
                continue
            try:
                t.active, logits = eng.start(t.req, stream=t.stream, alone=alone)
            except RequestError as exc:
                st.errors += 1
                self._emit(t, ("error", str(exc)))
                continue
            except Exception as exc:  # whatever one request trips over fails it alone
                log.exception("request %s failed at admission", t.req.request_id)
                st.errors += 1
                self._emit(t, ("error", f"the request could not be run: {type(exc).__name__}"))
                continue
            t.active.timing["queue_ms"] = (time.perf_counter() - t.submitted) * 1000 - t.active.timing["prefill_ms"]
            st.admitted += 1
            if t.active.done:  # echo with max_tokens 0
                self._finish(t)
                continue
            self._running.append(t)
            rows.append(logits)
        keep = [i for i, t in enumerate(self._running) if not t.cancelled]
        logits = torch.cat(rows) if rows else None
        for t in self._running:
            if t.cancelled:
                self._cancelled(t)
        if len(keep) < len(self._running):
            self._running = [self._running[i] for i in keep]
            logits = logits[keep] if keep else None
        if not self._running:
            self._logits = None
            return
        acts = [t.active for t in self._running]
        toks = eng.accept(acts, logits)
        still = []
        for j, t in enumerate(self._running):
            a = t.active
            if t.stream:
                self._emit(t, ("tokens", a.res.token_ids[-1:], a.delta))
            if a.done:
                self._finish(t)
            else:
                still.append(j)
        if not still:
            self._running, self._logits = [], None
            return
        self._running = [self._running[j] for j in still]
        t0 = time.perf_counter()
        self._logits = eng.decode([t.active for t in self._running], toks[still], self._expected_steps())
        ms = (time.perf_counter() - t0) * 1000
        b = len(self._running)
        st.steps += 1
        st.batch_sum += b
        st.max_batch = max(st.max_batch, b)
        for t in self._running:  # a shared step's time, split evenly among its sequences
            t.steps += 1
            t.active.timing["decode_ms"] = t.active.timing.get("decode_ms", 0.0) + ms / b

    def _expected_steps(self) -> int:
        """The steps the running composition is expected to last: 1 when requests wait to
        join (the next step changes it), else the recent compositions' mean lifetime."""
        comp = tuple(id(t) for t in self._running)
        if comp != self._composition:
            if self._composition:
                self._lifetime = 0.7 * self._lifetime + 0.3 * self._since_change
            self._composition, self._since_change = comp, 0
        self._since_change += 1
        return 1 if self._waiting else max(1, round(self._lifetime))

    def _finish(self, t: Ticket) -> None:
        res = self.engine.finish(t.active)
        res.timing["steps"] = t.steps
        st = self.stats
        st.finished += 1
        for k in PHASES:
            st.ms[k] += res.timing.get(f"{k}_ms", 0.0)
        st.gather_faults += res.timing.get("gather_faults", 0)
        st.recent.append((t.req.request_id, len(res.token_ids), res.finish_reason, t.steps))
        self._emit(t, ("done", res))

    def _cancelled(self, t: Ticket) -> None:
        st = self.stats
        st.cancelled += 1
        n = len(t.active.res.token_ids) if t.active else 0
        st.recent.append((t.req.request_id, n, "cancelled", t.steps))
        self._emit(t, ("cancelled", None))

    @staticmethod
    def _emit(t: Ticket, event: tuple) -> None:
        try:
            t.emit(event)
        except Exception:  # the caller's event loop is gone: nothing left to tell
            log.debug("could not hand %s to request %s", event[0], t.req.request_id)
