"""The completions path of the gateway: validation against the gateway's and the key's bounds,
the rate limit, fan-out of batched prompts to GatedLLM, server-sent events, and what follows a
served prompt off the response path (metrics, shadow sampling, the feature row, the audit
record), plus reading an audit record back.

Every prompt is bounded before any work is queued (prompts, bytes per prompt before
tokenizing, tokens). Work whose GatedLLM replica dies before it streamed anything is retried
on another (or the restarted) replica."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator, Callable

import redis
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from monitor.keys import Keys
from serving.api.auth import Identity, RateLimiter, check_sparsity, max_prompts, max_request_tokens
from serving.api.metrics import Metrics
from serving.api.protocol import REQUEST_ID, ApiError, CompletionRequest, completion_body, error_body
from serving.replica.control import ControlState, shadow_sampled
from serving.replica.engine import GenRequest, GenResult
from serving.settings import KeyPolicy, Settings

log = logging.getLogger(__name__)
# a replica that died or cannot be reached: the call never ran to its end there
RETRYABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


def _event(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


class Completions:
    """`create` answers one POST /v1/completions; `state` returns the control state in force
    (the gateway's follower applies it)."""

    def __init__(self, settings: Settings, llm, shadow, r, metrics: Metrics, limiter: RateLimiter,
                 state: Callable[[], ControlState], tokenizer, model_name: str):
        self.settings, self.gw, self.keys = settings, settings.gateway, Keys(settings.redis.prefix)
        self.llm, self.shadow, self.r, self.metrics, self.limiter = llm, shadow, r, metrics, limiter
        self.state, self.tokenizer, self.model_name = state, tokenizer, model_name
        self.inflight = 0  # shadow runs in flight (serve.shadow_max_inflight bounds them)
        self.feature_writes = 0  # feature-row writes in flight: bounded, beyond it rows are dropped
        self.tasks: set[asyncio.Task] = set()

    # ---- validation -----------------------------------------------------------------------
    def _refuse(self, reason: str, message: str, status: int = 400) -> ApiError:
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
        most = max_prompts(policy, gw)
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
        most = max_request_tokens(policy, gw)
        if tokens > most:
            raise self._refuse("tokens", f"this request needs {tokens} tokens (prompt tokens + max_tokens per "
                                         f"prompt): at most {most}")
        return prompts, tokens

    async def _gen_requests(self, body: CompletionRequest, rid: str,
                            policy: KeyPolicy) -> tuple[list[GenRequest], int]:
        check_sparsity(policy, body.sparsity)
        limit = self.settings.serve.max_tokens_limit
        if body.max_tokens > limit:
            raise ApiError(400, f"max_tokens {body.max_tokens} exceeds this server's limit of {limit}")
        if body.model not in (None, self.model_name):
            raise ApiError(404, f"model {body.model!r} is not served here (served: {self.model_name!r})",
                           "not_found_error")
        prompts, tokens = await self._bounded_ids(body, policy)
        bounds = (policy.min_sparsity, policy.max_sparsity)
        reqs = [GenRequest(request_id=rid if len(prompts) == 1 else f"{rid}-{i}", prompt=p,
                           max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                           seed=body.seed, stop=body.stops(), logprobs=body.logprobs, echo=body.echo,
                           sparsity=body.sparsity, bounds=bounds) for i, p in enumerate(prompts)]
        return reqs, tokens

    # ---- the request ----------------------------------------------------------------------
    async def create(self, ident: Identity, raw, rid: str, corr: str | None,
                     t0: float) -> dict | AsyncIterator[str]:
        """The response body, or the server-sent events of a stream. `raw` is the parsed JSON
        body; `rid` the server's request id (the canary arm and shadow sampling hash it, the
        audit record is keyed by it); `corr` the client's X-Request-ID, only carried along."""
        try:
            body = CompletionRequest.model_validate(raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        reqs, tokens = await self._gen_requests(body, rid, ident.policy)
        await self.limiter.check(ident, len(reqs), tokens)
        if body.stream:
            return self._stream(reqs[0], body, ident, corr, t0)
        results = await asyncio.gather(*(self._complete(q) for q in reqs))
        errors = [r["error"] for r in results if isinstance(r, dict)]
        if errors:
            self.metrics.requests.labels("400", "none").inc()
            raise ApiError(400, errors[0])
        choices, ext = [], []
        for i, res in enumerate(results):
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

    async def _stream(self, q: GenRequest, body: CompletionRequest, ident: Identity, corr: str | None,
                      t0: float) -> AsyncIterator[str]:
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
                    yield _event({"id": q.request_id, "object": "text_completion", "created": int(time.time()),
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
            yield _event(failed)
        elif res is not None:
            ext = self._finish(res, ident, corr)
            final = {"id": q.request_id, "object": "text_completion", "created": int(time.time()),
                     "model": self.model_name,
                     "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": res.finish_reason}],
                     "shadowgate": ext}
            if body.stream_options and body.stream_options.include_usage:
                final["usage"] = {"prompt_tokens": len(res.prompt_ids), "completion_tokens": len(res.token_ids),
                                  "total_tokens": len(res.prompt_ids) + len(res.token_ids)}
            yield _event(final)
            self.metrics.latency.labels("true").observe(time.perf_counter() - t0)
        yield "data: [DONE]\n\n"

    # ---- after a prompt is served, off the response path ----------------------------------
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
        if res.token_ids and policy.shadow and shadow_sampled(res.request_id, self.state().shadow_rate):
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
            await self.r.set(self.keys.audit(rid), record, ex=self.settings.serve.audit_retention_s, nx=True)
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
            await asyncio.wait_for(self.r.xadd(self.keys.features, {"row": row},
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

    # ---- the audit record -----------------------------------------------------------------
    async def audit_record(self, who: Identity, request_id: str) -> dict:
        """A request's audit record (and its shadow summary): a client key reads its own only."""
        record = None
        if REQUEST_ID.fullmatch(request_id):  # an id the server issued, nothing else (no ":shadow")
            raw = await self.r.get(self.keys.audit(request_id))
            record = json.loads(raw) if raw else None
        if not isinstance(record, dict) or (who.role != "admin" and record.get("key") != who.name):
            raise ApiError(404, f"no audit record for request {request_id!r} (unknown, expired, or not yours)",
                           "not_found_error")
        shadow = await self.r.get(self.keys.audit_shadow(request_id))
        record["shadow"] = json.loads(shadow) if shadow else None
        return record
