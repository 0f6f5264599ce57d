"""Gateway: the HTTP ingress (FastAPI on Ray Serve). Auth, validation, per-key policy, rate
limits, fan-out of batched prompts to GatedLLM, server-sent events, shadow sampling off the
response path, audit records, metrics and the admin API."""


import asyncio
import hashlib
import hmac
import json
import logging
import time

import redis
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs.approval import verify, webhook_secret
from jobs.registry import PredictorRegistry, RegistryError
from jobs.rollout import APPROVED, Controller, RolloutStore
from monitor.alerts import KINDS as ALERT_KINDS
from monitor.alerts import AlertStore
from serving.control import ControlState, ControlStore, ControlUpdate, StateFollower, shadow_sampled
from serving.engine import GenRequest, GenResult
from serving.metrics import Metrics
from serving.protocol import CompletionRequest, completion_body, error_body, new_request_id
from serving.settings import KeyPolicy, Settings

log = logging.getLogger(__name__)
app = FastAPI(title="shadowgate", docs_url=None, redoc_url=None)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        self.status, self.message, self.kind = status, message, kind


@app.exception_handler(ApiError)
async def _api_error(request, exc: ApiError):
    return JSONResponse(error_body(exc.message, exc.kind), status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(request, exc: RequestValidationError):
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"] if p != "body")
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return JSONResponse(error_body("; ".join(parts) or "invalid request"), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request, exc: StarletteHTTPException):
    return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code)


def _stream_id(entry: str) -> tuple[int, int]:
    """A Redis stream id ("ms-seq", an alert's id) as a sortable pair; junk sorts first."""
    ms, _, seq = entry.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        raise ApiError(400, f"{entry!r} is not an alert id") from None


def key_id(secret: str) -> str:
    """A stable, non-reversible name for a key: what logs, metrics and records carry."""
    return "key-" + hashlib.sha256(secret.encode()).hexdigest()[:12]


