"""The admin API behind the gateway (admin key only; routes.py checks it): the control state
(read, change), the monitor's status, the rollout (status, approve, roll back), alerts, and
the MLflow registry webhook that feeds the rollout controller (signed, no key)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from jobs.approval import verify, webhook_secret
from jobs.registry import PredictorRegistry, RegistryError
from jobs.rollout import APPROVED, Controller
from jobs.rollout_store import RolloutStore
from monitor.alerts import KINDS as ALERT_KINDS
from monitor.alerts import AlertStore
from monitor.keys import Keys
from serving.api.protocol import ApiError
from serving.replica.control import ControlStore, ControlUpdate
from serving.settings import Settings

log = logging.getLogger(__name__)
_VERSION = re.compile(r"[0-9]{1,9}")
_WEBHOOK_HEADERS = ("x-mlflow-delivery-id", "x-mlflow-timestamp", "x-mlflow-signature")


def _stream_id(entry: str) -> tuple[int, int]:
    """A Redis stream id ("ms-seq", an alert's id) as a sortable pair; junk sorts first."""
    ms, _, seq = entry.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        raise ApiError(400, f"{entry!r} is not an alert id") from None


class Admin:
    """`r` is the gateway's asyncio Redis client; `store` the control store (a blocking client,
    called off the event loop)."""

    def __init__(self, settings: Settings, r, store: ControlStore, registry: PredictorRegistry,
                 alerts: AlertStore):
        self.settings, self.prefix, self.keys = settings, settings.redis.prefix, Keys(settings.redis.prefix)
        self.r, self.store, self.registry, self.alerts = r, store, registry, alerts

    # ---- the control state ----------------------------------------------------------------
    async def state(self) -> dict:
        state = await asyncio.to_thread(self.store.get)
        replicas = await asyncio.to_thread(self.store.replica_reports, 3 * self.settings.serve.reconcile_s + 5)
        return {"state": state.model_dump() if state else None, "replicas": replicas}

    async def put_state(self, body) -> dict:
        try:
            change = ControlUpdate.model_validate(body)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        # an explicit null would be written into the document, whose live fields are not optional
        nulls = [k for k, v in change.model_dump(exclude_unset=True).items()
                 if v is None and k not in ("champion", "challenger")]
        if nulls:
            raise ApiError(400, f"{', '.join(nulls)}: must not be null (leave a field out to keep it)")
        for field in ("champion", "challenger"):
            version = getattr(change, field)
            if version is not None and version not in ("champion", "none"):
                if not _VERSION.fullmatch(version):  # \d in the model's pattern takes any script's digits
                    raise ApiError(400, f"{field} must be a version number (ASCII digits), not {version!r}")
                await self.require_version(field, version)
        try:
            state = await asyncio.to_thread(self.store.update, change, "admin-api")
        except ValidationError as exc:  # the change is valid alone but not with the state in force
            raise RequestValidationError(exc.errors()) from None
        log.info("control state generation %d written by the admin API", state.generation)
        return {"state": state.model_dump()}

    async def require_version(self, field: str, version: str) -> None:
        """A state naming a predictor version the registry does not hold is refused (4xx);
        the registry being unreachable is a 503, never a silent accept."""
        try:
            exists = await asyncio.to_thread(self.registry.exists, version)
        except RegistryError as exc:
            raise ApiError(503, f"cannot check {field} version {version}: {exc}", "service_unavailable") from None
        if not exists:
            raise ApiError(404, f"{field} version {version} does not exist in the registry "
                                f"({self.settings.mlflow.registered_model})", "not_found_error")

    # ---- the monitor ----------------------------------------------------------------------
    async def monitor(self) -> dict:
        """The monitor's fidelity windows, drift checks and stream lag, and which instance is active."""
        summary, status, lease = await asyncio.gather(
            self.r.get(self.keys.monitor_summary), self.r.get(self.keys.monitor_status),
            self.r.get(self.keys.monitor_lease))
        summary = json.loads(summary) if summary else None
        return {"active": lease.decode() if lease else None, "status": json.loads(status) if status else None,
                "summary": summary, "age_s": round(time.time() - summary["ts"], 3) if summary else None}

    # ---- the adaptation loop --------------------------------------------------------------
    async def webhook(self, body: bytes, headers) -> dict:
        """An MLflow registry webhook delivery (alias/tag events): signature checked, queued for
        the rollout controller, which also polls."""
        if not all(headers.get(n, "").isascii() for n in _WEBHOOK_HEADERS):  # compare_digest takes ASCII only
            raise ApiError(401, "webhook delivery refused: its headers are not ASCII", "authentication_error")
        delivery, ts, signature = (headers.get(n) for n in _WEBHOOK_HEADERS)
        secret = await asyncio.to_thread(webhook_secret, self.settings, self.store.r)
        problem = verify(secret, delivery, ts, body, signature)
        if problem:
            raise ApiError(401, f"webhook delivery refused: {problem}", "authentication_error")
        try:
            event = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the delivery body is not valid JSON") from None
        if not isinstance(event, dict):
            raise ApiError(400, "the delivery body must be a JSON object")
        event["delivery_id"] = delivery
        await asyncio.to_thread(RolloutStore(self.store.r, self.prefix).event, event)
        await self.r.incr(self.keys.rollout_webhook_deliveries)
        return {"ok": True}

    async def rollout(self) -> dict:
        """Champion, challenger, canary share and evidence, fallback, the last decisions."""
        try:
            return await asyncio.to_thread(Controller(self.settings, self.store.r, self.registry).status)
        except RegistryError as exc:
            raise ApiError(503, str(exc), "service_unavailable") from None

    async def approve(self, version: str) -> dict:
        """Approve a version: the alias `approved`, the same one a person sets in the MLflow UI."""
        if not _VERSION.fullmatch(version):
            raise ApiError(400, f"a version is a number, not {version!r}")
        await self.require_version("approved", version)
        await asyncio.to_thread(self.registry.set_alias, APPROVED, version)
        await asyncio.to_thread(RolloutStore(self.store.r, self.prefix).decide, "approved", version, {},
                                "admin-api")
        return {"version": version, "alias": APPROVED}

    async def rollback(self, body) -> dict:
        """Ask the controller to roll back the challenger now; waits for its decision."""
        reason = body.get("reason") if isinstance(body, dict) else None
        if reason is not None and (not isinstance(reason, str) or len(reason) > 500):
            raise ApiError(400, "reason must be a string of at most 500 characters")
        store = RolloutStore(self.store.r, self.prefix)
        t0 = time.time()
        await asyncio.to_thread(store.command, {"action": "rollback", "reason": reason, "by": "admin-api"})
        deadline = t0 + 3 * self.settings.jobs.rollout_every_s + 10
        while time.time() < deadline:
            for d in await asyncio.to_thread(store.recent, 5):
                if d["ts"] >= t0 and d["decision"] in ("rolled_back", "rollback_refused"):
                    return {"decision": d}
            await asyncio.sleep(0.5)
        raise ApiError(503, "the rollout controller did not act within "
                            f"{deadline - t0:.0f} s (is the monitor/scheduler running?)", "service_unavailable")

    # ---- alerts ---------------------------------------------------------------------------
    async def list_alerts(self, kind: str | None, limit: int, after: str | None) -> dict:
        """Alerts newest first; `after` (an alert id) returns only newer ones (for --follow)."""
        if kind is not None and kind not in ALERT_KINDS:
            raise ApiError(400, f"unknown alert kind {kind!r}: use one of {', '.join(ALERT_KINDS)}")
        if not 1 <= limit <= 1000:
            raise ApiError(400, "limit must be in [1, 1000]")
        alerts = await asyncio.to_thread(self.alerts.list, limit, kind)
        if after is not None:
            alerts = [a for a in alerts if _stream_id(a.id) > _stream_id(after)]
        return {"alerts": [json.loads(a.to_json()) for a in alerts]}
