"""The gateway's FastAPI app and its route table.

Every request gets a server-issued id (X-Shadowgate-Request-Id on every response), every
failure is a JSON error, and a catch-all turns anything unexpected into a 500 that names the
request id, never a trace. Bodies are read here, bounded (gateway.max_body_bytes) before they
are all read; the routes check the key and hand over to the completions path (completions.py)
or the admin API (admin.py).

`Routes` is the route table: the Gateway deployment (gateway.py) inherits it and provides
`settings`, `r` (asyncio Redis), `llm`, `follower`, `metrics`, `auth` (auth.Authenticator),
`completer` (completions.Completions), `admin` (admin.Admin), `model_name` and `warm`."""

import asyncio
import json
import logging
import time

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from monitor.keys import Keys
from serving.api.metrics import Metrics
from serving.api.protocol import ApiError, completion_schema, correlation_id, error_body, new_request_id
from serving.replica.control import ControlUpdate

log = logging.getLogger(__name__)
app = FastAPI(title="shadowgate", docs_url=None, redoc_url=None, openapi_url=None)
_COMPLETION = completion_schema()


class _Guard:
    """Outermost ASGI layer: issues the request id (X-Shadowgate-Request-Id on every
    response) and turns an exception nothing else handled into a JSON 500 naming it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (b"x-shadowgate-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            log.error("request %s failed: %s", rid, type(exc).__name__, exc_info=True)
            if not started:
                body = error_body(f"internal error; quote request id {rid}", "server_error")
                body["error"]["request_id"] = rid
                await JSONResponse(body, status_code=500)(scope, receive, send_with_id)


app.add_middleware(_Guard)


@app.exception_handler(ApiError)
async def _api_error(request, exc: ApiError):
    return JSONResponse(error_body(exc.message, exc.kind), status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(request, exc: RequestValidationError):
    parts = []
    for e in exc.errors()[:5]:  # a 10,000-element body yields as many errors: the first few say it
        loc = ".".join(str(p) for p in e["loc"] if p != "body")
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return JSONResponse(error_body("; ".join(parts) or "invalid request"), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request, exc: StarletteHTTPException):
    return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code)


@app.exception_handler(redis.RedisError)
async def _redis_error(request, exc: redis.RedisError):
    log.warning("Redis unavailable during %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return JSONResponse(error_body("the control store (Redis) is unavailable; retry later", "service_unavailable"),
                        status_code=503)


def _openapi() -> dict:
    """FastAPI's schema plus the completion body, which the route parses itself."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version="1", routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(_COMPLETION["components"])
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi


async def read_body(request: Request, limit: int, metrics: Metrics) -> bytes:
    """The body, at most `limit` bytes (413 beyond, before it is all read)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        metrics.refused.labels("body_size").inc()
        raise ApiError(413, f"the request body exceeds {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            metrics.refused.labels("body_size").inc()
            raise ApiError(413, f"the request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int, metrics: Metrics, empty=None):
    """The body as JSON, refused as a 4xx when it is not JSON (too deep, not UTF-8)."""
    raw = await read_body(request, limit, metrics)
    if not raw and empty is not None:
        return empty
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None


class Routes:
    def _body(self, request: Request):
        return read_body(request, self.settings.gateway.max_body_bytes, self.metrics)

    def _json(self, request: Request, empty=None):
        return read_json(request, self.settings.gateway.max_body_bytes, self.metrics, empty)

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
        info = {k: v for k, v in info.items() if k != "pid"}  # no process details to anyone who asks
        return {"status": "ready", "generation": self.follower.state.generation, "llm": info}

    @app.get("/metrics")
    async def metrics_endpoint(self, request: Request):
        if not self.settings.gateway.metrics_public:
            await self.auth.admin(request)
        try:
            raw = await asyncio.wait_for(self.r.get(Keys(self.settings.redis.prefix).monitor_summary), 2.0)
            self.metrics.set_monitor(json.loads(raw) if raw else None, time.time())
        except (redis.RedisError, asyncio.TimeoutError, OSError):
            pass  # the request metrics are still worth serving
        return PlainTextResponse(generate_latest(self.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_endpoint(self, request: Request):
        if not self.settings.gateway.openapi_public:
            await self.auth.identity(request)  # any valid key, client or admin
        return JSONResponse(app.openapi())

    # ---- the OpenAI API -------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self, request: Request):
        await self.auth.client(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "shadowgate"}]}

    @app.post("/v1/completions", openapi_extra={"requestBody": _COMPLETION["body"]})
    async def completions(self, request: Request):
        t0 = time.perf_counter()
        ident = await self.auth.client(request)
        raw = await self._json(request)
        # the id is the server's (the _Guard's); the client's X-Request-ID is only carried along
        out = await self.completer.create(ident, raw, request.state.request_id,
                                            correlation_id(request.headers.get("x-request-id")), t0)
        return out if isinstance(out, dict) else StreamingResponse(out, media_type="text/event-stream")

    @app.get("/v1/requests/{request_id}")
    async def audit(self, request_id: str, request: Request):
        who = await self.auth.identity(request)
        return await self.completer.audit_record(who, request_id)

    # ---- admin ----------------------------------------------------------------------------
    @app.get("/admin/state")
    async def get_state(self, request: Request):
        await self.auth.admin(request)
        return await self.admin.state()

    @app.put("/admin/state", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": ControlUpdate.model_json_schema()}}}})
    async def put_state(self, request: Request):
        await self.auth.admin(request)
        return await self.admin.put_state(await self._json(request))

    @app.get("/admin/monitor")
    async def monitor_status(self, request: Request):
        """The monitor's fidelity windows, drift checks and stream lag, and which instance is active."""
        await self.auth.admin(request)
        return await self.admin.monitor()

    @app.post("/hooks/mlflow")
    async def mlflow_hook(self, request: Request):
        """MLflow registry webhook deliveries (alias/tag events): signature checked, queued for
        the rollout controller, which also polls."""
        return await self.admin.webhook(await self._body(request), request.headers)

    @app.get("/admin/rollout")
    async def rollout_status(self, request: Request):
        """Champion, challenger, canary share and evidence, fallback, the last decisions."""
        await self.auth.admin(request)
        return await self.admin.rollout()

    @app.post("/admin/rollout/approve/{version}")
    async def rollout_approve(self, version: str, request: Request):
        """Approve a version: the alias `approved`, the same one a person sets in the MLflow UI."""
        await self.auth.admin(request)
        return await self.admin.approve(version)

    @app.post("/admin/rollout/rollback", openapi_extra={"requestBody": {"required": False, "content": {
        "application/json": {"schema": {"type": "object", "properties": {"reason": {"type": "string", "maxLength": 500}}}}}}})
    async def rollout_rollback(self, request: Request):
        """Ask the controller to roll back the challenger now; waits for its decision."""
        await self.auth.admin(request)
        return await self.admin.rollback(await self._json(request, empty={}))

    @app.get("/admin/alerts")
    async def list_alerts(self, request: Request, kind: str | None = None, limit: int = 50, after: str | None = None):
        """Alerts newest first; `after` (an alert id) returns only newer ones (for --follow)."""
        await self.auth.admin(request)
        return await self.admin.list_alerts(kind, limit, after)
