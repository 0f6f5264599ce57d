"""Alerts: the one alert record of the service, its durable stream, live publish, webhooks.

The record (`Alert`, JSON with exactly these keys, `id` first):
    id                the Redis stream entry id of the alert ("<ms>-<seq>"): unique, ordered
                      in time, and `get(id)` is a direct XRANGE lookup
    kind              one of KINDS
    severity          one of SEVERITIES
    message           one human line
    predictor_version the predictor version concerned, or null
    evidence          a JSON object of what triggered it (scores, thresholds, job name, ...)
    ts                unix seconds at which it was raised (the raiser's clock)
    dedup_key         the incident it belongs to; default "<kind>:<predictor_version>"

Redis keys: the P:alerts* ones of monitor/keys.py. The stream is capped by XADD MAXLEN ~
stream_maxlen and each entry has one field {"alert": <record JSON>} (never pickle); the live
channel carries the same JSON (fire and forget: the stream is the durable copy); the dedup
key of an open incident holds its alert id and expires after cooldown_s; a delivery record
is {webhook index: {"target", "status", "attempts", "code"[, "error"]}} with targets
scheme://host only. `Notifier` reads the stream through the consumer group "notify".

One incident, one alert: the cool-down check (SET NX PX), the XADD and the PUBLISH run in one
Lua script, so a storm of identical raises from many replicas yields exactly one record and
a record is never lost behind a cool-down key that was set without it. The keys are not
hash-tagged: the service uses one Redis, not a cluster.

Webhook delivery is at least once: a notifier that dies before XACK leaves its entries
pending and another reclaims them with XAUTOCLAIM; receivers de-duplicate on the
X-Shadowgate-Alert-Id header. Signed deliveries carry X-Shadowgate-Timestamp and
X-Shadowgate-Signature: sha256=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import random
import re
import threading
import time
from collections.abc import Iterator
from typing import Literal
from urllib.parse import urlsplit

import httpx
import redis
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from monitor.keys import Keys

log = logging.getLogger(__name__)

KINDS = ("drift", "fallback", "recovered", "rollback", "promotion", "job_failure", "reconcile")
SEVERITIES = ("info", "warning", "critical")
GROUP = "notify"
BACKOFF_CAP_S = 30.0
SINCE_SKEW_S = 300.0  # tolerated clock difference between raisers and Redis
_ENTRY_ID = re.compile(r"^\d+-\d+$")


class WebhookSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    format: Literal["json", "slack"] = "json"
    secret: SecretStr | None = None
    timeout_s: float = Field(5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("webhook url must be http(s)://host/...")
        return v


class AlertSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    webhooks: list[WebhookSettings] = []
    cooldown_s: float = Field(600, gt=0)  # same dedup_key within this window is suppressed
    stream_maxlen: int = Field(10_000, ge=1)
    retries: int = Field(5, ge=1)  # delivery attempts per webhook, the first included
    backoff_s: float = Field(0.5, ge=0)  # base of the exponential backoff
    public_url: str | None = None  # base URL of the service, carried for links


def _check(kind: str, severity: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown alert kind {kind!r}; expected one of {KINDS}")
    if severity not in SEVERITIES:
        raise ValueError(f"unknown alert severity {severity!r}; expected one of {SEVERITIES}")


def _jsonable(obj):
    # Evidence often holds numpy scalars or arrays from the drift jobs.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), default=_jsonable)


@dataclasses.dataclass(frozen=True)
class Alert:
    id: str
    kind: str
    severity: str
    message: str
    predictor_version: str | None
    evidence: dict
    ts: float
    dedup_key: str

    def __post_init__(self):
        _check(self.kind, self.severity)
        if not isinstance(self.evidence, dict):
            raise ValueError("alert evidence must be a JSON object")

    def to_json(self) -> str:
        return _dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: str | bytes) -> Alert:
        fields = json.loads(data)
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(fields, dict) or set(fields) != names:
            raise ValueError(f"an alert record has exactly the keys {sorted(names)}")
        return cls(**fields)


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def _entries(resp) -> list[tuple[str, dict | None]]:
    """XREAD/XREADGROUP replies come as {stream: entries} (RESP3) or [[stream, entries]]
    (RESP2) depending on the client's protocol; we always read one stream."""
    if not resp:
        return []
    groups = resp.values() if isinstance(resp, dict) else (entries for _, entries in resp)
    out = []
    for entries in groups:
        # A RESP3 reply may wrap the entry list once more.
        if entries and isinstance(entries[0], list):
            entries = entries[0]
        out.extend((_s(e), f) for e, f in entries if e is not None)
    return out


