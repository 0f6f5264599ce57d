"""The Monitor as a part of the deployed app: one Ray Serve replica whose background thread
runs monitor.service.Monitor. Ray restarts the replica when it dies (its health check fails
when the thread is gone); the Redis lease keeps a second instance waiting."""

from __future__ import annotations

import logging
import os
import threading

from ray import serve

from jobs.registry import registry_for
from monitor import drift
from monitor.service import Monitor as MonitorLoop
from monitor.service import MonitorContext
from serving.settings import Settings

log = logging.getLogger(__name__)


def monitor_context(settings: Settings) -> MonitorContext:
    return MonitorContext(redis_url=settings.redis.url, prefix=settings.redis.prefix, monitor=settings.monitor,
                          alerts=settings.alerts, mlflow_uri=settings.mlflow.tracking_uri,
                          mlflow_ui=settings.mlflow.ui_url, redis=settings.redis)


def reference_loader(settings: Settings):
    """version -> (Basis, reference rows), from the version's artifacts in the registry."""
    registry = registry_for(settings)
    return lambda version: drift.load_reference(registry.download(version))


def build_monitor(settings: Settings) -> MonitorLoop:
    factory = None
    if settings.jobs.enabled:
        from jobs.scheduler import Scheduler

        factory = lambda: Scheduler(settings)  # noqa: E731
    return MonitorLoop(monitor_context(settings), reference_loader(settings), scheduler_factory=factory)


# the deployment keeps the name "Monitor": the Serve configs (infra/) and operators name it
@serve.deployment(name="Monitor", health_check_period_s=5, health_check_timeout_s=10)
class MonitorReplica:
    def __init__(self, settings: Settings):
        self.loop = build_monitor(settings)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop.run, args=(self.stop,), name="monitor", daemon=True)
        self.thread.start()

    async def status(self) -> dict:
        return {"instance": self.loop.instance, "pid": os.getpid(), "active": self.loop.active}

    def check_health(self) -> None:
        if not self.thread.is_alive():
            raise RuntimeError("the monitor loop stopped")

    def __del__(self):
        self.stop.set()
