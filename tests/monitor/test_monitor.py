"""The monitor against a real Redis: exactly-once windows, the SLO and the fallback lever,
recovery, the lease, drift checks logged to a real MLflow store, and a SIGKILL mid-stream."""

from __future__ import annotations

import json
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest
import redis
import torch

from adapter.pipeline.traces import SCHEMA, TraceRecord
from monitor import drift
from monitor.alerts import AlertSettings, AlertStore, WebhookSettings, verify
from monitor.config import MonitorSettings
from monitor.keys import Keys
from monitor.samples import SampleStore
from monitor.service import Monitor, MonitorContext
from monitor.state import ControlDefaults, ControlStore, ControlUpdate
from tests.support import spawn_shadowgate, wait_until

pytestmark = pytest.mark.service


def settings(**slo) -> MonitorSettings:
    return MonitorSettings(slo={"kl_mean_max": 0.5, "top1_min": 0.8, "min_samples": 10, "window": 500, **slo},
                           drift={"every_requests": 60, "window": 120, "min_rows": 20, "html_report": True},
                           lease_ttl_s=2.0, poll_ms=50, claim_idle_s=0.5)


def make_monitor(redis_url, prefix, cfg=None, loader=None, mlflow_uri=None, alerts=None, instance=None):
    ctx = MonitorContext(redis_url=redis_url, prefix=prefix, monitor=cfg or settings(),
                         alerts=alerts or AlertSettings(cooldown_s=60), mlflow_uri=mlflow_uri)
    return Monitor(ctx, loader, instance=instance)


def add_sample(store: SampleStore, i: int, version="1", arm="champion", kl=0.05, top1=0.95, generation=1) -> str:
    meta = {"schema": SCHEMA, "request_id": f"req-{i}", "predictor_version": version, "arm": arm,
            "sparsity": 0.5, "generation": generation, "prompt_ids": [1, 2, 3], "token_ids": [4]}
    rec = TraceRecord(meta=meta, tensors={"predictor_input": torch.zeros(4)})
    fid = {"kl_mean": kl, "kl_max": kl, "top1_agreement": top1, "exact_match": top1 == 1.0, "positions": 1}
    return store.add(rec, fid, 3600)


def test_windows_count_each_sample_once_per_version_and_arm(redis_url):
    r = redis.Redis.from_url(redis_url)
    store = SampleStore(r, "m1", 10_000)
    ids = [add_sample(store, i, arm="champion" if i % 3 else "challenger", version="1" if i % 3 else "2",
                      kl=0.01 * (i % 10)) for i in range(30)]
    mon = make_monitor(redis_url, "m1")
    mon.drain()
    mon.drain()  # nothing new: nothing counted twice
    windows = {(w["version"], w["arm"]): w for w in mon.windows()}
    assert windows[("1", "champion")]["count"] == 20 and windows[("2", "challenger")]["count"] == 10
    assert windows[("1", "champion")]["total"] == 20
    seen = [row["sample_id"] for row in mon.window("1", "champion") + mon.window("2", "challenger")]
    assert sorted(seen) == sorted(ids)
    kl = [0.01 * (i % 10) for i in range(30) if i % 3]
    assert windows[("1", "champion")]["kl_mean"] == pytest.approx(np.mean(kl))
    assert windows[("1", "champion")]["kl_p95"] == pytest.approx(np.percentile(kl, 95))
    assert mon.samples.lag() == {"pending": 0, "lag": 0}


