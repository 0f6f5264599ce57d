"""Gateway: the HTTP ingress (FastAPI on Ray Serve). Auth, validation, per-key policy, rate
limits, fan-out of batched prompts to GatedLLM, server-sent events, shadow sampling off the
response path, audit records, metrics and the admin API.

Every request is bounded before any work is queued (body bytes, prompts, bytes per prompt
before tokenizing, tokens), gets a server-issued id, and every failure is a JSON error: a
catch-all turns anything unexpected into a 500 that names the request id, never a trace.
Work whose GatedLLM replica dies before it streamed anything is retried on another (or the
restarted) replica."""


import asyncio
import json
import logging
import re
import time

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs.approval import verify, webhook_secret
from jobs.registry import PredictorRegistry, RegistryError
from jobs.rollout import APPROVED, Controller, RolloutStore
from monitor.alerts import KINDS as ALERT_KINDS
from monitor.alerts import AlertStore
from monitor.redis_client import async_redis_client, redis_client
from serving.replica.control import ControlState, ControlStore, ControlUpdate, StateFollower, shadow_sampled
from serving.replica.engine import GenRequest, GenResult
from serving.api.auth import Identity, KeyRing
from serving.api.metrics import Metrics
from serving.api.protocol import (REQUEST_ID, CompletionRequest, completion_body, completion_schema, correlation_id,
                              error_body, new_request_id)
from serving.settings import KeyPolicy, Settings

log = logging.getLogger(__name__)
app = FastAPI(title="shadowgate", docs_url=None, redoc_url=None, openapi_url=None)
_COMPLETION = completion_schema()
# a replica that died or cannot be reached: the call never ran to its end there
_VERSION = re.compile(r"[0-9]{1,9}")
RETRYABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        self.status, self.message, self.kind = status, message, kind


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


def _stream_id(entry: str) -> tuple[int, int]:
    """A Redis stream id ("ms-seq", an alert's id) as a sortable pair; junk sorts first."""
    ms, _, seq = entry.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        raise ApiError(400, f"{entry!r} is not an alert id") from None


def _load_tokenizer(name: str):
    """The served model's tokenizer: prompts are bounded in tokens before any replica sees them."""
    from transformers import AutoTokenizer

    from adapter.embedded.recipe import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(name))


