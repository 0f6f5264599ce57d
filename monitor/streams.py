"""Exactly-once consumption of Redis streams by the single active monitor, and its lease.

A consumer group per stream; an entry is acknowledged and its effect (a row appended to a
capped window list, a counter) applied in ONE Lua script that applies the effect only when
XACK acknowledged the entry. A monitor killed at any point therefore leaves each entry
either pending (its effect not applied: a later instance reclaims it with XAUTOCLAIM) or
acknowledged with its effect applied exactly once.

Exactly one instance is active: a Redis lease (SET NX PX) renewed by its holder with a
heartbeat; a second instance waits until the lease expires.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

# KEYS: stream, window list, totals hash; ARGV: group, entry id, row, window length, totals field
_ACK_APPEND = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  if ARGV[3] ~= '' then
    redis.call('RPUSH', KEYS[2], ARGV[3])
    redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
  end
  redis.call('HINCRBY', KEYS[3], ARGV[5], 1)
  return 1
end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


class Lease:
    """One holder at a time; `hold()` acquires or renews, False when another instance holds it."""

    def __init__(self, client: redis.Redis, key: str, holder: str, ttl_s: float):
        self.r, self.key, self.holder, self.ttl_ms = client, key, holder, int(ttl_s * 1000)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def hold(self) -> bool:
        if self.r.set(self.key, self.holder, nx=True, px=self.ttl_ms):
            return True
        return bool(self._renew(keys=[self.key], args=[self.holder, self.ttl_ms]))

    def holder_now(self) -> str | None:
        v = self.r.get(self.key)
        return _s(v) if v is not None else None

    def release(self) -> None:
        self._release(keys=[self.key], args=[self.holder])


@dataclass(frozen=True)
class Entry:
    id: str
    fields: dict[str, bytes]


class GroupReader:
    """Reads one stream through a consumer group: new entries first, then entries that a
    dead consumer left pending longer than `claim_idle_ms` (XAUTOCLAIM)."""

    def __init__(self, client: redis.Redis, stream: str, group: str, consumer: str, claim_idle_ms: int):
        self.r, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.claim_idle_ms = claim_idle_ms
        self._ack_append = client.register_script(_ACK_APPEND)
        self.ensure_group()

    def ensure_group(self) -> None:
        try:  # id 0: entries written before the first monitor ever started are read too
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def reclaim(self, count: int = 100) -> list[Entry]:
        out, start = [], "0-0"
        while len(out) < count:
            res = self.r.xautoclaim(self.stream, self.group, self.consumer, self.claim_idle_ms,
                                    start_id=start, count=count)
            start, claimed = _s(res[0]), res[1]
            out.extend(Entry(_s(i), f) for i, f in claimed if f)
            deleted = res[2] if len(res) > 2 else []
            for gone in deleted:  # trimmed by MAXLEN while pending: nothing left to apply
                self.r.xack(self.stream, self.group, gone)
            if start == "0-0" or not claimed:
                break
        return out

    def own_pending(self, count: int = 100) -> list[Entry]:
        """Entries delivered to this consumer name but not acknowledged (a restart with the
        same name re-reads them)."""
        res = self.r.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=count)
        return _entries(res)

    def read_new(self, count: int, block_ms: int | None) -> list[Entry]:
        res = self.r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms)
        return _entries(res)

    def ack_append(self, entry_id: str, window_key: str, row: str, window_len: int,
                   totals_key: str, totals_field: str) -> bool:
        """Acknowledge `entry_id` and, only if this acknowledged it, append `row` to the
        capped list and count it. Returns whether it applied."""
        return bool(self._ack_append(keys=[self.stream, window_key, totals_key],
                                     args=[self.group, entry_id, row, window_len, totals_field]))

    def lag(self) -> dict:
        """Pending and not-yet-delivered counts of the group."""
        for g in self.r.xinfo_groups(self.stream):
            g = {_s(k): v for k, v in g.items()}
            if _s(g["name"]) == self.group:
                lag = g.get("lag")
                if lag is None:  # Redis cannot tell after XGROUP SETID to an arbitrary id: count
                    lag = len(self.r.xrange(self.stream, min=f"({_s(g['last-delivered-id'])}", max="+"))
                return {"pending": int(g.get("pending") or 0), "lag": int(lag)}
        return {"pending": 0, "lag": 0}


def _entries(res) -> list[Entry]:
    if not res:
        return []
    items = res.items() if isinstance(res, dict) else res  # RESP3 gives a dict, RESP2 pairs
    return [Entry(_s(eid), fields) for _, entries in items for eid, fields in entries if fields]