def test_broken_slo_pulls_the_fallback_lever_once_and_clearing_it_is_recovered(redis_url):
    r = redis.Redis.from_url(redis_url)
    control = ControlStore(r, "m2")
    control.ensure(ControlDefaults())
    store = SampleStore(r, "m2", 10_000)
    mon = make_monitor(redis_url, "m2")
    alerts = AlertStore(r, "m2", AlertSettings())
    for i in range(9):  # below min_samples: no decision on so little evidence
        add_sample(store, i, kl=2.0, top1=0.3)
    mon.step()
    assert control.get().fallback == "none"
    add_sample(store, 9, kl=2.0, top1=0.3)
    mon.step()
    state = control.get()
    assert state.fallback == "dense" and state.updated_by == "monitor"
    fired = alerts.list(kind="fallback")
    assert len(fired) == 1 and fired[0].predictor_version == "1" and fired[0].severity == "critical"
    assert fired[0].evidence["window"]["count"] == 10 and fired[0].evidence["window"]["kl_mean"] == pytest.approx(2.0)
    mon.step()
    assert len(alerts.list(kind="fallback")) == 1  # one incident, one alert
    # only an explicit end: a person clears it; the end is an alert and the window starts afresh
    control.update(ControlUpdate(fallback="none"), by="cli")
    mon.step()
    rec = alerts.list(kind="recovered")
    assert len(rec) == 1 and rec[0].evidence["updated_by"] == "cli"
    assert mon.window("1", "champion") == [] and control.get().fallback == "none"  # served before
    for i in range(10, 20):  # a healthy champion after the recovery keeps serving
        add_sample(store, i, kl=0.05, top1=0.95)
    mon.step()
    assert control.get().fallback == "none"
    # set and cleared between two looks: the history shows both transitions
    control.update(ControlUpdate(fallback="dense"), by="admin-api")
    control.update(ControlUpdate(fallback="none"), by="cli")
    mon.step()
    assert [a.evidence["updated_by"] for a in alerts.list(kind="recovered")] == ["cli", "cli"]
    manual = alerts.list(kind="fallback")
    assert len(manual) == 2 and manual[0].evidence["updated_by"] == "admin-api"  # newest first


def test_a_run_of_hard_prompts_is_no_breach_but_a_worse_predictor_is(redis_url):
    """Per-sample top-1 over 4 tokens: a healthy champion's 10 samples in a row can average
    below the SLO's 0.8 (the embedded model's 8 hardest in a row: 0.81); only a clear breach
    (the one-sided bound at slo.confidence) pulls the lever."""
    r = redis.Redis.from_url(redis_url)
    control = ControlStore(r, "m-hard")
    control.ensure(ControlDefaults())
    store = SampleStore(r, "m-hard", 10_000)
    mon = make_monitor(redis_url, "m-hard")
    for i, t in enumerate([1.0, 0.5, 0.75, 1.0, 0.5, 0.75, 1.0, 0.5, 1.0, 0.75]):  # mean 0.775
        add_sample(store, i, kl=0.2, top1=t)
    mon.step()
    assert control.get().fallback == "none"
    window = mon.window("1", "champion")
    assert len(window) == 10 and np.mean([x["top1"] for x in window]) < 0.8  # the bare estimate breaks
    # the same window judged on the estimates: the lever (what a run of hard prompts used to do)
    point = make_monitor(redis_url, "m-hard", cfg=settings(confidence=None), instance="point")
    assert point.check_slo()["reasons"] == ["top-1 agreement 0.775 < 0.8"]
    control.update(ControlUpdate(fallback="none"), by="cli")
    mon.step()
    for i, t in enumerate([0.5, 0.25, 0.75, 0.5, 0.5, 0.25, 0.5, 0.75, 0.5, 0.25] * 2, start=10):
        add_sample(store, i, kl=0.2, top1=t)  # a worse predictor: mean 0.475
    mon.step()
    state = control.get()
    assert state.fallback == "dense" and state.updated_by == "monitor"
    ev = AlertStore(r, "m-hard", AlertSettings()).list(kind="fallback")[0].evidence
    assert ev["window"]["top1_bound"]["upper"] < 0.8 and "95% bound" in ev["reasons"][0]


def test_only_one_monitor_is_active(redis_url):
    a = make_monitor(redis_url, "m3", instance="a")
    b = make_monitor(redis_url, "m3", instance="b")
    stop = threading.Event()
    ta = threading.Thread(target=a.run, args=(stop,))
    ta.start()
    wait_until(lambda: a.active, 5, what="monitor a active")
    tb = threading.Thread(target=b.run, args=(stop,))
    tb.start()
    time.sleep(1.5)
    assert a.active and not b.active
    stop_a = threading.Event()  # a stops (releases): b takes over
    stop.set()
    ta.join(10)
    tb.join(10)
    stop_b = threading.Event()
    tb = threading.Thread(target=b.run, args=(stop_b,))
    tb.start()
    wait_until(lambda: b.active, 5, what="monitor b active after a released the lease")
    stop_b.set()
    stop_a.set()
    tb.join(10)


