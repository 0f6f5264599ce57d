"""The control state: one versioned JSON document in Redis that every replica applies in place.

Everything that changes at run time (champion/challenger predictor versions, canary share,
sparsity, shadow rate, fallback) lives in one document with a generation number. A writer
(the admin API, the monitor pulling the fallback lever, a rollout controller) replaces it
atomically with generation + 1, appends the new document to a capped history stream
(`<prefix>:control:history`, so a reader that polls sees every transition, not only the
last) and publishes the new generation; replicas follow it (serving/replica/control.py). It lives
here, below serving/, because the monitor writes it too.

A document also carries an `epoch`: a random token written when a document is created (the
first one, or a new one after Redis lost the key). Generations are comparable only within
one epoch: a replica follows a document whose epoch differs from the one it serves whatever
its generation, so a Redis that restarted empty cannot leave replicas ignoring every write
until the generation climbs past the old one.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Literal

import redis
from pydantic import BaseModel, ConfigDict, Field

from monitor.keys import Keys


class ControlDefaults(BaseModel):
    """The control state a fresh deployment starts from (generation 1). At run time the
    document in Redis rules; these are only its first values."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    shadow_rate: float = Field(0.05, ge=0.0, le=1.0)
    canary_share: float = Field(0.0, ge=0.0, le=1.0)
    fallback: Literal["none", "dense", "lower"] = "none"


def new_epoch() -> str:
    return secrets.token_hex(8)


class ControlState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    generation: int = Field(1, ge=1)
    epoch: str = ""  # the document's identity (see the module doc); "" for documents older than it
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


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def initial_state(defaults: ControlDefaults) -> ControlState:
    return ControlState(sparsity=defaults.sparsity, shadow_rate=defaults.shadow_rate,
                        canary_share=defaults.canary_share, fallback=defaults.fallback, epoch=new_epoch())


def supersedes(new: ControlState, served: ControlState | None) -> bool:
    """Whether a replica serving `served` must apply `new`: a later generation of the same
    document, or another document altogether (a new epoch, after the key was lost)."""
    return served is None or new.epoch != served.epoch or new.generation > served.generation


def reseeded(state: ControlState, by: str) -> ControlState:
    return state.model_copy(update={"epoch": new_epoch(), "updated_at": time.time(), "updated_by": by})


class ControlStore:
    """Synchronous access (admin API, launcher, tests)."""

    history_maxlen = 1000

    def __init__(self, client: redis.Redis, prefix: str):
        self.r = client
        keys = Keys(prefix)
        self.key, self.channel = keys.control_state, keys.control_notify
        self.replicas, self.history = keys.control_replicas, keys.control_history

    def ensure(self, defaults: ControlDefaults) -> ControlState:
        """Write generation 1 unless a document exists (first replica wins)."""
        first = initial_state(defaults).model_copy(update={"updated_at": time.time()})
        self.r.set(self.key, first.model_dump_json(), nx=True)
        return self.get()

    def get(self) -> ControlState | None:
        raw = self.r.get(self.key)
        return ControlState.model_validate_json(raw) if raw else None

    def update(self, change: ControlUpdate, by: str) -> ControlState:
        """Apply a partial change atomically: generation + 1, then notify. Without a document
        (Redis lost it) the change starts a new epoch from the field defaults."""
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
                    cur = ControlState.model_validate_json(raw) if raw else ControlState(epoch=new_epoch())
                    new = ControlState.model_validate({**cur.model_dump(), **fields,
                                                       "generation": cur.generation + 1,
                                                       "updated_at": time.time(), "updated_by": by})
                    pipe.multi()
                    pipe.set(self.key, new.model_dump_json())
                    pipe.xadd(self.history, {"state": new.model_dump_json()}, maxlen=self.history_maxlen,
                              approximate=True)
                    pipe.publish(self.channel, str(new.generation))
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue

    def reseed(self, state: ControlState, by: str) -> ControlState | None:
        """Write `state` back as a new epoch when the document is missing (Redis restarted
        empty), so what the replicas served survives the reset; None when a document exists."""
        seeded = reseeded(state, by)
        if not self.r.set(self.key, seeded.model_dump_json(), nx=True):
            return None
        self.r.xadd(self.history, {"state": seeded.model_dump_json()}, maxlen=self.history_maxlen, approximate=True)
        self.r.publish(self.channel, str(seeded.generation))
        return seeded

    def changes(self, after: str) -> list[tuple[str, ControlState]]:
        """History entries after stream id `after`, oldest first ("$": none, only the newest id)."""
        entries = self.r.xrange(self.history, min=f"({after}", max="+") if after != "$" else []
        return [(_s(eid), ControlState.model_validate_json(f.get(b"state") or f["state"])) for eid, f in entries]

    def last_change_id(self) -> str:
        last = self.r.xrevrange(self.history, count=1)
        return _s(last[0][0]) if last else "0-0"

    def replica_reports(self, stale_s: float) -> list[dict]:
        now, out = time.time(), []
        for raw in self.r.hvals(self.replicas):
            rep = json.loads(raw)
            if now - rep["ts"] <= stale_s:
                out.append(rep)
        return sorted(out, key=lambda r: (r["role"], r["replica"]))


