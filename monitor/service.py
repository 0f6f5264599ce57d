"""The monitor: reads what the service measured and acts on it.

One active instance (a Redis lease) in the deployed app. Each step it
1. consumes shadow samples (group "monitor") into fidelity windows per predictor version and
   canary arm, and feature rows (group "monitor") into a drift window per version, each
   exactly once (monitor/streams.py);
2. checks the champion's window against the fidelity SLO and, when it breaks, pulls the
   control state's fallback lever (updated_by "monitor") and raises a fallback alert;
3. notices a fallback that ended (fallback clear, PUT /admin/state, a promotion) and raises
   `recovered`, starting the champion's window afresh;
4. every `drift.every_requests` rows (or `drift.interval_s` seconds) runs Evidently against
   the version's reference, logs the check as an MLflow run and raises a drift alert;
5. writes a summary that /metrics, GET /admin/monitor and `shadowgate monitor status` show.

Its Redis keys are the P:monitor:* ones of monitor/keys.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Callable

import numpy as np
import pandas as pd
import redis

from monitor import drift as drift_mod
from monitor.alerts import AlertSettings, AlertStore, Notifier
from monitor.config import MonitorSettings, SloSettings
from monitor.keys import Keys
from monitor.redis_client import redis_client
from monitor.state import ControlState, ControlStore, ControlUpdate
from monitor.streams import GroupReader, Lease

log = logging.getLogger(__name__)
GROUP = "monitor"
DENSE = "dense"

ReferenceLoader = Callable[[str], tuple[object, pd.DataFrame]]  # version -> (Basis, reference rows)


@dataclass(frozen=True)
class MonitorContext:
    redis_url: str
    prefix: str
    monitor: MonitorSettings
    alerts: AlertSettings
    mlflow_uri: str | None = None
    mlflow_ui: str | None = None  # base URL of the MLflow UI for links in alerts
    redis: object | None = None  # the settings' redis section (AUTH, TLS); None: redis_url alone


def window_stats(rows: list[dict]) -> dict:
    """Count, mean and p95 of the per-sample mean KL, top-1 agreement, exact-match rate."""
    if not rows:
        return {"count": 0, "kl_mean": None, "kl_p95": None, "top1": None, "exact_match": None}
    kl = np.array([r["kl_mean"] for r in rows], dtype=float)
    return {"count": len(rows), "kl_mean": float(kl.mean()), "kl_p95": float(np.percentile(kl, 95)),
            "top1": float(np.mean([r["top1"] for r in rows])),
            "exact_match": float(np.mean([bool(r["exact_match"]) for r in rows]))}


def _mean_var(values: list[float]) -> tuple[float, float]:
    """Mean and the variance of the mean (sample variance / n; 0 for fewer than 2)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, var / n


def bound(a: list[float], b: list[float] | None, z: float) -> dict:
    """Mean of a (minus the mean of b) with its two-sided normal bounds at z standard errors
    (Welch: the arms' variances are not assumed equal). Per-sample values are independent
    requests, so the central limit theorem holds once a few dozen are in."""
    m, v = _mean_var(a)
    if b:
        mb, vb = _mean_var(b)
        m, v = m - mb, v + vb
    half = z * math.sqrt(v)
    return {"estimate": round(m, 5), "lower": round(m - half, 5), "upper": round(m + half, 5)}


def slo_breach(top1: dict, kl: dict, slo: SloSettings, confidence: float | None) -> list[str]:
    """What of the SLO `top1` and `kl` (bounds as `bound` gives them) break, clearly at the
    one-sided `confidence` (None: their estimates). Empty: no breach."""
    t, k = (top1["estimate"], kl["estimate"]) if confidence is None else (top1["upper"], kl["lower"])
    at = "" if confidence is None else f" ({confidence:.0%} bound {{b:.4f}})"
    out = []
    if k > slo.kl_mean_max:
        out.append(f"mean KL {kl['estimate']:.4f} > {slo.kl_mean_max}" + at.format(b=k))
    if t < slo.top1_min:
        out.append(f"top-1 agreement {top1['estimate']:.3f} < {slo.top1_min}" + at.format(b=t))
    return out


def z_of(confidence: float | None) -> float:
    """Standard errors of a one-sided bound at `confidence` (0: the point estimate)."""
    return 0.0 if confidence is None else NormalDist().inv_cdf(confidence)


