"""Running one job: a module-level recipe `main(settings) -> dict`, called by the scheduler
or by `shadowgate jobs run NAME`, never both at once.

A run holds a Redis lock per job (renewed by a heartbeat, so a killed runner's lock expires)
and leaves a record: P:jobs:running (hash name -> the run in progress), P:jobs:last (hash
name -> the last result) and P:jobs:history (capped list, newest first). A run that raises
is recorded as failed and raises a `job_failure` alert; a run found in P:jobs:running with
its lock gone was interrupted (its process died): the scheduler runs it again once.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
import time
import traceback
import uuid

import redis

from monitor.alerts import AlertStore
from monitor.keys import Keys
from monitor.redis_client import redis_client
from monitor.streams import Lease

log = logging.getLogger(__name__)

# name -> (module, what it does). Each module has main(settings) -> dict.
JOBS = {
    "finetune": ("jobs.finetune", "fine-tune a candidate predictor on new shadow samples, evaluate, register"),
    "rollout": ("jobs.rollout", "approvals, canary decisions, promotion and rollback, drift reaction"),
}
HISTORY_LEN = 200
# quiet jobs leave only their last result when nothing happened (the rollout tick runs every few s)
QUIET = {"rollout"}


class UnknownJob(KeyError):
    pass


class JobBusy(RuntimeError):
    pass


def job_main(name: str):
    if name not in JOBS:
        raise UnknownJob(f"no job {name!r}: the jobs are {', '.join(JOBS)}")
    return importlib.import_module(JOBS[name][0]).main


class JobRecords:
    def __init__(self, client: redis.Redis, prefix: str):
        self.r, self.p, self.keys = client, prefix, Keys(prefix)
        self.running, self.last = self.keys.jobs_running, self.keys.jobs_last
        self.history, self.next = self.keys.jobs_history, self.keys.jobs_next

    def lock_key(self, name: str) -> str:
        return self.keys.jobs_lock(name)

    def interrupted(self) -> list[dict]:
        """Runs recorded as in progress whose lock has expired: their process died."""
        out = []
        for name, raw in self.r.hgetall(self.running).items():
            name = name.decode() if isinstance(name, bytes) else name
            if not self.r.exists(self.lock_key(name)):
                out.append({**json.loads(raw), "name": name})
        return out

    def phase(self, name: str, phase: str) -> None:
        """Mark what a running job is doing (shown by `jobs list`)."""
        raw = self.r.hget(self.running, name)
        if raw:
            self.r.hset(self.running, name, json.dumps({**json.loads(raw), "phase": phase, "phase_ts": time.time()}))

    def finish(self, name: str, record: dict, quiet: bool = False) -> None:
        with self.r.pipeline() as pipe:
            pipe.hdel(self.running, name)
            pipe.hset(self.last, name, json.dumps(record))
            if not quiet:
                pipe.lpush(self.history, json.dumps(record))
                pipe.ltrim(self.history, 0, HISTORY_LEN - 1)
            pipe.execute()

    def listing(self) -> list[dict]:
        last = {k.decode(): json.loads(v) for k, v in self.r.hgetall(self.last).items()}
        nxt = {k.decode(): json.loads(v) for k, v in self.r.hgetall(self.next).items()}
        running = {k.decode(): json.loads(v) for k, v in self.r.hgetall(self.running).items()}
        return [{"name": n, "about": about, "next_run": nxt.get(n, {}).get("next_run"),
                 "schedule": nxt.get(n, {}).get("schedule"), "running": running.get(n), "last": last.get(n)}
                for n, (_, about) in JOBS.items()]

    def recent(self, count: int = 50, name: str | None = None) -> list[dict]:
        rows = [json.loads(x) for x in self.r.lrange(self.history, 0, HISTORY_LEN - 1)]
        return [r for r in rows if name is None or r["name"] == name][:count]


def run_job(settings, name: str, trigger: str = "manual", client: redis.Redis | None = None, **extra) -> dict:
    """Run job `name` once under its lock; returns its record (status ok | failed | busy)."""
    main = job_main(name)
    r = client or redis_client(settings.redis)
    p = settings.redis.prefix
    records = JobRecords(r, p)
    run_id = uuid.uuid4().hex[:12]
    lock = Lease(r, records.lock_key(name), run_id, settings.jobs.lock_ttl_s)
    if not lock.hold():
        raise JobBusy(f"job {name} is running elsewhere (lock {records.lock_key(name)} is held)")
    started = time.time()
    base = {"name": name, "run_id": run_id, "trigger": trigger, "pid": os.getpid(), "started": started}
    r.hset(records.running, name, json.dumps(base))
    done = threading.Event()

    def heartbeat():
        while not done.wait(settings.jobs.lock_ttl_s / 3):
            try:
                lock.hold()
            except redis.RedisError as exc:
                log.warning("job %s lock not renewed: %s", name, exc)

    beat = threading.Thread(target=heartbeat, name=f"job-{name}-lock", daemon=True)
    beat.start()
    try:
        result = main(settings, **extra)
        record = {**base, "status": "ok", "result": result}
    except Exception as exc:  # recorded and alerted; the scheduler keeps running
        log.exception("job %s failed", name)
        record = {**base, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                  "trace": traceback.format_exc(limit=8)[-4000:]}
        # one alert per job and cool-down: the controller ticks every few seconds
        AlertStore(r, p, settings.alerts).raise_alert(
            "job_failure", "warning", f"job {name} failed: {type(exc).__name__}: {exc}",
            evidence={"job": name, "run_id": run_id, "trigger": trigger}, dedup_key=f"job_failure:{name}")
    finally:
        done.set()
        beat.join(5)
    record["finished"] = time.time()
    record["duration_s"] = round(record["finished"] - started, 3)
    quiet = name in QUIET and record["status"] == "ok" and not (record.get("result") or {}).get("decisions")
    records.finish(name, record, quiet)
    lock.release()
    return record