def _record(fields: dict | None) -> bytes | str | None:
    if not fields:
        return None
    return fields.get(b"alert", fields.get("alert"))


def blocking_client(client: redis.Redis) -> redis.Redis:
    """A client like `client` with no socket timeout: redis-py's default 5 s timeout would turn
    a longer blocking XREAD/XREADGROUP into TimeoutError."""
    pool = client.connection_pool
    # Per-pool state that redis-py adds to the kwargs (maintenance handlers, saved timeouts)
    # belongs to the old pool: the new pool makes its own.
    internal = {"maint_notifications_pool_handler", "oss_cluster_maint_notifications_handler", "himport_registry"}
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k not in internal and not k.startswith("orig_")}
    kwargs["socket_timeout"] = None
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))


# Atomic raise. KEYS: dedup key, stream, suppressed hash.
# ARGV: cooldown ms, maxlen, dedup_key, the record JSON without its opening '{', channel.
# The entry id is chosen here (server clock, strictly after the stream's last id) so that
# the stored record can carry its own id.
_RAISE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
  return false
end
local last_ms, last_seq = 0, -1
if redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      local ms, seq = string.match(info[i + 1], '^(%d+)-(%d+)$')
      last_ms, last_seq = tonumber(ms), tonumber(seq)
    end
  end
