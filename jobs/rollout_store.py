"""The rollout controller's record in Redis: its state, its decision log, and the operator
commands and registry events queued for it.

The controller (jobs/rollout.py) owns it; the fine-tune job reads the drift episode from
the state and logs its `candidate` decisions here, the gateway queues webhook events and
approvals. Keys: the P:rollout:* ones of monitor/keys.py (the state: the canary in progress
and the rates to restore; the decisions: a capped list, newest first).
"""

from __future__ import annotations

import json
import time

import redis

from monitor.keys import Keys

DECISIONS_LEN = 100
ACTOR = "rollout-controller"


class RolloutStore:
    def __init__(self, client: redis.Redis, prefix: str):
        self.r, self.p = client, prefix
        keys = Keys(prefix)
        self.state_key, self.decisions = keys.rollout_state, keys.rollout_decisions
        self.commands, self.events = keys.rollout_commands, keys.rollout_events

    def state(self) -> dict:
        raw = self.r.get(self.state_key)
        return json.loads(raw) if raw else {}

    def save(self, state: dict) -> None:
        self.r.set(self.state_key, json.dumps(state))

    def decide(self, kind: str, version: str | None, evidence: dict, by: str = ACTOR) -> dict:
        row = {"ts": time.time(), "decision": kind, "version": version, "by": by, "evidence": evidence}
        with self.r.pipeline() as pipe:
            pipe.lpush(self.decisions, json.dumps(row))
            pipe.ltrim(self.decisions, 0, DECISIONS_LEN - 1)
            pipe.execute()
        return row

    def recent(self, count: int = 20) -> list[dict]:
        return [json.loads(x) for x in self.r.lrange(self.decisions, 0, count - 1)]

    def command(self, cmd: dict) -> None:
        self.r.rpush(self.commands, json.dumps({**cmd, "ts": time.time()}))

    def pop_commands(self) -> list[dict]:
        return self._drain(self.commands)

    def _drain(self, key: str) -> list[dict]:
        """Everything queued at `key`, removed in the same MULTI."""
        with self.r.pipeline() as pipe:
            pipe.lrange(key, 0, -1)
            pipe.delete(key)
            raw, _ = pipe.execute()
        return [json.loads(x) for x in raw]

    def event(self, event: dict) -> None:
        self.r.rpush(self.events, json.dumps(event))
        self.r.ltrim(self.events, -1000, -1)

    def pop_events(self) -> list[dict]:
        return self._drain(self.events)