class Monitor:
    def __init__(self, ctx: MonitorContext, reference_loader: ReferenceLoader | None = None,
                 client: redis.Redis | None = None, instance: str | None = None, scheduler_factory=None):
        """`scheduler_factory()` -> an object with start()/shutdown(), run while this instance
        holds the lease (the jobs' scheduler: one active in the deployment)."""
        self.ctx, self.cfg, p = ctx, ctx.monitor, ctx.prefix
        self.scheduler_factory, self.scheduler = scheduler_factory, None
        self.r = client or redis_client(ctx.redis or ctx.redis_url)
        # blocking stream reads must not hit the client's socket timeout (ENV: redis-py 8)
        self.rb = redis_client(ctx.redis or ctx.redis_url, blocking=True)
        self.instance = instance or f"monitor-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.p, self.keys = p, Keys(p)
        self.lease = Lease(self.r, self.keys.monitor_lease, self.instance, self.cfg.lease_ttl_s)
        claim_ms = int(self.cfg.claim_idle_s * 1000)
        self.samples = GroupReader(self.rb, self.keys.shadow_samples, GROUP, self.instance, claim_ms)
        self.features = GroupReader(self.rb, self.keys.features, GROUP, self.instance, claim_ms)
        self.alerts = AlertStore(self.r, p, ctx.alerts)
        self.control = ControlStore(self.r, p)
        self.reference_loader = reference_loader
        self._references: dict[str, tuple[object, pd.DataFrame]] = {}
        self.last_check: dict[str, float] = {}
        self.active = False
        self.counts = {"samples": 0, "features": 0, "invalid": 0, "checks": 0}

    # ---- consuming ------------------------------------------------------------------------------
    def _sample_row(self, fields: dict) -> tuple[str, str, dict]:
        meta = json.loads(_s(fields[b"meta"]))
        fid = json.loads(_s(fields[b"fidelity"]))
        version = meta.get("predictor_version") or DENSE
        arm = meta.get("arm") or ("dense" if version == DENSE else "champion")
        row = {"request_id": meta.get("request_id"), "kl_mean": float(fid["kl_mean"]),
               "top1": float(fid["top1_agreement"]), "exact_match": bool(fid["exact_match"]),
               "generation": meta.get("generation"), "sparsity": meta.get("sparsity"), "ts": time.time()}
        return str(version), arm, row

    def _consume_samples(self, entries) -> int:
        applied, champion = 0, None
        for e in entries:
            try:
                version, arm, row = self._sample_row(e.fields)
            except (KeyError, ValueError, TypeError):
                log.warning("shadow sample %s is malformed: acknowledged and skipped", e.id)
                self.samples.ack_append(e.id, "", "", 1, self.keys.monitor_totals, "invalid|none")
                self.counts["invalid"] += 1
                continue
            row["sample_id"] = e.id
            window = self.keys.monitor_window(version, arm)
            if self.samples.ack_append(e.id, window, json.dumps(row), self.cfg.slo.window,
                                       self.keys.monitor_totals, f"{version}|{arm}"):
                applied += 1
                champion = version if arm == "champion" else champion
        if champion is not None:
            self.r.set(self.keys.monitor_champion_seen, champion)
        self.counts["samples"] += applied
        return applied

    def _consume_features(self, entries) -> int:
        applied, per_version = 0, {}
        for e in entries:
            try:
                row = json.loads(_s(e.fields[b"row"]))
                version = str(row.pop("version"))
            except (KeyError, ValueError, TypeError):
                log.warning("feature row %s is malformed: acknowledged and skipped", e.id)
                self.features.ack_append(e.id, "", "", 1, self.keys.monitor_feature_totals, "invalid")
                self.counts["invalid"] += 1
                continue
            window = self.keys.monitor_features(version)
            if self.features.ack_append(e.id, window, json.dumps(row), self.cfg.drift.window,
                                        self.keys.monitor_feature_totals, version):
                applied += 1
                per_version[version] = per_version.get(version, 0) + 1
        for version, n in per_version.items():  # what triggers the next drift check
            self.r.hincrby(self.keys.monitor_since_check, version, n)
        self.counts["features"] += applied
        return applied

    def drain(self, block_ms: int | None = None) -> int:
        """Reclaim what dead consumers left, then read what is new; returns entries applied.
        Samples are taken in batches of at most `slo.min_samples` with the SLO checked after
        each, so a breach is acted on within min_samples + one batch however far behind the
        monitor is."""
        batch = max(1, min(50, self.cfg.slo.min_samples))
        n = self._consume_samples(self.samples.reclaim(batch)) + self._consume_features(self.features.reclaim())
        n += self._consume_samples(self.samples.own_pending(batch))
        n += self._consume_features(self.features.own_pending())
        self.check_slo()
        # bounded per step, so the summary is written under any load
        for _ in range(20):
            if not (got := self._consume_samples(self.samples.read_new(batch, None))):
                break
            n += got
            self.check_slo()
        for _ in range(10):
            if not (got := self._consume_features(self.features.read_new(500, None))):
                break
            n += got
        if not n and block_ms:  # nothing at all: wait for a sample (bounded), then take it
            n += self._consume_samples(self.samples.read_new(batch, block_ms))
        return n

    # ---- windows ------------------------------------------------------------------------------
    def window(self, version: str, arm: str) -> list[dict]:
        return [json.loads(x) for x in self.r.lrange(self.keys.monitor_window(version, arm), 0, -1)]

    def windows(self) -> list[dict]:
        totals = {_s(k): int(v) for k, v in self.r.hgetall(self.keys.monitor_totals).items()}
        out = []
        for key in sorted(totals):
            version, _, arm = key.partition("|")
            if version == "invalid":
                continue
            out.append({"version": version, "arm": arm, "total": totals[key],
                        **window_stats(self.window(version, arm))})
        return out

    def champion_version(self, state) -> str | None:
        if state is not None and state.champion:
            return state.champion
        v = self.r.get(self.keys.monitor_champion_seen)
        return _s(v) if v else None

    # ---- the fidelity SLO and the fallback lever ------------------------------------------------
    def check_slo(self) -> dict | None:
        """Pull the fallback lever when the champion's window breaks the SLO; returns the breach.
        A fallback that ended since the last look is handled first: its window is not evidence."""
        state = self.watch_fallback()
        slo = self.cfg.slo
        version = self.champion_version(state)
        if state is None or version is None:
            return None
        rows = self.window(version, "champion")
        stats = window_stats(rows)
        if stats["count"] < slo.min_samples or state.fallback != "none":
            return None
        z = z_of(slo.confidence)
        top1, kl = bound([x["top1"] for x in rows], None, z), bound([x["kl_mean"] for x in rows], None, z)
        reasons = slo_breach(top1, kl, slo, slo.confidence)
        if not reasons:
            return None
        stats = {**stats, "top1_bound": top1, "kl_bound": kl}
        new = self.control.update(ControlUpdate(fallback=self.cfg.fallback), by="monitor")
        self.r.set(self.keys.monitor_fallback_seen, new.fallback)
        evidence = {"window": stats, "slo": slo.model_dump(), "reasons": reasons, "generation": new.generation,
                    "fallback": new.fallback}
        self.alerts.raise_alert("fallback", "critical",
                                f"predictor {version} broke the fidelity SLO ({'; '.join(reasons)}): "
                                f"serving {new.fallback}", predictor_version=version, evidence=evidence,
                                dedup_key=f"fallback:{version}:{new.generation}")
        log.warning("fallback %s: predictor %s broke the SLO (%s)", new.fallback, version, "; ".join(reasons))
        return evidence

    def watch_fallback(self):
        """A fallback that ended (whoever ended it) raises `recovered`; one set by someone else
        is reported too. Transitions are read from the control history, so a fallback set and
        cleared between two looks is seen. The champion's window starts afresh after a
        recovery. Returns the control state it looked at."""
        state = self.control.get()
        if state is None:
            return None
        seen_key, pos_key = self.keys.monitor_fallback_seen, self.keys.monitor_control_seen
        seen = _s(self.r.get(seen_key) or b"none")
        pos = self.r.get(pos_key)
        if pos is None:  # first look: only the present counts
            changes, last = [], self.control.last_change_id()
        else:
            changes = self.control.changes(_s(pos))
            last = changes[-1][0] if changes else _s(pos)
        # the present state closes the sequence (covers a history trimmed or written without one)
        for s in [c for _, c in changes if c.generation <= state.generation] + [state]:
            if s.fallback != seen:
                self._fallback_changed(seen, s)
                seen = s.fallback
        with self.r.pipeline() as pipe:
            pipe.set(seen_key, seen)
            pipe.set(pos_key, last)
            pipe.execute()
        return state

    def _fallback_changed(self, seen: str, state: ControlState) -> None:
        version = self.champion_version(state)
        if state.fallback == "none":
            self._forget_before(state.generation)
            self.alerts.raise_alert("recovered", "info",
                                    f"fallback {seen} ended by {state.updated_by}: serving predictor "
                                    f"{version or 'champion'} again", predictor_version=version,
                                    evidence={"generation": state.generation, "updated_by": state.updated_by,
                                              "previous": seen},
                                    dedup_key=f"recovered:{state.generation}")
        elif state.updated_by != "monitor":
            self.alerts.raise_alert("fallback", "warning",
                                    f"fallback {state.fallback} set by {state.updated_by}",
                                    predictor_version=version,
                                    evidence={"generation": state.generation, "updated_by": state.updated_by},
                                    dedup_key=f"fallback:manual:{state.generation}")

    def _forget_before(self, generation: int) -> None:
        """Drop champion-arm rows served before `generation` (a recovery): what broke the SLO
        is no evidence against what is served now. Rows of later requests stay."""
        for key in self.r.scan_iter(self.keys.monitor_window("*", "champion")):
            rows = [x for x in self.r.lrange(key, 0, -1) if (json.loads(x).get("generation") or 0) >= generation]
            with self.r.pipeline() as pipe:  # MULTI: the list is never seen half rewritten
                pipe.delete(key)
                if rows:
                    pipe.rpush(key, *rows)
                pipe.execute()

    # ---- drift ---------------------------------------------------------------------------------
    def reference(self, version: str):
        if version not in self._references:
            if self.reference_loader is None:
                raise drift_mod.MissingReference("no reference loader configured")
            self._references[version] = self.reference_loader(version)
        return self._references[version]

    def drift_columns(self, available: list[str]) -> list[str]:
        d = self.cfg.drift
        cols = d.columns or available
        return [c for c in cols if c in available and c not in d.exclude_columns]

    def check_drift_due(self, force: bool = False) -> list[dict]:
        d, out = self.cfg.drift, []
        since = {_s(k): int(v) for k, v in self.r.hgetall(self.keys.monitor_since_check).items()}
        for version, n_new in since.items():
            if version == DENSE:
                continue
            waited = time.time() - self.last_check.get(version, 0.0)
            if force or n_new >= d.every_requests or (n_new and waited >= d.interval_s):
                res = self.check_drift(version)
                if res is not None:
                    out.append(res)
        return out

    def check_drift(self, version: str) -> dict | None:
        d = self.cfg.drift
        rows = [json.loads(x) for x in self.r.lrange(self.keys.monitor_features(version), 0, -1)]
        if len(rows) < d.min_rows:
            return None
        try:
            _, ref = self.reference(version)
        except Exception as exc:  # MLflow down or no reference: try again at the next due check
            log.warning("no drift reference for version %s yet: %s", version, exc)
            return None
        current = pd.DataFrame(rows)
        cols = self.drift_columns([c for c in ref.columns if c in current.columns])
        t0 = time.perf_counter()
        result = drift_mod.check_drift(ref[cols], current[cols], html=d.html_report, drift_share=d.drift_share,
                                       method=d.method)
        elapsed = time.perf_counter() - t0
        self.r.hset(self.keys.monitor_since_check, version, 0)
        self.last_check[version] = time.time()
        self.counts["checks"] += 1
        drifted = {c: v["score"] for c, v in result.columns.items() if v["drifted"]}
        run_id, run_url = self._log_check(version, result, elapsed)
        record = {"version": version, "drift": result.drift, "share": result.share, "drifted": drifted,
                  "window": result.n_current, "reference": result.n_reference, "columns": cols,
                  "ts": time.time(), "seconds": round(elapsed, 3), "run_id": run_id, "run_url": run_url}
        self.r.hset(self.keys.monitor_drift, version, json.dumps(record))
        if result.drift:
            top = ", ".join(f"{c} {s:.3g}" for c, s in sorted(drifted.items())[:8])
            self.alerts.raise_alert("drift", "warning",
                                    f"input drift against predictor {version}'s reference: "
                                    f"{len(drifted)}/{result.n_columns} columns drifted ({top})",
                                    predictor_version=version,
                                    evidence={k: record[k] for k in ("share", "drifted", "window", "reference",
                                                                     "run_id", "run_url")},
                                    dedup_key=f"drift:{version}")
        return record

    def _log_check(self, version: str, result, elapsed: float) -> tuple[str | None, str | None]:
        """Every check is an MLflow run (metrics + the HTML report); None when MLflow is down."""
        if not self.ctx.mlflow_uri:
            return None, None
        try:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=self.ctx.mlflow_uri)
            exp = client.get_experiment_by_name(self.cfg.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(
                self.cfg.experiment, artifact_location=_local_artifacts(self.ctx.mlflow_uri))
            run = client.create_run(exp_id, tags={"shadowgate.kind": "drift-check", "predictor_version": version,
                                                  "drift": str(result.drift).lower()},
                                    run_name=f"drift-v{version}-{time.strftime('%Y%m%dT%H%M%S')}")
            rid = run.info.run_id
            for k, v in {"share_drifted": result.share, "drifted_columns": result.drifted_count,
                         "columns": result.n_columns, "window_size": result.n_current,
                         "reference_size": result.n_reference, "drift": float(result.drift),
                         "seconds": elapsed}.items():
                client.log_metric(rid, k, float(v))
            client.log_dict(rid, result.as_dict(), "drift.json")
            if result.html:
                client.log_text(rid, result.html, "drift_report.html")
            client.set_terminated(rid)
            base = (self.ctx.mlflow_ui or self.ctx.mlflow_uri).rstrip("/")
            return rid, f"{base}/#/experiments/{exp_id}/runs/{rid}"
        except Exception as exc:
            log.warning("drift check of version %s not logged to MLflow: %s", version, exc)
            return None, None

    # ---- summary and the loop --------------------------------------------------------------
    def summary(self) -> dict:
        state = self.control.get()
        drifts = {_s(k): json.loads(v) for k, v in self.r.hgetall(self.keys.monitor_drift).items()}
        ftot = {_s(k): int(v) for k, v in self.r.hgetall(self.keys.monitor_feature_totals).items()}
        return {"ts": time.time(), "instance": self.instance, "champion": self.champion_version(state),
                "fallback": state.fallback if state else None, "generation": state.generation if state else None,
                "slo": self.cfg.slo.model_dump(), "windows": self.windows(),
                "drift": drifts, "features": {v: {"total": n, "window": self.r.llen(self.keys.monitor_features(v))}
                                              for v, n in ftot.items() if v != "invalid"},
                "streams": {"samples": self.samples.lag(), "features": self.features.lag()},
                "counts": dict(self.counts)}

    def step(self, block_ms: int | None = None) -> dict:
        """One pass while holding the lease."""
        self.drain(block_ms)
        self.check_slo()
        self.check_drift_due()
        summary = self.summary()
        self.r.set(self.keys.monitor_summary, json.dumps(summary))
        return summary

    def _status(self, active: bool) -> None:
        self.r.set(self.keys.monitor_status, json.dumps({"instance": self.instance, "pid": os.getpid(),
                                                           "active": active, "ts": time.time()}),
                   ex=int(self.cfg.lease_ttl_s * 3))

    def _heartbeat(self, done: threading.Event, lost: threading.Event) -> None:
        """Renews the lease at a third of its TTL, however long a step (a first Evidently
        report imports for seconds) takes; sets `lost` when another instance holds it."""
        while not done.wait(self.cfg.lease_ttl_s / 3):
            try:
                if not self.lease.hold():
                    lost.set()
                    return
                self._status(True)
            except redis.RedisError as exc:  # the TTL covers short outages; past it, lost
                log.warning("monitor lease not renewed: %s", exc)

    def run(self, stop: threading.Event) -> None:
        """Wait for the lease, then step until stopped or the lease is lost (then wait again)."""
        notifier = Notifier(self.r, self.p, self.ctx.alerts, consumer=self.instance)
        done, lost = threading.Event(), threading.Event()
        threads: list[threading.Thread] = []

        def stand_down():
            done.set()
            if self.scheduler is not None:
                try:
                    self.scheduler.shutdown()
                except Exception:
                    log.exception("scheduler shutdown failed")
                self.scheduler = None
            for t in threads:
                t.join(10)
            threads.clear()
            self.active = False

        while not stop.is_set():
            try:
                if not self.active:
                    if not self.lease.hold():
                        stop.wait(self.cfg.lease_ttl_s / 3)
                        continue
                    log.info("%s holds the monitor lease", self.instance)
                    done, lost = threading.Event(), threading.Event()
                    threads[:] = [threading.Thread(target=self._heartbeat, args=(done, lost), daemon=True,
                                                   name="monitor-lease"),
                                  threading.Thread(target=notifier.run, args=(done,), daemon=True,
                                                   name="alert-notifier")]
                    for t in threads:
                        t.start()
                    self.active = True
                    self._status(True)
                    if self.scheduler_factory is not None:
                        self.scheduler = self.scheduler_factory()
                        self.scheduler.start()
                if lost.is_set():
                    log.warning("%s lost the monitor lease", self.instance)
                    stand_down()
                    continue
                self.step(block_ms=self.cfg.poll_ms)
            except redis.RedisError as exc:
                log.warning("monitor step failed (Redis): %s; retrying", exc)
                stop.wait(1.0)
            except Exception:
                log.exception("monitor step failed; retrying")
                stop.wait(1.0)
        was_active = self.active
        stand_down()
        if was_active:
            self.lease.release()


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _local_artifacts(uri: str) -> str | None:
    """A local SQLite store would put artifacts under ./mlruns of the working directory: keep
    them beside the database (a server manages its own)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return None