end
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = 0
if ms <= last_ms then ms, seq = last_ms, last_seq + 1 end
local id = string.format('%.0f-%.0f', ms, seq)
redis.call('SET', KEYS[1], id, 'NX', 'PX', ARGV[1])
local record = '{"id":"' .. id .. '",' .. ARGV[4]
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], id, 'alert', record)
redis.call('PUBLISH', ARGV[5], record)
return id
"""


class AlertStore:
    """Raise, list and follow alerts. Redis errors (ConnectionError, TimeoutError) propagate:
    callers decide whether a failed alert is worth failing their own work for."""

    def __init__(self, client: redis.Redis, prefix: str, settings: AlertSettings):
        self.r = client
        self.prefix, self.keys = prefix, Keys(prefix)
        self.settings = settings
        self.stream = self.keys.alerts
        self.channel = self.keys.alerts_live
        self.suppressed_key = self.keys.alerts_suppressed
        self._raise = client.register_script(_RAISE)

    def dedup_key_for(self, dedup_key: str) -> str:
        return self.keys.alerts_dedup(dedup_key)

    def raise_alert(self, kind: str, severity: str, message: str, predictor_version: str | None = None,
                    evidence: dict | None = None, dedup_key: str | None = None) -> Alert | None:
        """Record and publish an alert; None when its incident (dedup_key) is still cooling down."""
        _check(kind, severity)
        predictor_version = None if predictor_version is None else str(predictor_version)
        dedup_key = dedup_key or f"{kind}:{predictor_version}"
        # Round-trip the evidence so the returned Alert equals what readers will parse.
        fields = {"kind": kind, "severity": severity, "message": " ".join(str(message).split()),
                  "predictor_version": predictor_version, "evidence": json.loads(_dumps(evidence or {})),
                  "ts": time.time(), "dedup_key": dedup_key}
        Alert(id="0-0", **fields)  # validate before writing
        tail = _dumps(fields)[1:]
        cooldown_ms = max(1, int(self.settings.cooldown_s * 1000))
        entry = self._raise(keys=[self.dedup_key_for(dedup_key), self.stream, self.suppressed_key],
                            args=[cooldown_ms, self.settings.stream_maxlen, dedup_key, tail, self.channel])
        if entry is None:
            log.debug("alert %s suppressed: incident still cooling down", dedup_key)
            return None
        return Alert(id=_s(entry), **fields)

    def clear_dedup(self, dedup_key: str) -> bool:
        """End an incident's cool-down (e.g. when it is over); True if one was open."""
        return bool(self.r.delete(self.dedup_key_for(dedup_key)))

    def suppressed(self) -> dict[str, int]:
        return {_s(k): int(v) for k, v in self.r.hgetall(self.suppressed_key).items()}

    def list(self, count: int = 50, kind: str | None = None, since: float | None = None) -> list[Alert]:
        """Newest first; `since` (unix seconds) keeps alerts with ts >= since."""
        # The entry ids carry Redis' clock, ts the raiser's: bound the scan by the id with
        # room for clock skew, then filter on ts exactly.
        low = f"{max(0, int((since - SINCE_SKEW_S) * 1000))}-0" if since is not None else "-"
        out: list[Alert] = []
        high = "+"
        page = max(count, 100) if kind or since is not None else count
        while len(out) < count:
            batch = self.r.xrevrange(self.stream, max=high, min=low, count=page)
            for entry, fields in batch:
                alert = self._parse(_s(entry), fields)
                if (alert is not None and (kind is None or alert.kind == kind)
                        and (since is None or alert.ts >= since)):
                    out.append(alert)
                    if len(out) == count:
                        break
            if len(batch) < page:
                break
            high = f"({_s(batch[-1][0])}"
        return out

    def get(self, alert_id: str) -> Alert | None:
        if not _ENTRY_ID.match(alert_id):
            return None
        batch = self.r.xrange(self.stream, min=alert_id, max=alert_id, count=1)
        return self._parse(alert_id, batch[0][1]) if batch else None

    def follow(self, kind: str | None = None, block_ms: int = 1000, last_id: str = "$",
               stop: threading.Event | None = None, max_wait_s: float | None = None) -> Iterator[Alert]:
        """Alerts written after `last_id` ("$": after now), as they arrive. Ends when `stop` is
        set or after `max_wait_s` seconds; each blocking read lasts at most block_ms."""
        if last_id == "$":
            # Resolved now, not at the first next(): an alert raised between this call and the
            # first read must not be missed.
            top = self.r.xrevrange(self.stream, count=1)
            last_id = _s(top[0][0]) if top else "0-0"
        return self._follow(kind, max(1, block_ms), last_id, stop, max_wait_s)

    def _follow(self, kind, block_ms, last_id, stop, max_wait_s) -> Iterator[Alert]:
        deadline = None if max_wait_s is None else time.monotonic() + max_wait_s
        reader = blocking_client(self.r)
        try:
            while not (stop is not None and stop.is_set()):
                if deadline is not None:
                    left_ms = int((deadline - time.monotonic()) * 1000)
                    if left_ms <= 0:
                        return
                    wait = min(block_ms, left_ms)
                else:
                    wait = block_ms
                for entry, fields in _entries(reader.xread({self.stream: last_id}, count=100, block=wait)):
                    last_id = entry
                    alert = self._parse(entry, fields)
                    if alert is not None and (kind is None or alert.kind == kind):
                        yield alert
        finally:
            reader.close()

    def _parse(self, entry: str, fields: dict | None) -> Alert | None:
        try:
            return Alert.from_json(_record(fields))
        except (TypeError, ValueError) as exc:
            log.warning("skipping malformed alert entry %s in %s: %s", entry, self.stream, exc)
            return None


# ---------------------------------------------------------------- webhooks

def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Shadowgate-Signature header value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(secret: str, timestamp: str, body: bytes, signature: str, max_age_s: float = 300) -> bool:
    """For receivers: the signature matches and the timestamp is recent (replays are refused)."""
    try:
        age = abs(time.time() - int(timestamp))
    except (TypeError, ValueError):
        return False
    if age > max_age_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature or "")


def redact(url: str) -> str:
    """scheme://host only: paths and queries of webhook URLs are credentials (Slack's are)."""
    parts = urlsplit(str(url))
    return f"{parts.scheme}://{parts.hostname}"


