"""The shadow sample store: a capped Redis stream of TraceRecord fields plus fidelity.

An entry carries exactly TraceRecord.to_fields() ({"meta": JSON, "tensors": safetensors
bytes}) and a "fidelity" JSON field; nothing is pickled. The stream is capped (XADD MAXLEN ~)
and a key whose policy keeps samples for less than the stream would is honoured by an
expiry index (a sorted set of entry ids by deadline) that `sweep` deletes from.
"""

from __future__ import annotations

import json
import time

import redis

from adapter.pipeline.traces import TraceRecord
from monitor.keys import Keys


class SampleStore:
    def __init__(self, client: redis.Redis, prefix: str, maxlen: int):
        self.r = client
        self.stream, self.expiry = Keys(prefix).shadow_samples, Keys(prefix).shadow_expiry
        self.maxlen = maxlen

    def add(self, record: TraceRecord, fidelity: dict, retention_s: int) -> str:
        fields = {**record.to_fields(), "fidelity": json.dumps(fidelity)}
        entry = self.r.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
        entry = entry.decode() if isinstance(entry, bytes) else entry
        self.r.zadd(self.expiry, {entry: time.time() + retention_s})
        return entry

    def sweep(self, now: float | None = None) -> int:
        """Delete samples whose retention has passed; returns how many."""
        due = self.r.zrangebyscore(self.expiry, "-inf", now or time.time())
        if not due:
            return 0
        self.r.xdel(self.stream, *due)
        self.r.zrem(self.expiry, *due)
        return len(due)

    def read(self, count: int = 100) -> list[tuple[str, TraceRecord, dict]]:
        """The newest `count` samples, oldest first (for tests and inspection; the jobs read
        with consumer groups)."""
        out = []
        for entry, fields in reversed(self.r.xrevrange(self.stream, count=count)):
            fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}
            out.append((entry.decode() if isinstance(entry, bytes) else entry, TraceRecord.from_fields(fields),
                        json.loads(fields["fidelity"])))
        return out

    def __len__(self) -> int:
        return int(self.r.xlen(self.stream))
