"""Alerts against a real redis-server and a real HTTP receiver: the record, one alert per
incident, live follow, and durable, signed, retried webhook delivery."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid

import pytest
import redis
from pydantic import ValidationError

from monitor.alerts import (GROUP, Alert, AlertSettings, AlertStore, Notifier, WebhookSettings, sign,
                            verify)
from monitor.keys import Keys
from tests.support import free_port

pytestmark = pytest.mark.service

FIELDS = {"id", "kind", "severity", "message", "predictor_version", "evidence", "ts", "dedup_key"}


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def prefix():
    return f"t{uuid.uuid4().hex[:8]}"


def settings(*hooks: WebhookSettings, **kw) -> AlertSettings:
    return AlertSettings(webhooks=list(hooks), **{"retries": 5, "backoff_s": 0.01, **kw})


def deliveries(r, prefix, alert_id) -> dict:
    raw = r.hget(Keys(prefix).alerts_deliveries, alert_id)
    return json.loads(raw) if raw else {}


def pending(r, prefix) -> int:
    return r.xpending(Keys(prefix).alerts, GROUP)["pending"]


# ------------------------------------------------------------------ the record and the store

def test_record_is_in_the_stream_with_every_field_and_published(r, prefix):
    store = AlertStore(r, prefix, settings())
    live = r.pubsub()
    live.subscribe(Keys(prefix).alerts_live)
    assert live.get_message(timeout=1)["type"] == "subscribe"

    alert = store.raise_alert("drift", "warning", "head drift on layer 3\n(score 0.41)", "7",
                              {"score": 0.41, "threshold": 0.3, "columns": ["h3"]})
    assert alert.message == "head drift on layer 3 (score 0.41)"  # one line
    assert alert.dedup_key == "drift:7"

    entries = r.xrange(Keys(prefix).alerts)
    assert len(entries) == 1
    entry_id, fields = entries[0]
    assert set(fields) == {b"alert"}
    record = json.loads(fields[b"alert"])
    assert set(record) == FIELDS
    assert record == {"id": entry_id.decode(), "kind": "drift", "severity": "warning",
                      "message": alert.message, "predictor_version": "7",
                      "evidence": {"score": 0.41, "threshold": 0.3, "columns": ["h3"]},
                      "ts": alert.ts, "dedup_key": "drift:7"}
    assert fields[b"alert"].decode() == alert.to_json()
    assert Alert.from_json(fields[b"alert"]) == alert == store.get(alert.id)
    assert abs(alert.ts - time.time()) < 5

    message = live.get_message(timeout=2)
    assert message["type"] == "message" and Alert.from_json(message["data"]) == alert
    live.close()


def test_unknown_kind_or_severity_is_refused(r, prefix):
    store = AlertStore(r, prefix, settings())
    with pytest.raises(ValueError, match="kind"):
        store.raise_alert("meltdown", "warning", "x")
    with pytest.raises(ValueError, match="severity"):
        store.raise_alert("drift", "panic", "x")
    with pytest.raises(ValueError, match="an alert record has exactly the keys"):
        Alert.from_json(json.dumps({"id": "1-0", "kind": "drift"}))
    assert r.exists(Keys(prefix).alerts) == 0
    assert store.get("not-an-id") is None and store.get("1-0") is None


def test_list_is_newest_first_with_kind_and_since_filters(r, prefix):
    store = AlertStore(r, prefix, settings())
    raised = [store.raise_alert(kind, "info", f"alert {i}", f"v{i}")
              for i, kind in enumerate(["drift", "fallback", "drift", "promotion", "drift"])]
    assert [a.id for a in store.list()] == [a.id for a in reversed(raised)]
    assert [a.message for a in store.list(count=2)] == ["alert 4", "alert 3"]
    assert [a.message for a in store.list(kind="drift")] == ["alert 4", "alert 2", "alert 0"]
    assert [a.message for a in store.list(count=2, kind="drift")] == ["alert 4", "alert 2"]
    assert store.list(kind="rollback") == []
    cut = raised[3].ts
    assert [a.message for a in store.list(since=cut)] == ["alert 4", "alert 3"]
    ids = [a.id for a in raised]
    assert len(set(ids)) == 5 and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))


def test_stream_is_capped(r, prefix):
    store = AlertStore(r, prefix, settings(stream_maxlen=10))
    for i in range(500):
        store.raise_alert("job_failure", "warning", "job failed", dedup_key=f"job:{i}")
    # MAXLEN ~ trims whole radix-tree nodes (100 entries by default): near, not at, the cap.
    assert 10 <= r.xlen(Keys(prefix).alerts) <= 110


# ------------------------------------------------------------------ one incident, one alert

def test_same_incident_within_cooldown_is_one_alert(r, prefix):
    store = AlertStore(r, prefix, settings())
    first = store.raise_alert("fallback", "critical", "predictor fell back", "3")
    assert store.raise_alert("fallback", "critical", "still falling back", "3") is None
    assert store.suppressed() == {"fallback:3": 1}
    assert r.get(Keys(prefix).alerts_dedup("fallback:3")).decode() == first.id
    assert 0 < r.pttl(Keys(prefix).alerts_dedup("fallback:3")) <= 600_000
    # Another version is another incident.
    assert store.raise_alert("fallback", "critical", "v4 too", "4") is not None

    assert store.clear_dedup("fallback:3") is True
    again = store.raise_alert("fallback", "critical", "fell back again", "3")
    assert again is not None and again.id != first.id
    assert [a.message for a in store.list(kind="fallback")] == ["fell back again", "v4 too", "predictor fell back"]
    assert store.clear_dedup("nothing:open") is False


def test_a_storm_of_identical_raises_is_one_alert(r, prefix):
    store = AlertStore(r, prefix, settings())
    results = [store.raise_alert("drift", "warning", "drift", "9") for _ in range(50)]
    assert sum(a is not None for a in results) == 1
    assert store.suppressed() == {"drift:9": 49}

    # Concurrent raisers (replicas) too: the check and the append are one script.
    out = []
    threads = [threading.Thread(target=lambda: out.append(
        store.raise_alert("rollback", "critical", "rolled back", "9"))) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(a is not None for a in out) == 1
    assert r.xlen(Keys(prefix).alerts) == 2


def test_cooldown_expires(r, prefix):
    store = AlertStore(r, prefix, settings(cooldown_s=0.2))
    assert store.raise_alert("drift", "warning", "a", "1") is not None
    assert store.raise_alert("drift", "warning", "b", "1") is None
    time.sleep(0.3)
    assert store.raise_alert("drift", "warning", "c", "1") is not None


# ------------------------------------------------------------------ follow

def test_follow_yields_alerts_raised_after_it_started(r, prefix):
    store = AlertStore(r, prefix, settings())
    store.raise_alert("drift", "info", "before", "1")
    stream = store.follow(kind="fallback", block_ms=200, max_wait_s=5)
    store.raise_alert("drift", "info", "not this kind", "2")
    wanted = store.raise_alert("fallback", "critical", "after", "2")
    assert next(stream) == wanted
    stream.close()

    # A blocking read longer than redis-py's 5 s socket timeout must not raise; `stop` ends
    # the generator after the read in hand.
    stop = threading.Event()
    got, errors = [], []

    def follow():
        try:
            got.extend(store.follow(block_ms=8000, stop=stop))
        except Exception as exc:
            errors.append(exc)

    follower = threading.Thread(target=follow)
    follower.start()
    time.sleep(5.5)
    stop.set()
    late = store.raise_alert("promotion", "info", "promoted", "5")
    follower.join(5)
    assert not follower.is_alive() and errors == [] and got == [late]


def test_follow_with_max_wait_ends(r, prefix):
    store = AlertStore(r, prefix, settings())
    start = time.monotonic()
    assert list(store.follow(block_ms=100, max_wait_s=0.3)) == []
    assert time.monotonic() - start < 2


# ------------------------------------------------------------------ webhooks

def test_sign_and_verify():
    ts = str(int(time.time()))
    sig = sign("s3cret", ts, b'{"a":1}')
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert verify("s3cret", ts, b'{"a":1}', sig)
    assert not verify("wrong", ts, b'{"a":1}', sig)
    assert not verify("s3cret", ts, b'{"a":2}', sig)
    old = str(int(time.time()) - 400)
    assert not verify("s3cret", old, b'{"a":1}', sign("s3cret", old, b'{"a":1}'))
    assert not verify("s3cret", "soon", b"", sig)


def test_settings_are_strict():
    with pytest.raises(ValidationError, match=r"webhook url must be http\(s\)://host/"):
        AlertSettings(webhooks=[{"url": "ftp://host/x"}])
    with pytest.raises(ValidationError, match=r"webhooks\.0\.format\n  Input should be 'json' or 'slack'"):
        AlertSettings(webhooks=[{"url": "https://h/x", "format": "teams"}])
    with pytest.raises(ValidationError, match=r"retries\n  Input should be greater than or equal to 1"):
        AlertSettings(retries=0)
    with pytest.raises(ValidationError, match=r"cooldown\n  Extra inputs are not permitted"):
        AlertSettings(cooldown=5)
    s = AlertSettings(webhooks=[{"url": "https://h/x", "format": "slack", "secret": "k"}])
    assert s.webhooks[0].secret.get_secret_value() == "k" and "'k'" not in repr(s)


def test_503_twice_then_200_is_delivered_once_on_attempt_3_signed(r, prefix, receiver):
    receiver.statuses = [503, 503]
    hook = WebhookSettings(url=receiver.url + "/hook", secret="s3cret")
    store = AlertStore(r, prefix, settings(hook))
    alert = store.raise_alert("rollback", "critical", "rolled back to v2", "3", {"fidelity": 0.81})
    notifier = Notifier(r, prefix, settings(hook), consumer="n1")
    assert notifier.run_once(block_ms=100) == 1
    notifier.close()

    reqs = receiver.requests
    assert [q["status"] for q in reqs] == [503, 503, 200]
    assert {q["headers"]["X-Shadowgate-Alert-Id"] for q in reqs} == {alert.id}
    last = reqs[-1]
    assert last["body"] == alert.to_json().encode()
    assert Alert.from_json(last["body"]) == alert
    ts, sig = last["headers"]["X-Shadowgate-Timestamp"], last["headers"]["X-Shadowgate-Signature"]
    assert verify("s3cret", ts, last["body"], sig)
    assert not verify("wrong", ts, last["body"], sig)
    assert deliveries(r, prefix, alert.id) == {
        "0": {"target": "http://127.0.0.1", "status": "delivered", "attempts": 3, "code": 200}}
    assert pending(r, prefix) == 0
    # Acknowledged: nothing is delivered twice.
    again = Notifier(r, prefix, settings(hook), consumer="n2", claim_idle_ms=0)
    assert again.run_once(block_ms=50) == 0
    again.close()
    assert len(receiver.requests) == 3


def test_slack_format(r, prefix, receiver):
    hook = WebhookSettings(url=receiver.url + "/services/T0/B0/tok", format="slack")
    store = AlertStore(r, prefix, settings(hook))
    alert = store.raise_alert("drift", "warning", "drift <high> & rising", "12", {"share_drifted": 0.5})
    notifier = Notifier(r, prefix, settings(hook), consumer="n1")
    assert notifier.run_once(block_ms=100) == 1
    notifier.close()
    (req,) = receiver.requests
    body = json.loads(req["body"])
    assert "X-Shadowgate-Signature" not in req["headers"]
    assert req["headers"]["X-Shadowgate-Alert-Id"] == alert.id
    for word in ("WARNING", "drift", "12", "&lt;high&gt; &amp; rising"):
        assert word in body["text"]
    text = json.dumps(body["blocks"])
    assert "share_drifted" in text and "0.5" in text and "drift:12" in text


def test_4xx_is_not_retried_and_exhausted_retries_are_recorded(r, prefix, receiver):
    hooks = [WebhookSettings(url=receiver.url + "/bad"), WebhookSettings(url=receiver.url + "/down"),
             WebhookSettings(url=receiver.url + "/ok")]
    receiver.statuses = [400, 503, 503, 503, 200]
    store = AlertStore(r, prefix, settings(*hooks, retries=3))
    alert = store.raise_alert("job_failure", "warning", "drift job failed", evidence={"job": "drift"})
    notifier = Notifier(r, prefix, settings(*hooks, retries=3), consumer="n1")
    assert notifier.run_once(block_ms=100) == 0  # not every webhook got it
    notifier.close()
    assert [(q["path"], q["status"]) for q in receiver.requests] == [
        ("/bad", 400), ("/down", 503), ("/down", 503), ("/down", 503), ("/ok", 200)]
    out = deliveries(r, prefix, alert.id)
    assert out["0"] == {"target": "http://127.0.0.1", "status": "failed", "attempts": 1, "code": 400}
    assert out["1"] == {"target": "http://127.0.0.1", "status": "failed", "attempts": 3, "code": 503}
    assert out["2"]["status"] == "delivered" and out["2"]["attempts"] == 1
    assert pending(r, prefix) == 0  # given up and acknowledged: never looped on


def test_connection_errors_are_retried_and_secrets_stay_out_of_logs(r, prefix, caplog):
    dead = f"http://127.0.0.1:{free_port()}/hook?token=tok-abc123"
    hook = WebhookSettings(url=dead, secret="s3cret-value")
    store = AlertStore(r, prefix, settings(hook, retries=3))
    alert = store.raise_alert("fallback", "critical", "fallback", "1")
    notifier = Notifier(r, prefix, settings(hook, retries=3), consumer="n1")
    with caplog.at_level(logging.DEBUG):
        assert notifier.run_once(block_ms=100) == 0
    notifier.close()
    out = deliveries(r, prefix, alert.id)["0"]
    assert out == {"target": "http://127.0.0.1", "status": "failed", "attempts": 3, "code": None,
                   "error": "ConnectError"}
    assert "failed after 3 attempt(s)" in caplog.text
    assert "tok-abc123" not in caplog.text and "s3cret-value" not in caplog.text
    assert "/hook" not in caplog.text


def test_httpx_request_log_is_redacted(r, prefix, receiver, caplog):
    hook = WebhookSettings(url=receiver.url + "/services/T0/B0/secret-path?token=q-secret")
    store = AlertStore(r, prefix, settings(hook))
    store.raise_alert("promotion", "info", "promoted", "2")
    notifier = Notifier(r, prefix, settings(hook), consumer="n1")
    with caplog.at_level(logging.INFO, logger="httpx"):
        assert notifier.run_once(block_ms=100) == 1
    notifier.close()
    assert "HTTP Request: POST http://127.0.0.1" in caplog.text
    assert "secret-path" not in caplog.text and "q-secret" not in caplog.text


def test_a_notifier_killed_before_ack_is_taken_over(r, prefix, receiver):
    hook = WebhookSettings(url=receiver.url + "/hook")
    store = AlertStore(r, prefix, settings(hook))
    Notifier(r, prefix, settings(hook), consumer="dead").close()  # makes the group
    alerts = [store.raise_alert("drift", "warning", f"drift {i}", str(i)) for i in range(3)]
    # The dead notifier read the entries and died before delivering or acknowledging.
    read = r.xreadgroup(GROUP, "dead", {Keys(prefix).alerts: ">"}, count=10)
    assert sum(len(v) for v in (read.values() if isinstance(read, dict) else [e for _, e in read])) == 3
    assert pending(r, prefix) == 3

    survivor = Notifier(r, prefix, settings(hook), consumer="alive", claim_idle_ms=1000)
    assert survivor.run_once(block_ms=10) == 0  # nothing idle long enough, nothing new
    assert receiver.requests == []
    time.sleep(1.1)
    assert survivor.run_once(block_ms=10) == 3
    survivor.close()
    assert sorted(q["headers"]["X-Shadowgate-Alert-Id"] for q in receiver.requests) == sorted(a.id for a in alerts)
    assert pending(r, prefix) == 0


def test_an_alert_raised_before_any_notifier_is_delivered(r, prefix, receiver):
    hook = WebhookSettings(url=receiver.url + "/hook")
    alert = AlertStore(r, prefix, settings(hook)).raise_alert("promotion", "info", "v5 promoted", "5")
    notifier = Notifier(r, prefix, settings(hook), consumer="n1")
    assert notifier.run_once(block_ms=100) == 1
    notifier.close()
    assert [json.loads(q["body"])["id"] for q in receiver.requests] == [alert.id]


def test_run_loop_delivers_until_stopped(r, prefix, receiver):
    hook = WebhookSettings(url=receiver.url + "/hook")
    store = AlertStore(r, prefix, settings(hook))
    notifier = Notifier(r, prefix, settings(hook), consumer="n1")
    stop = threading.Event()
    loop = threading.Thread(target=notifier.run, args=(stop,), kwargs={"block_ms": 200})
    loop.start()
    alert = store.raise_alert("recovered", "info", "predictor recovered", "3")
    assert [q["headers"]["X-Shadowgate-Alert-Id"] for q in receiver.wait_for(1)] == [alert.id]
    stop.set()
    loop.join(5)
    assert not loop.is_alive()
    notifier.close()
    assert pending(r, prefix) == 0


def test_a_redelivered_alert_skips_webhooks_that_already_have_it(r, prefix, receiver):
    hooks = [WebhookSettings(url=receiver.url + "/first"), WebhookSettings(url=receiver.url + "/second")]
    store = AlertStore(r, prefix, settings(*hooks))
    Notifier(r, prefix, settings(*hooks), consumer="dead").close()
    alert = store.raise_alert("rollback", "critical", "rolled back", "4")
    # The dead notifier reached the first webhook, recorded it, and died before the second.
    r.xreadgroup(GROUP, "dead", {Keys(prefix).alerts: ">"}, count=10)
    r.hset(Keys(prefix).alerts_deliveries, alert.id, json.dumps(
        {"0": {"target": "http://127.0.0.1", "status": "delivered", "attempts": 1, "code": 200}}))
    time.sleep(0.3)
    survivor = Notifier(r, prefix, settings(*hooks), consumer="alive", claim_idle_ms=200)
    assert survivor.run_once(block_ms=10) == 1
    survivor.close()
    assert [q["path"] for q in receiver.requests] == ["/second"]
    assert set(deliveries(r, prefix, alert.id)) == {"0", "1"} and pending(r, prefix) == 0