class _RedactHttpxURLs(logging.Filter):
    """httpx logs every request's full URL at INFO; keep only scheme://host."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


def _install_redaction() -> None:
    httpx_log = logging.getLogger("httpx")
    if not any(isinstance(f, _RedactHttpxURLs) for f in httpx_log.filters):
        httpx_log.addFilter(_RedactHttpxURLs())


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_body(alert: Alert) -> dict:
    """A Slack incoming-webhook message: `text` is the notification line, blocks the detail."""
    version = alert.predictor_version or "none"
    line = f"[{alert.severity.upper()}] shadowgate {alert.kind} (predictor {version}): {alert.message}"
    evidence = []
    for key, value in list(alert.evidence.items())[:10]:
        shown = value if isinstance(value, (str, int, float, bool)) or value is None else _dumps(value)
        evidence.append(f"*{_slack_escape(str(key))}*: {_slack_escape(str(shown))[:200]}")
    header = f"{alert.severity.upper()}: {alert.kind}"
    # Slack renders <!date^unix^format|fallback> in the reader's time zone.
    when = f"<!date^{int(alert.ts)}^{{date_short}} {{time_secs}}|{int(alert.ts)}>"
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": header}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _slack_escape(alert.message)[:3000]}},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": f"*Kind*\n{alert.kind}"},
            {"type": "mrkdwn", "text": f"*Severity*\n{alert.severity}"},
            {"type": "mrkdwn", "text": f"*Predictor version*\n{_slack_escape(version)}"},
            {"type": "mrkdwn", "text": f"*Incident*\n{_slack_escape(alert.dedup_key)}"},
        ]},
    ]
    if evidence:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(evidence)[:3000]}})
    blocks.append({"type": "context", "elements": [
        {"type": "mrkdwn", "text": f"alert {alert.id} at {when}"}]})
    return {"text": _slack_escape(line), "blocks": blocks}


class Notifier:
    """Delivers every alert of the stream to every webhook, through the consumer group
    "notify": many notifiers share the work and one that dies is replaced by the others."""

    def __init__(self, client: redis.Redis, prefix: str, settings: AlertSettings, consumer: str,
                 claim_idle_ms: int = 120_000, batch: int = 10):
        # claim_idle_ms must exceed one alert's worst delivery time (retries x (timeout +
        # backoff) per webhook) or a live notifier's entries get reclaimed and sent twice;
        # the notifier also refreshes its claim after each webhook.
        self.r = client
        self.reader = blocking_client(client)
        self.settings = settings
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.batch = batch
        self.stream, self.deliveries_key = Keys(prefix).alerts, Keys(prefix).alerts_deliveries
        self.http = httpx.Client(follow_redirects=False)
        self._claim_cursor = "0-0"
        _install_redaction()
        self._ensure_group()

    def _ensure_group(self) -> None:
        try:
            # id "0": alerts written before the first notifier started are delivered too.
            self.r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def close(self) -> None:
        self.http.close()
        self.reader.close()

    def run(self, stop: threading.Event, block_ms: int = 1000) -> None:
        """Deliver until `stop` is set (it returns after the batch in hand). Redis outages are
        waited out."""
        while not stop.is_set():
            try:
                self.run_once(block_ms=block_ms)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("alert notifier %s: redis unavailable (%s); retrying", self.consumer,
                            type(exc).__name__)
                stop.wait(1.0)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._ensure_group()  # the stream was deleted under us

    def run_once(self, block_ms: int = 1000) -> int:
        """Handle one batch: entries abandoned by dead consumers first, else new ones (waiting
        up to block_ms; 0 does not wait). Returns how many alerts reached every webhook."""
        entries = self._reclaim()
        if not entries:
            resp = self.reader.xreadgroup(GROUP, self.consumer, {self.stream: ">"}, count=self.batch,
                                          block=block_ms if block_ms > 0 else None)
            entries = _entries(resp)
        delivered = sum(self._handle(entry, fields) for entry, fields in entries)
        if entries:
            self._prune_deliveries()
        return delivered

    def _reclaim(self) -> list[tuple[str, dict | None]]:
        resp = self.r.xautoclaim(self.stream, GROUP, self.consumer, min_idle_time=self.claim_idle_ms,
                                 start_id=self._claim_cursor, count=self.batch)
        # Reply: [next cursor, entries, deleted ids]; entries trimmed away while pending are
        # dropped from the pending list by Redis itself.
        self._claim_cursor = _s(resp[0])
        return [(_s(e), f) for e, f in resp[1] if e is not None]

    def _handle(self, entry: str, fields: dict | None) -> int:
        try:
            alert = Alert.from_json(_record(fields))
        except (TypeError, ValueError) as exc:
            log.error("alert entry %s is malformed (%s); acknowledged without delivery", entry, exc)
            self.r.hset(self.deliveries_key, entry, _dumps({"status": "invalid"}))
            self.r.xack(self.stream, GROUP, entry)
            return 0
        previous = self.r.hget(self.deliveries_key, alert.id)
        outcomes = json.loads(previous) if previous else {}
        for i, hook in enumerate(self.settings.webhooks):
            done = outcomes.get(str(i), {})
            # A redelivered entry (its notifier died after delivering) skips webhooks that
            # already have it.
            if done.get("status") == "delivered" and done.get("target") == redact(hook.url):
                continue
            outcomes[str(i)] = self._deliver(hook, alert)
            self.r.hset(self.deliveries_key, alert.id, _dumps(outcomes))
            # Reset the entry's idle time so that other notifiers do not reclaim it mid-way.
            self.r.xclaim(self.stream, GROUP, self.consumer, min_idle_time=0, message_ids=[entry], justid=True)
        self.r.xack(self.stream, GROUP, entry)
        current = [outcomes[str(i)] for i in range(len(self.settings.webhooks))]
        return int(bool(current) and all(o.get("status") == "delivered" for o in current))

    def body(self, hook: WebhookSettings, alert: Alert) -> bytes:
        if hook.format == "slack":
            return _dumps(slack_body(alert)).encode()
        return alert.to_json().encode()

    def _deliver(self, hook: WebhookSettings, alert: Alert) -> dict:
        target = redact(hook.url)
        body = self.body(hook, alert)
        code, error, attempt = None, None, 0
        for attempt in range(1, self.settings.retries + 1):
            headers = {"Content-Type": "application/json", "User-Agent": "shadowgate-alerts",
                       "X-Shadowgate-Alert-Id": alert.id}
            if hook.secret is not None:
                # Signed per attempt: a retry must not carry a stale timestamp.
                ts = str(int(time.time()))
                headers["X-Shadowgate-Timestamp"] = ts
                headers["X-Shadowgate-Signature"] = sign(hook.secret.get_secret_value(), ts, body)
            retry_after = None
            try:
                resp = self.http.post(hook.url, content=body, headers=headers, timeout=hook.timeout_s)
                code, error = resp.status_code, None
                if 200 <= code < 300:
                    return {"target": target, "status": "delivered", "attempts": attempt, "code": code}
                if code != 429 and code < 500:
                    break  # the receiver refuses this request: repeating it will not help
                retry_after = resp.headers.get("Retry-After")
            except httpx.RequestError as exc:  # connect errors, timeouts, broken connections
                code, error = None, type(exc).__name__
            if attempt < self.settings.retries:
                time.sleep(self._backoff(attempt, retry_after))
        log.warning("alert %s to webhook %s failed after %d attempt(s): %s", alert.id, target,
                    attempt, code if code is not None else error)
        outcome = {"target": target, "status": "failed", "attempts": attempt, "code": code}
        if error:
            outcome["error"] = error
        return outcome

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        delay = min(BACKOFF_CAP_S, self.settings.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            try:
                delay = max(delay, min(BACKOFF_CAP_S, float(retry_after)))
            except ValueError:
                pass  # an HTTP date: keep our own backoff
        return delay

    def _prune_deliveries(self) -> None:
        """Keep the outcome hash about as long as the stream: drop outcomes of trimmed alerts."""
        if self.r.hlen(self.deliveries_key) <= 2 * self.settings.stream_maxlen:
            return
        first = self.r.xrange(self.stream, count=1)
        if not first:
            return
        oldest = _entry_key(_s(first[0][0]))
        stale = [k for k in self.r.hkeys(self.deliveries_key)
                 if _ENTRY_ID.match(_s(k)) and _entry_key(_s(k)) < oldest]
        if stale:
            self.r.hdel(self.deliveries_key, *stale)