@serve.deployment(name="Gateway")
@serve.ingress(app)
class Gateway:
    async def __init__(self, settings: Settings, llm, shadow, monitor=None):
        self.settings, self.llm, self.shadow, self.monitor = settings, llm, shadow, monitor
        self.gw = settings.gateway
        self.prefix = settings.redis.prefix
        self.keys = await asyncio.to_thread(KeyRing, settings)
        self.metrics = Metrics()
        self.r = async_redis_client(settings.redis)
        self._local_rate: dict[tuple[str, int], int] = {}  # rate counters while Redis is down
        self._local_rate_warned = False
        self.store = ControlStore(redis_client(settings.redis), self.prefix)
        self.follower = StateFollower(settings.redis, self.prefix, "gateway", settings.serve.defaults,
                                      self._apply, settings.serve.reconcile_s)
        await self.follower.start()
        self.inflight = 0
        self.feature_writes = 0  # feature-row writes in flight: bounded, beyond it rows are dropped
        self.tasks: set[asyncio.Task] = set()
        self.alerts = AlertStore(redis_client(settings.redis), self.prefix, settings.alerts)
        self.registry = PredictorRegistry(settings.mlflow.tracking_uri, settings.mlflow.registered_model)
        self.model_name = settings.model.name
        try:
            self.tokenizer = await asyncio.to_thread(_load_tokenizer, settings.model.name)
        except Exception as exc:  # counted in UTF-8 bytes then: never fewer than the tokens
            log.warning("no tokenizer in the gateway (%s): prompts are bounded by bytes", type(exc).__name__)
            self.tokenizer = None
        self.warm = False

    async def _apply(self, state: ControlState) -> None:
        self.metrics.generation.set(state.generation)

    # ---- auth -----------------------------------------------------------------------------
    def _token(self, request: Request) -> bytes:
        header = request.headers.get("authorization", "")
        if not header:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "malformed Authorization header: expected 'Bearer <key>'", "authentication_error")
        # headers arrive as latin-1: back to the bytes the client sent, compared as bytes
        return token.strip().encode("latin-1")

    async def identity(self, request: Request) -> Identity:
        token = self._token(request)
        known, ident = self.keys.cached(token)
        if not known:  # at most one scrypt per key and process, off the event loop
            ident = await asyncio.to_thread(self.keys.lookup, token)
        if ident is None:
            raise ApiError(401, "invalid API key", "authentication_error")
        return ident

    async def client(self, request: Request) -> Identity:
        ident = await self.identity(request)
        if ident.role == "admin":
            raise ApiError(403, "the admin key is for /admin endpoints only", "permission_error")
        return ident

    async def require_admin(self, request: Request) -> Identity:
        ident = await self.identity(request)
        if ident.role != "admin":
            raise ApiError(403, "this endpoint needs the admin key", "permission_error")
        return ident

    async def rate_limit(self, ident: Identity, prompts: int, tokens: int) -> None:
        """Per key and minute: prompts (a request of n prompts counts n) and tokens (prompt
        tokens + max_tokens per prompt). A refused request gives its share back."""
        policy = ident.policy
        window = int(time.time() // 60)
        taken = []
        for limit, n, what in ((policy.rate_limit_per_min, prompts, "prompts"),
                               (policy.tokens_per_min, tokens, "tokens")):
            if limit is None:
                continue
            key = f"{self.prefix}:rate:{what}:{ident.name}:{window}"
            count = await self._count(key, n, window)
            taken.append((key, n))
            if count > limit:
                for k, m in taken:
                    await self._count(k, -m, window)
                self.metrics.refused.labels("rate_limit").inc()
                raise ApiError(429, f"rate limit of {limit} {what} per minute exceeded ({n} in this request)",
                               "rate_limit_error")

    async def _count(self, key: str, n: int, window: int) -> int:
        """Add n to a rate counter and return its total. While Redis is unreachable the
        limit is kept per gateway replica in memory (fail open to serving, not to
        unlimited): a Redis outage must not fail client requests."""
        try:
            async with self.r.pipeline(transaction=True) as pipe:
                count, _ = await pipe.incrby(key, n).expire(key, 120).execute()
            self._local_rate_warned = False
            return int(count)
        except (redis.RedisError, OSError):
            if not self._local_rate_warned:
                log.warning("Redis unreachable: rate limits are counted per gateway replica until it returns")
                self._local_rate_warned = True
            self._local_rate = {k: v for k, v in self._local_rate.items() if k[1] >= window - 1}
            count = self._local_rate.get((key, window), 0) + n
            self._local_rate[(key, window)] = count
            return count

    async def _read_body(self, request: Request) -> bytes:
        """The body, at most gateway.max_body_bytes (413 beyond, before it is all read)."""
        limit = self.gw.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            self.metrics.refused.labels("body_size").inc()
            raise ApiError(413, f"the request body exceeds {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                self.metrics.refused.labels("body_size").inc()
                raise ApiError(413, f"the request body exceeds {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _read_json(self, request: Request, empty=None):
        """The body as JSON, refused as a 4xx when it is not JSON (too deep, not UTF-8)."""
        raw = await self._read_body(request)
        if not raw and empty is not None:
            return empty
        try:
            return json.loads(raw)
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None

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
        if not self.gw.metrics_public:
            await self.require_admin(request)
        try:
            raw = await asyncio.wait_for(self.r.get(f"{self.prefix}:monitor:summary"), 2.0)
            self.metrics.set_monitor(json.loads(raw) if raw else None, time.time())
        except (redis.RedisError, asyncio.TimeoutError, OSError):
            pass  # the request metrics are still worth serving
        return PlainTextResponse(generate_latest(self.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_endpoint(self, request: Request):
        if not self.gw.openapi_public:
            await self.identity(request)  # any valid key, client or admin
        return JSONResponse(app.openapi())

    @app.get("/v1/models")
    async def models(self, request: Request):
        await self.client(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "shadowgate"}]}

    # ---- completions ----------------------------------------------------------------------
    def _refuse(self, reason: str, message: str, status: int = 400):
        self.metrics.refused.labels(reason).inc()
        return ApiError(status, message)

    async def _bounded_ids(self, body: CompletionRequest,
                           policy: KeyPolicy) -> tuple[list[list[int] | str], int]:
        """The prompts, checked against the gateway's and the key's bounds before any work:
        prompts per request, bytes per text prompt (before tokenizing), tokens per request
        (prompt tokens + max_tokens per prompt). Text prompts come back as token ids, so the
        replica does not tokenize them again."""
        gw = self.gw
        n = body.prompt_count()
        most = min(gw.max_prompts_per_request, policy.max_prompts or gw.max_prompts_per_request)
        if n > most:
            raise self._refuse("prompts", f"{n} prompts in one request: at most {most}")
        prompts = body.prompts()
        texts = [p for p in prompts if isinstance(p, str)]
        for text in texts:
            if len(text) > gw.max_prompt_bytes or len(text.encode()) > gw.max_prompt_bytes:
                raise self._refuse("prompt_bytes", f"a prompt of {len(text.encode())} bytes: at most "
                                                   f"{gw.max_prompt_bytes} bytes per prompt")
        if texts and self.tokenizer is not None:
            if sum(len(t) for t in texts) > 4096:  # a big batch: not on the event loop
                encoded = iter(await asyncio.to_thread(lambda: [self.tokenizer.encode(t) for t in texts]))
            else:
                encoded = iter([self.tokenizer.encode(t) for t in texts])
            prompts = [next(encoded) if isinstance(p, str) else p for p in prompts]
        tokens = sum(len(p) if isinstance(p, list) else len(p.encode()) for p in prompts) + n * body.max_tokens
        most = min(gw.max_request_tokens, policy.max_request_tokens or gw.max_request_tokens)
        if tokens > most:
            raise self._refuse("tokens", f"this request needs {tokens} tokens (prompt tokens + max_tokens per "
                                         f"prompt): at most {most}")
        return prompts, tokens

    async def _gen_requests(self, body: CompletionRequest, rid: str,
                            policy: KeyPolicy) -> tuple[list[GenRequest], int]:
        lo, hi = policy.min_sparsity, policy.max_sparsity
        if body.sparsity is not None and not lo <= body.sparsity <= hi:
            raise ApiError(400, f"sparsity {body.sparsity} is outside this key's bounds [{lo}, {hi}]")
        limit = self.settings.serve.max_tokens_limit
        if body.max_tokens > limit:
            raise ApiError(400, f"max_tokens {body.max_tokens} exceeds this server's limit of {limit}")
        if body.model not in (None, self.model_name):
            raise ApiError(404, f"model {body.model!r} is not served here (served: {self.model_name!r})",
                           "not_found_error")
        prompts, tokens = await self._bounded_ids(body, policy)
        reqs = [GenRequest(request_id=rid if len(prompts) == 1 else f"{rid}-{i}", prompt=p,
                           max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                           seed=body.seed, stop=body.stops(), logprobs=body.logprobs, echo=body.echo,
                           sparsity=body.sparsity, bounds=(lo, hi)) for i, p in enumerate(prompts)]
        return reqs, tokens

    @app.post("/v1/completions", openapi_extra={"requestBody": _COMPLETION["body"]})
    async def completions(self, request: Request):
        t0 = time.perf_counter()
        ident = await self.client(request)
        raw = await self._read_json(request)
        try:
            body = CompletionRequest.model_validate(raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        # the id is the server's: the canary arm and shadow sampling hash it, the audit record
        # is keyed by it; the client's X-Request-ID is only carried along
        rid = request.state.request_id
        corr = correlation_id(request.headers.get("x-request-id"))
        reqs, tokens = await self._gen_requests(body, rid, ident.policy)
        await self.rate_limit(ident, len(reqs), tokens)
        if body.stream:
            return StreamingResponse(self._stream(reqs[0], body, ident, corr, t0), media_type="text/event-stream")
        results = await asyncio.gather(*(self._complete(q) for q in reqs))
        errors = [r["error"] for r in results if isinstance(r, dict)]
        if errors:
            self.metrics.requests.labels("400", "none").inc()
            raise ApiError(400, errors[0])
        choices, ext = [], []
        for i, (q, res) in enumerate(zip(reqs, results)):
            text = res.prompt_text + res.text
            choices.append({"index": i, "text": text, "logprobs": res.logprobs, "finish_reason": res.finish_reason})
            ext.append(self._finish(res, ident, corr))
        usage = {"prompt_tokens": sum(len(r.prompt_ids) for r in results),
                 "completion_tokens": sum(len(r.token_ids) for r in results)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.metrics.latency.labels("false").observe(time.perf_counter() - t0)
        return completion_body(rid, self.model_name, choices, usage, ext[0] if len(ext) == 1 else {"choices": ext})

    async def _backoff(self, attempt: int, kind: str, exc: Exception, rid: str) -> None:
        self.metrics.retries.labels(kind).inc()
        log.warning("request %s: GatedLLM replica unavailable (%s), retry %d", rid, type(exc).__name__, attempt + 1)
        await asyncio.sleep(min(4.0, self.gw.retry_backoff_s * 2 ** attempt))

    async def _complete(self, q: GenRequest) -> GenResult | dict:
        """One prompt on a GatedLLM replica; retried when the replica died or is unreachable
        (nothing was returned to the client yet, so running it again is safe)."""
        for attempt in range(self.gw.retries + 1):
            try:
                return await self.llm.complete.remote(q)
            except BackPressureError:
                raise ApiError(503, "the service is at capacity; retry later", "service_unavailable") from None
            except RETRYABLE as exc:
                if attempt == self.gw.retries:
                    raise ApiError(503, f"no GatedLLM replica could serve this request after {attempt + 1} "
                                        "attempts; retry later", "service_unavailable") from None
                await self._backoff(attempt, "complete", exc, q.request_id)

    async def _stream(self, q: GenRequest, body: CompletionRequest, ident: Identity, corr: str | None, t0: float):
        def event(data) -> str:
            return f"data: {json.dumps(data)}\n\n"

        res, sent, failed = None, False, None
        for attempt in range(self.gw.retries + 1):
            try:
                async for chunk in self.llm.options(stream=True).stream.remote(q):
                    if "error" in chunk:
                        failed = error_body(chunk["error"])
                        break
                    if "result" in chunk:
                        res = chunk["result"]
                        continue
                    sent = True
                    yield event({"id": q.request_id, "object": "text_completion", "created": int(time.time()),
                                 "model": self.model_name,
                                 "choices": [{"index": 0, "text": chunk["text"], "logprobs": None,
                                              "finish_reason": None}]})
                break
            except BackPressureError:
                failed = error_body("the service is at capacity; retry later", "service_unavailable")
                break
            except RETRYABLE as exc:
                if sent or attempt == self.gw.retries:  # tokens already went out: the client must retry
                    log.warning("stream %s: GatedLLM replica died (%s)", q.request_id, type(exc).__name__)
                    failed = error_body("the replica serving this stream failed; retry the request",
                                        "server_error")
                    res = None
                    break
                await self._backoff(attempt, "stream", exc, q.request_id)
            except Exception as exc:  # the response has started: say it in the stream, never a trace
                log.error("stream %s failed: %s", q.request_id, type(exc).__name__, exc_info=True)
                failed, res = error_body(f"internal error; quote request id {q.request_id}", "server_error"), None
                break
        if failed is not None:
            yield event(failed)
        elif res is not None:
            ext = self._finish(res, ident, corr)
            final = {"id": q.request_id, "object": "text_completion", "created": int(time.time()),
                     "model": self.model_name,
                     "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": res.finish_reason}],
                     "shadowgate": ext}
            if body.stream_options and body.stream_options.include_usage:
                final["usage"] = {"prompt_tokens": len(res.prompt_ids), "completion_tokens": len(res.token_ids),
                                  "total_tokens": len(res.prompt_ids) + len(res.token_ids)}
            yield event(final)
            self.metrics.latency.labels("true").observe(time.perf_counter() - t0)
        yield "data: [DONE]\n\n"

    def _finish(self, res: GenResult, ident: Identity, corr: str | None) -> dict:
        """After a prompt is served: metrics, shadow sampling, the audit record. Never awaits
        anything slow: the shadow run and the audit write are background tasks."""
        m, policy = self.metrics, ident.policy
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
                self._spawn(self._shadow(res, ident.name, policy))
        ext = {"request_id": res.request_id, "predictor_version": res.version, "arm": res.arm,
               "sparsity": res.sparsity, "effective_sparsity": round(res.effective_sparsity, 4),
               "fallback": res.fallback, "generation": res.generation, "shadowed": shadowed}
        if res.fallback_reason:
            ext["fallback_reason"] = res.fallback_reason
        if res.features is not None:
            self._write_features(res)
        record = {**ext, "key": ident.name, "correlation_id": corr, "created": time.time(),
                  "prompt_tokens": len(res.prompt_ids), "completion_tokens": len(res.token_ids),
                  "finish_reason": res.finish_reason, "mode": res.mode, "layers": res.mask}
        self._spawn(self._write_audit(res.request_id, json.dumps(record)))
        return ext

    async def _write_audit(self, rid: str, record: str) -> None:
        """nx: a record is written once, under the server's id; nothing overwrites it."""
        try:
            await self.r.set(f"{self.prefix}:audit:{rid}", record, ex=self.settings.serve.audit_retention_s, nx=True)
        except (redis.RedisError, OSError) as exc:
            self.metrics.audit_failed.inc()
            log.warning("audit record of %s not written: %s", rid, type(exc).__name__)

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
                  "key": ident, "retention_s": policy.shadow_retention_s, "stop": list(res.stop)}
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
        who = await self.identity(request)
        record = None
        if REQUEST_ID.fullmatch(request_id):  # an id the server issued, nothing else (no ":shadow")
            raw = await self.r.get(f"{self.prefix}:audit:{request_id}")
            record = json.loads(raw) if raw else None
        if not isinstance(record, dict) or (who.role != "admin" and record.get("key") != who.name):
            raise ApiError(404, f"no audit record for request {request_id!r} (unknown, expired, or not yours)",
                           "not_found_error")
        shadow = await self.r.get(f"{self.prefix}:audit:{request_id}:shadow")
        record["shadow"] = json.loads(shadow) if shadow else None
        return record

    # ---- admin ----------------------------------------------------------------------------
    @app.get("/admin/state")
    async def get_state(self, request: Request):
        await self.require_admin(request)
        state = await asyncio.to_thread(self.store.get)
        replicas = await asyncio.to_thread(self.store.replica_reports, 3 * self.settings.serve.reconcile_s + 5)
        return {"state": state.model_dump() if state else None, "replicas": replicas}

    @app.put("/admin/state", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": ControlUpdate.model_json_schema()}}}})
    async def put_state(self, request: Request):
        await self.require_admin(request)
        try:
            change = ControlUpdate.model_validate(await self._read_json(request))
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
                await self._require_version(field, version)
        try:
            state = await asyncio.to_thread(self.store.update, change, "admin-api")
        except ValidationError as exc:  # the change is valid alone but not with the state in force
            raise RequestValidationError(exc.errors()) from None
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
        await self.require_admin(request)
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
        body = await self._read_body(request)
        h = request.headers
        names = ("x-mlflow-delivery-id", "x-mlflow-timestamp", "x-mlflow-signature")
        if not all(h.get(n, "").isascii() for n in names):  # compare_digest takes ASCII strings only
            raise ApiError(401, "webhook delivery refused: its headers are not ASCII", "authentication_error")
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
        await self.require_admin(request)
        try:
            return await asyncio.to_thread(Controller(self.settings, self.store.r, self.registry).status)
        except RegistryError as exc:
            raise ApiError(503, str(exc), "service_unavailable") from None

    @app.post("/admin/rollout/approve/{version}")
    async def rollout_approve(self, version: str, request: Request):
        """Approve a version: the alias `approved`, the same one a person sets in the MLflow UI."""
        await self.require_admin(request)
        if not _VERSION.fullmatch(version):
            raise ApiError(400, f"a version is a number, not {version!r}")
        await self._require_version("approved", version)
        await asyncio.to_thread(self.registry.set_alias, APPROVED, version)
        await asyncio.to_thread(RolloutStore(self.store.r, self.prefix).decide, "approved", version, {},
                                "admin-api")
        return {"version": version, "alias": APPROVED}

    @app.post("/admin/rollout/rollback", openapi_extra={"requestBody": {"required": False, "content": {
        "application/json": {"schema": {"type": "object", "properties": {"reason": {"type": "string", "maxLength": 500}}}}}}})
    async def rollout_rollback(self, request: Request):
        """Ask the controller to roll back the challenger now; waits for its decision."""
        await self.require_admin(request)
        body = await self._read_json(request, empty={})
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
        await self.require_admin(request)
        if kind is not None and kind not in ALERT_KINDS:
            raise ApiError(400, f"unknown alert kind {kind!r}: use one of {', '.join(ALERT_KINDS)}")
        if not 1 <= limit <= 1000:
            raise ApiError(400, "limit must be in [1, 1000]")
        alerts = await asyncio.to_thread(self.alerts.list, limit, kind)
        if after is not None:
            alerts = [a for a in alerts if _stream_id(a.id) > _stream_id(after)]
        return {"alerts": [json.loads(a.to_json()) for a in alerts]}
