"""The fine-tune job's reader of the shadow sample stream: consumer group `finetune`.

The fine-tune job reads and acknowledges through it (jobs/finetune.py); the rollout
controller asks it how many samples await the next fine-tune (an early run during drift).
"""

from __future__ import annotations

import redis

from monitor.keys import Keys
from monitor.streams import GroupReader

GROUP = "finetune"
CONSUMER = "finetune"  # one name: a retried run re-reads exactly what the killed one held


def sample_reader(client: redis.Redis, prefix: str) -> GroupReader:
    return GroupReader(client, Keys(prefix).shadow_samples, GROUP, CONSUMER, claim_idle_ms=60_000)


def available(reader: GroupReader) -> int:
    """Samples the group has not acknowledged: held unacknowledged plus not yet read."""
    lag = reader.lag()
    return lag["pending"] + lag["lag"]