@serve.deployment(name="Gateway")
@serve.ingress(app)
class Gateway:
    async def __init__(self, settings: Settings, llm, shadow, monitor=None):
        self.settings, self.llm, self.shadow, self.monitor = settings, llm, shadow, monitor
        self.prefix = settings.redis.prefix
        self.keys = {}
        for entry in settings.api_keys:
            secret = entry.key.get_secret_value()
            self.keys[secret] = (entry.name or key_id(secret), settings.policy_for(entry))
        self.admin = settings.admin_key.get_secret_value() if settings.admin_key else None
        self.metrics = Metrics()
        self.r = aioredis.from_url(settings.redis.url)
        self.store = ControlStore(redis.Redis.from_url(settings.redis.url), self.prefix)
        self.follower = StateFollower(settings.redis.url, self.prefix, "gateway", settings.serve.defaults,
                                      self._apply, settings.serve.reconcile_s)
        await self.follower.start()
        self.inflight = 0
        self.feature_writes = 0  # feature-row writes in flight: bounded, beyond it rows are dropped
        self.tasks: set[asyncio.Task] = set()
        self.alerts = AlertStore(redis.Redis.from_url(settings.redis.url), self.prefix, settings.alerts)
        self.registry = PredictorRegistry(settings.mlflow.tracking_uri, settings.mlflow.registered_model)
        self.model_name = settings.model.name
        self.warm = False

    async def _apply(self, state: ControlState) -> None:
        self.metrics.generation.set(state.generation)

    # ---- auth -----------------------------------------------------------------------------
    def _bearer(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        if not header:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "malformed Authorization header: expected 'Bearer <key>'", "authentication_error")
        return token.strip()

    def client(self, request: Request) -> tuple[str, KeyPolicy]:
        token = self._bearer(request)
        for secret, ident in self.keys.items():
            if hmac.compare_digest(secret, token):
                return ident
        if self.admin and hmac.compare_digest(self.admin, token):
            raise ApiError(403, "the admin key is for /admin endpoints only", "permission_error")
        raise ApiError(401, "invalid API key", "authentication_error")

    def require_admin(self, request: Request) -> None:
        token = self._bearer(request)
        if self.admin is None:
            raise ApiError(403, "the admin API is disabled: no admin key is configured", "permission_error")
        if not hmac.compare_digest(self.admin, token):
            raise ApiError(403, "this endpoint needs the admin key", "permission_error")

    async def rate_limit(self, ident: str, policy: KeyPolicy) -> None:
        if policy.rate_limit_per_min is None:
            return
        window = int(time.time() // 60)
        key = f"{self.prefix}:rate:{ident}:{window}"
        count = await self.r.incr(key)
        if count == 1:
            await self.r.expire(key, 120)
        if count > policy.rate_limit_per_min:
            raise ApiError(429, f"rate limit of {policy.rate_limit_per_min} requests per minute exceeded",
                           "rate_limit_error")

    # ---- health ---------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        try:
            await self.r.ping()
            info = await self.llm.ready.remote()
        except Exception as exc:
            return JSONResponse({"status": "not ready", "reason": type(exc).__name__}, status_code=503)
        self.warm = True
        return {"status": "ready", "generation": self.follower.state.generation, "llm": info}

    @app.get("/metrics")
    async def metrics_endpoint(self):
        try:
            raw = await asyncio.wait_for(self.r.get(f"{self.prefix}:monitor:summary"), 2.0)
            self.metrics.set_monitor(json.loads(raw) if raw else None, time.time())
        except (redis.RedisError, asyncio.TimeoutError, OSError):
            pass  # the request metrics are still worth serving
        return PlainTextResponse(generate_latest(self.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(self, request: Request):
        self.client(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "shadowgate"}]}

    # ---- completions ----------------------------------------------------------------------
    def _gen_requests(self, body: CompletionRequest, rid: str, policy: KeyPolicy) -> list[GenRequest]:
        lo, hi = policy.min_sparsity, policy.max_sparsity
        if body.sparsity is not None and not lo <= body.sparsity <= hi:
            raise ApiError(400, f"sparsity {body.sparsity} is outside this key's bounds [{lo}, {hi}]")
        limit = self.settings.serve.max_tokens_limit
        if body.max_tokens > limit:
            raise ApiError(400, f"max_tokens {body.max_tokens} exceeds this server's limit of {limit}")
        if body.model not in (None, self.model_name):
            raise ApiError(404, f"model {body.model!r} is not served here (served: {self.model_name!r})",
                           "not_found_error")
        prompts = body.prompts()
        return [GenRequest(request_id=rid if len(prompts) == 1 else f"{rid}-{i}", prompt=p,
                           max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                           seed=body.seed, stop=body.stops(), logprobs=body.logprobs, echo=body.echo,
                           sparsity=body.sparsity, bounds=(lo, hi)) for i, p in enumerate(prompts)]

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        t0 = time.perf_counter()
        ident, policy = self.client(request)
        await self.rate_limit(ident, policy)
        try:
            raw = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        try:
            body = CompletionRequest.model_validate(raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        rid = request.headers.get("x-request-id") or new_request_id()
        reqs = self._gen_requests(body, rid, policy)
        if body.stream:
            return StreamingResponse(self._stream(reqs[0], body, ident, policy, t0),
                                     media_type="text/event-stream")
        results = await asyncio.gather(*(self.llm.complete.remote(q) for q in reqs))
        errors = [r["error"] for r in results if isinstance(r, dict)]
        if errors:
            self.metrics.requests.labels("400", "none").inc()
            raise ApiError(400, errors[0])
        choices, ext = [], []
        for i, (q, res) in enumerate(zip(reqs, results)):
            text = res.prompt_text + res.text
            choices.append({"index": i, "text": text, "logprobs": res.logprobs, "finish_reason": res.finish_reason})
            ext.append(self._finish(res, ident, policy))
        usage = {"prompt_tokens": sum(len(r.prompt_ids) for r in results),
                 "completion_tokens": sum(len(r.token_ids) for r in results)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.metrics.latency.labels("false").observe(time.perf_counter() - t0)
        return completion_body(rid, self.model_name, choices, usage, ext[0] if len(ext) == 1 else {"choices": ext})

    async def _stream(self, q: GenRequest, body: CompletionRequest, ident: str, policy: KeyPolicy, t0: float):
        def event(data) -> str:
            return f"data: {json.dumps(data)}\n\n"

        res = None
        async for chunk in self.llm.options(stream=True).stream.remote(q):
            if "error" in chunk:
                yield event(error_body(chunk["error"]))
                break
            if "result" in chunk:
                res = chunk["result"]
                continue
            yield event({"id": q.request_id, "object": "text_completion", "created": int(time.time()),
                         "model": self.model_name,
                         "choices": [{"index": 0, "text": chunk["text"], "logprobs": None, "finish_reason": None}]})
        if res is not None:
            ext = self._finish(res, ident, policy)
            final = {"id": q.request_id, "object": "text_completion", "created": int(time.time()),
                     "model": self.model_name,
                     "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": res.finish_reason}],
                     "shadowgate": ext}
            if body.stream_options and body.stream_options.get("include_usage"):
                final["usage"] = {"prompt_tokens": len(res.prompt_ids), "completion_tokens": len(res.token_ids),
                                  "total_tokens": len(res.prompt_ids) + len(res.token_ids)}
            yield event(final)
            self.metrics.latency.labels("true").observe(time.perf_counter() - t0)
        yield "data: [DONE]\n\n"

    def _finish(self, res: GenResult, ident: str, policy: KeyPolicy) -> dict:
        """After a prompt is served: metrics, shadow sampling, the audit record. Never awaits
        anything slow: the shadow run and the audit write are background tasks."""
        m = self.metrics
        m.requests.labels("200", res.arm).inc()
        m.tokens.labels("prompt").inc(len(res.prompt_ids))
        m.tokens.labels("completion").inc(len(res.token_ids))
        m.sparsity.labels("requested").observe(res.sparsity)
        m.sparsity.labels("effective").observe(res.effective_sparsity)
        shadowed = False
        state = self.follower.state
        if res.token_ids and policy.shadow and shadow_sampled(res.request_id, state.shadow_rate):
            if self.inflight >= self.settings.serve.shadow_max_inflight:
                m.shadow_dropped.labels("saturated").inc()
            else:
                shadowed = True
                self.inflight += 1  # counted now, not when the task first runs: the bound is exact
                self._spawn(self._shadow(res, ident, policy))
        ext = {"request_id": res.request_id, "predictor_version": res.version, "arm": res.arm,
               "sparsity": res.sparsity, "effective_sparsity": round(res.effective_sparsity, 4),
               "fallback": res.fallback, "generation": res.generation, "shadowed": shadowed}
        if res.fallback_reason:
            ext["fallback_reason"] = res.fallback_reason
        if res.features is not None:
            self._write_features(res)
        record = {**ext, "key": ident, "created": time.time(), "prompt_tokens": len(res.prompt_ids),
                  "completion_tokens": len(res.token_ids), "finish_reason": res.finish_reason,
                  "mode": res.mode, "layers": res.mask}
        self._spawn(self.r.set(f"{self.prefix}:audit:{res.request_id}", json.dumps(record),
                               ex=self.settings.serve.audit_retention_s))
        return ext

    def _write_features(self, res: GenResult) -> None:
        """The request's drift feature row to the capped stream, off the response path: when
        Redis is slow or down the row is dropped and counted, never raised to the client."""
        if self.feature_writes >= 4 * self.settings.serve.max_ongoing_requests:
            self.metrics.features_dropped.labels("backlog").inc()
            return
        self.feature_writes += 1
        row = {**res.features, "request_id": res.request_id, "arm": res.arm, "ts": time.time()}
        self._spawn(self._xadd_features(json.dumps(row)))

    async def _xadd_features(self, row: str) -> None:
        try:
            await asyncio.wait_for(self.r.xadd(f"{self.prefix}:features", {"row": row},
                                               maxlen=self.settings.monitor.features_maxlen, approximate=True),
                                   timeout=1.0)
            self.metrics.features_written.inc()
        except (redis.RedisError, asyncio.TimeoutError, OSError):
            self.metrics.features_dropped.labels("redis").inc()
        finally:
            self.feature_writes -= 1

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _shadow(self, res: GenResult, ident: str, policy: KeyPolicy) -> None:
        self.metrics.shadow_inflight.set(self.inflight)
        self.metrics.shadow_sampled.inc()
        sample = {"request_id": res.request_id, "prompt_ids": res.prompt_ids, "token_ids": res.token_ids,
                  "version": res.version, "arm": res.arm, "sparsity": res.sparsity, "generation": res.generation,
                  "key": ident, "retention_s": policy.shadow_retention_s}
        try:
            summary = await self.shadow.run.remote(sample)
            version = summary["version"] or "dense"
            self.metrics.fid_kl.labels(version).observe(summary["kl_mean"])
            self.metrics.fid_top1.labels(version).observe(summary["top1_agreement"])
            self.metrics.fid_exact.labels(version, str(summary["exact_match"]).lower()).inc()
        except Exception:
            self.metrics.shadow_failed.inc()
            log.exception("shadow run of %s failed", res.request_id)
        finally:
            self.inflight -= 1
            self.metrics.shadow_inflight.set(self.inflight)

    # ---- audit ----------------------------------------------------------------------------
    @app.get("/v1/requests/{request_id}")
    async def audit(self, request_id: str, request: Request):
        token = self._bearer(request)
        is_admin = self.admin is not None and hmac.compare_digest(self.admin, token)
        ident = None if is_admin else self.client(request)[0]
        raw = await self.r.get(f"{self.prefix}:audit:{request_id}")
        record = json.loads(raw) if raw else None
        if record is None or (ident is not None and record["key"] != ident):
            raise ApiError(404, f"no audit record for request {request_id!r} (unknown, expired, or not yours)",
                           "not_found_error")
        shadow = await self.r.get(f"{self.prefix}:audit:{request_id}:shadow")
        record["shadow"] = json.loads(shadow) if shadow else None
        return record

    # ---- admin ----------------------------------------------------------------------------
    @app.get("/admin/state")
    async def get_state(self, request: Request):
        self.require_admin(request)
        state = await asyncio.to_thread(self.store.get)
        replicas = await asyncio.to_thread(self.store.replica_reports, 3 * self.settings.serve.reconcile_s + 5)
        return {"state": state.model_dump() if state else None, "replicas": replicas}

    @app.put("/admin/state")
    async def put_state(self, request: Request):
        self.require_admin(request)
        try:
            change = ControlUpdate.model_validate(await request.json())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        for field in ("champion", "challenger"):
            version = getattr(change, field)
            if version is not None and version.isdigit():
                await self._require_version(field, version)
        state = await asyncio.to_thread(self.store.update, change, "admin-api")
        log.info("control state generation %d written by the admin API", state.generation)
        return {"state": state.model_dump()}

    async def _require_version(self, field: str, version: str) -> None:
        """A state naming a predictor version the registry does not hold is refused (4xx);
        the registry being unreachable is a 503, never a silent accept."""
        try:
            exists = await asyncio.to_thread(self.registry.exists, version)
        except RegistryError as exc:
            raise ApiError(503, f"cannot check {field} version {version}: {exc}", "service_unavailable") from None
        if not exists:
            raise ApiError(404, f"{field} version {version} does not exist in the registry "
                                f"({self.settings.mlflow.registered_model})", "not_found_error")

    @app.get("/admin/monitor")
    async def monitor_status(self, request: Request):
        """The monitor's fidelity windows, drift checks and stream lag, and which instance is active."""
        self.require_admin(request)
        summary, status, lease = await asyncio.gather(
            self.r.get(f"{self.prefix}:monitor:summary"), self.r.get(f"{self.prefix}:monitor:status"),
            self.r.get(f"{self.prefix}:monitor:lease"))
        summary = json.loads(summary) if summary else None
        return {"active": lease.decode() if lease else None, "status": json.loads(status) if status else None,
                "summary": summary, "age_s": round(time.time() - summary["ts"], 3) if summary else None}

    # ---- the adaptation loop --------------------------------------------------------------
    @app.post("/hooks/mlflow")
    async def mlflow_hook(self, request: Request):
        """MLflow registry webhook deliveries (alias/tag events): signature checked, queued for
        the rollout controller, which also polls."""
        body = await request.body()
        h = request.headers
        secret = await asyncio.to_thread(webhook_secret, self.settings, self.store.r)
        problem = verify(secret, h.get("x-mlflow-delivery-id"), h.get("x-mlflow-timestamp"), body,
                         h.get("x-mlflow-signature"))
        if problem:
            raise ApiError(401, f"webhook delivery refused: {problem}", "authentication_error")
        try:
            event = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the delivery body is not valid JSON") from None
        if not isinstance(event, dict):
            raise ApiError(400, "the delivery body must be a JSON object")
        event["delivery_id"] = h.get("x-mlflow-delivery-id")
        await asyncio.to_thread(RolloutStore(self.store.r, self.prefix).event, event)
        await self.r.incr(f"{self.prefix}:rollout:webhook_deliveries")
        return {"ok": True}

    @app.get("/admin/rollout")
    async def rollout_status(self, request: Request):
        """Champion, challenger, canary share and evidence, fallback, the last decisions."""
        self.require_admin(request)
        try:
            return await asyncio.to_thread(Controller(self.settings, self.store.r, self.registry).status)
        except RegistryError as exc:
            raise ApiError(503, str(exc), "service_unavailable") from None

    @app.post("/admin/rollout/approve/{version}")
    async def rollout_approve(self, version: str, request: Request):
        """Approve a version: the alias `approved`, the same one a person sets in the MLflow UI."""
        self.require_admin(request)
        if not version.isdigit():
            raise ApiError(400, f"a version is a number, not {version!r}")
        await self._require_version("approved", version)
        await asyncio.to_thread(self.registry.set_alias, APPROVED, version)
        await asyncio.to_thread(RolloutStore(self.store.r, self.prefix).decide, "approved", version, {},
                                "admin-api")
        return {"version": version, "alias": APPROVED}

    @app.post("/admin/rollout/rollback")
    async def rollout_rollback(self, request: Request):
        """Ask the controller to roll back the challenger now; waits for its decision."""
        self.require_admin(request)
        try:
            body = await request.json() if await request.body() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
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

    @app.get("/admin/alerts")
    async def list_alerts(self, request: Request, kind: str | None = None, limit: int = 50, after: str | None = None):
        """Alerts newest first; `after` (an alert id) returns only newer ones (for --follow)."""
        self.require_admin(request)
        if kind is not None and kind not in ALERT_KINDS:
            raise ApiError(400, f"unknown alert kind {kind!r}: use one of {', '.join(ALERT_KINDS)}")
        if not 1 <= limit <= 1000:
            raise ApiError(400, "limit must be in [1, 1000]")
        alerts = await asyncio.to_thread(self.alerts.list, limit, kind)
        if after is not None:
            alerts = [a for a in alerts if _stream_id(a.id) > _stream_id(after)]
        return {"alerts": [json.loads(a.to_json()) for a in alerts]}