def _rows(n: int, shift: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cols = drift.feature_columns(4)
    data = rng.normal(size=(n, len(cols)))
    data[:, :4] += shift
    return pd.DataFrame(data, columns=cols)


def test_drift_check_is_an_mlflow_run_and_raises_an_alert_naming_the_columns(redis_url, tmp_path, receiver):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    reference = _rows(600, 0.0, 0)
    hook = WebhookSettings(url=receiver.url + "/hook", secret="s3cret")
    mon = make_monitor(redis_url, "m4", loader=lambda v: (None, reference), mlflow_uri=uri,
                       alerts=AlertSettings(webhooks=[hook], cooldown_s=60, backoff_s=0.05))
    r = redis.Redis.from_url(redis_url)

    def feed(df, start):
        for i, row in enumerate(df.to_dict("records")):
            r.xadd(Keys("m4").features, {"row": json.dumps({"version": "1", "request_id": f"f{start + i}", **row})})

    feed(_rows(60, 0.0, 1), 0)  # in distribution: a check, no alert
    mon.step()
    checks = [json.loads(v) for v in r.hvals(Keys("m4").monitor_drift)]
    assert len(checks) == 1 and checks[0]["drift"] is False and checks[0]["window"] == 60
    feed(_rows(60, 3.0, 2), 60)  # the newest 120 rows: half shifted on 4 of 8 columns
    feed(_rows(60, 3.0, 3), 120)  # now the window is all shifted
    mon.step()
    alerts = AlertStore(r, "m4", AlertSettings()).list(kind="drift")
    assert len(alerts) == 1
    ev = alerts[0].evidence
    assert set(ev["drifted"]) >= {"pc00", "pc01", "pc02", "pc03"} and ev["share"] >= 0.5
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("shadowgate-monitoring")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and ev["run_id"] in {run.info.run_id for run in runs}
    run = client.get_run(ev["run_id"])
    assert run.data.metrics["share_drifted"] == pytest.approx(ev["share"]) and run.data.metrics["window_size"] == 120
    assert "drift_report.html" in {a.path for a in client.list_artifacts(ev["run_id"])}
    assert ev["run_url"].endswith(f"/runs/{ev['run_id']}")
    # the alert reaches the webhook, signed
    from monitor.alerts import Notifier

    Notifier(r, "m4", mon.ctx.alerts, consumer="t").run_once(block_ms=0)
    got = receiver.wait_for(1)
    h = {k.lower(): v for k, v in got[0]["headers"].items()}
    assert verify("s3cret", h["x-shadowgate-timestamp"], got[0]["body"], h["x-shadowgate-signature"])
    assert json.loads(got[0]["body"])["kind"] == "drift"


def test_monitor_killed_mid_stream_loses_and_double_counts_nothing(redis_url, tmp_path):
    """A real `shadowgate monitor run` process, SIGKILLed while samples stream in."""
    env = {"SHADOWGATE_REDIS__URL": redis_url, "SHADOWGATE_REDIS__PREFIX": "m5",
           "SHADOWGATE_MLFLOW__TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "SHADOWGATE_MONITOR__LEASE_TTL_S": "2", "SHADOWGATE_MONITOR__CLAIM_IDLE_S": "0.5",
           "SHADOWGATE_MONITOR__POLL_MS": "20", "SHADOWGATE_MONITOR__SLO__WINDOW": "10000",
           "SHADOWGATE_MONITOR__SLO__MIN_SAMPLES": "100000"}
    r = redis.Redis.from_url(redis_url)
    store = SampleStore(r, "m5", 100_000)

    def start():
        return spawn_shadowgate("monitor", "run", log=tmp_path / f"monitor-{time.time()}.log", env=env)

    def counted() -> int:
        return int(r.hget(Keys("m5").monitor_totals, "1|champion") or 0)

    ids: list[str] = []
    first = start()
    try:
        ids += [add_sample(store, i) for i in range(50)]
        wait_until(lambda: counted() >= 50, 90, what="the monitor consuming", proc=first)
        for i in range(50, 400):  # kill while the stream is still flowing
            ids.append(add_sample(store, i))
            if i == 200:
                first.send_signal(signal.SIGKILL)
                first.wait(10)
        assert counted() < 400
        second = start()
        try:
            wait_until(lambda: counted() >= 400, 90, what="all 400 samples counted", proc=second)
            time.sleep(1.0)
        finally:
            second.terminate()
            second.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    mon = make_monitor(redis_url, "m5")
    rows = mon.window("1", "champion")
    assert counted() == 400 and len(rows) == 400
    assert sorted(row["sample_id"] for row in rows) == sorted(ids)  # none lost, none twice
