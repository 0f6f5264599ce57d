"""How an approval reaches the controller: MLflow registry webhooks, signed.

A person approves a version by setting the alias `approved` (or the tag `approval=approved`)
in the MLflow UI. MLflow delivers model_version_alias.created and model_version_tag.set
events to the service's POST /hooks/mlflow, signed with the webhook's secret:
X-MLflow-Signature = "v1," + base64(HMAC-SHA256(secret, "<delivery id>.<timestamp>.<body>")).
The gateway checks it and queues the event for the controller; the controller also polls
the registry, since deliveries are best effort.

The secret is `adapt.webhook_secret`, else one generated once and kept in Redis
(P:rollout:webhook_secret) where the gateway and the controller both read it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time

import redis

from monitor.keys import Keys

log = logging.getLogger(__name__)
WEBHOOK_NAME = "shadowgate-approvals"
EVENTS = ["model_version_alias.created", "model_version_tag.set"]
MAX_AGE_S = 300


def webhook_secret(settings, client: redis.Redis) -> str:
    if settings.adapt.webhook_secret is not None:
        return settings.adapt.webhook_secret.get_secret_value()
    key = Keys(settings.redis.prefix).rollout_webhook_secret
    client.set(key, secrets.token_urlsafe(32), nx=True)
    raw = client.get(key)
    return raw.decode() if isinstance(raw, bytes) else raw


def webhook_url(settings) -> str:
    return settings.adapt.webhook_url or f"http://{settings.host}:{settings.port}/hooks/mlflow"


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes | str) -> str:
    body = body.decode() if isinstance(body, bytes) else body
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, delivery_id: str | None, timestamp: str | None, body: bytes, signature: str | None,
           now: float | None = None) -> str | None:
    """None when the delivery is authentic and fresh, else the reason it is refused."""
    if not (delivery_id and timestamp and signature):
        return "missing X-MLflow-Delivery-Id, X-MLflow-Timestamp or X-MLflow-Signature"
    try:
        age = abs((now or time.time()) - int(timestamp))
    except ValueError:
        return "X-MLflow-Timestamp is not a unix time"
    if age > MAX_AGE_S:
        return f"the delivery is {age:.0f} s old (more than {MAX_AGE_S} s): refused as a replay"
    if not hmac.compare_digest(sign(secret, delivery_id, timestamp, body), signature):
        return "the signature does not match"
    return None


def ensure_webhook(settings, registry, client: redis.Redis) -> str | None:
    """Create the registry webhook once (best effort: polling covers a registry without
    webhooks). Returns the webhook id, or None."""
    url = webhook_url(settings)
    try:
        for hook in registry.client.list_webhooks():
            if hook.name == WEBHOOK_NAME and hook.url == url:
                return hook.webhook_id
        hook = registry.client.create_webhook(WEBHOOK_NAME, url, EVENTS, secret=webhook_secret(settings, client),
                                              description="shadowgate approvals: alias 'approved' / tag approval")
        log.info("registry webhook %s -> %s created", hook.webhook_id, url)
        return hook.webhook_id
    except Exception as exc:  # older servers, https-only servers: poll only
        log.warning("registry webhook not set up (%s: %s); approvals are polled", type(exc).__name__, exc)
        return None
