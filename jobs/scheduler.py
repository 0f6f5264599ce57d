"""The one APScheduler of the deployment.

It runs inside the active monitor (monitor.service.Monitor starts it when it takes the
Redis lease and shuts it down when it loses it), so exactly one scheduler is active and a
killed one is replaced by the next lease holder. Schedules come from settings (`jobs.*`);
the jobs are the module-level recipes of jobs.runner.JOBS, run through run_job (lock,
record, `job_failure` alert). A missed run raises `job_failure` too. At start, a run that
was in progress when its process died is run again, once.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone

import redis
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED
from apscheduler.schedulers.background import BackgroundScheduler

from jobs.runner import JobBusy, JobRecords, run_job
from monitor.alerts import AlertStore
from monitor.redis_client import redis_client

log = logging.getLogger(__name__)


def _run(settings, name: str, trigger: str) -> None:
    """The scheduled callable (module level: APScheduler requires importable jobs)."""
    extra = {"run_soon": lambda job: Scheduler.current.run_soon(job, "early")} if name == "rollout" else {}
    try:
        run_job(settings, name, trigger, **extra)
    except JobBusy as exc:
        log.info("%s", exc)


class Scheduler:
    current: "Scheduler | None" = None

    def __init__(self, settings):
        self.s = settings
        self.r = redis_client(settings.redis)
        self.records = JobRecords(self.r, settings.redis.prefix)
        self.alerts = AlertStore(self.r, settings.redis.prefix, settings.alerts)
        self.sched = BackgroundScheduler(timezone=timezone.utc, job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": int(settings.jobs.misfire_grace_s)})
        self.schedules = {"finetune": settings.jobs.finetune_every_s, "rollout": settings.jobs.rollout_every_s}

    def start(self) -> None:
        Scheduler.current = self
        for name, every in self.schedules.items():
            # the controller ticks at once; the fine-tune first after one period (next_run_time
            # None would add it paused)
            first = {"next_run_time": datetime.now(timezone.utc)} if name == "rollout" else {}
            self.sched.add_job(_run, "interval", seconds=every, id=name, args=[self.s, name, "schedule"], **first)
        self.sched.add_listener(self._event, EVENT_JOB_ERROR | EVENT_JOB_MISSED | EVENT_JOB_EXECUTED)
        self.sched.start()
        for run in self.records.interrupted():
            log.warning("job %s (run %s) was interrupted: running it again", run["name"], run.get("run_id"))
            self.records.finish(run["name"], {**run, "status": "interrupted", "finished": time.time()})
            self.run_soon(run["name"], "recovery")
        self._publish()

    def run_soon(self, name: str, trigger: str) -> None:
        self.sched.add_job(_run, "date", run_date=datetime.now(timezone.utc), args=[self.s, name, trigger],
                           id=f"{name}-{trigger}-{time.time_ns()}", misfire_grace_time=None)

    def _event(self, event) -> None:
        if event.code == EVENT_JOB_MISSED:
            self.alerts.raise_alert("job_failure", "warning", f"job {event.job_id} missed its run at "
                                    f"{event.scheduled_run_time:%Y-%m-%d %H:%M:%S} UTC",
                                    evidence={"job": event.job_id, "missed": True},
                                    dedup_key=f"job_missed:{event.job_id}")
        elif event.code == EVENT_JOB_ERROR:
            self.alerts.raise_alert("job_failure", "warning", f"job {event.job_id} raised {event.exception!r}",
                                    evidence={"job": event.job_id}, dedup_key=f"job_error:{event.job_id}")
        self._publish()

    def _publish(self) -> None:
        """Next run times for `shadowgate jobs list`."""
        try:
            for name, every in self.schedules.items():
                job = self.sched.get_job(name)
                nxt = job.next_run_time.timestamp() if job and job.next_run_time else None
                self.r.hset(self.records.next, name, json.dumps({"next_run": nxt, "schedule": f"every {every:g} s"}))
        except redis.RedisError as exc:
            log.warning("job schedule not published: %s", exc)

    def shutdown(self) -> None:
        self.sched.shutdown(wait=False)
        if Scheduler.current is self:
            Scheduler.current = None
