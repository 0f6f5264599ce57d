"""`shadowgate bench faults`: the service under a steady client load while things break.

One private stack (its own redis-server with AOF, MLflow server, Ray head, two GatedLLM
replicas); `clients` threads each send 16-token completions back to back the whole time.
The faults, in turn:

1. replica_kill: SIGKILL of one GatedLLM replica. Failed requests from the kill until the
   replacement serves, and the time until Serve has every replica running again.
2. redis_kill: SIGKILL of redis-server, `redis_down_s` down, the same server started again
   (AOF replayed). Failed client requests; acknowledged writes lost (a probe writer's stream
   entries and alerts, each counted only once Redis answered with its id, and the real
   shadow samples and alerts present before the kill); the time from the restart until a
   PUT /admin/state is served by every replica.
3. mlflow_outage: the MLflow server stopped for `mlflow_down_s`. Failed client requests; the
   scheduled rollout job retries with backoff and raises `job_failure`; a fallback set
   during the outage is served; after the restart the job succeeds again.
4. bad_artifact: a corrupt and a mismatched predictor registered and approved. The rollout
   controller refuses each before a canary (champion kept, alert raised); one named as
   challenger straight through PUT /admin/state is refused by the replicas at load.

Each scenario returns its figures; `run` returns the JSON report. The test (tests/serving/
test_faults.py) runs the same functions with shorter outages.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from monitor.keys import Keys
from serving.bench.harness import suite_prompts, wait_until

MAX_TOKENS = 16


@dataclass
class Outcome:
    t0: float
    t1: float
    ok: bool
    status: int | None
    error: str | None = None
    body: dict | None = None
    client: int = -1


@dataclass
class Load:
    """`clients` threads, each sending completions back to back until stopped."""

    stack: object
    clients: int = 4
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.prompts = suite_prompts("test", None, 60)

    def start(self) -> "Load":
        self.started_at = time.time()
        for i in range(self.clients):
            t = threading.Thread(target=self._client, args=(i,), name=f"load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _client(self, i: int) -> None:
        with self.stack.client(timeout=120) as c:
            n = i
            while not self._stop.is_set():
                prompt = self.prompts[n % len(self.prompts)]
                n += self.clients
                t0 = time.time()
                try:
                    r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS,
                                                        "temperature": 0})
                    ok = r.status_code == 200
                    out = Outcome(t0, time.time(), ok, r.status_code, None if ok else r.text[:300],
                                  r.json().get("shadowgate") if ok else None, i)
                except Exception as exc:  # a connection error, a timeout, a body that is not JSON
                    out = Outcome(t0, time.time(), False, None, f"{type(exc).__name__}: {exc}"[:300], None, i)
                with self._lock:
                    self.outcomes.append(out)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(180)

    def between(self, t0: float, t1: float) -> list[Outcome]:
        """Requests that were in flight at any moment of [t0, t1]."""
        with self._lock:
            return [o for o in self.outcomes if o.t1 >= t0 and o.t0 <= t1]

    def summary(self, t0: float, t1: float) -> dict:
        rows = self.between(t0, t1)
        failed = [o for o in rows if not o.ok]
        lat = sorted(o.t1 - o.t0 for o in rows if o.ok)
        return {"requests": len(rows), "failed": len(failed),
                "failed_pct": round(100.0 * len(failed) / len(rows), 3) if rows else None,
                "p50_s": round(lat[len(lat) // 2], 3) if lat else None,
                "p99_s": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3) if lat else None,
                "errors": sorted({o.error or str(o.status) for o in failed})[:5]}


def _admin(stack):
    return stack.client(admin=True, timeout=60)


def _replicas(stack, role: str = "llm") -> list[dict]:
    with _admin(stack) as a:
        return [r for r in a.get("/admin/state").json()["replicas"] if r["role"] == role]


def _serve_running(deployment: str = "GatedLLM") -> tuple[int, int]:
    """(replicas running, replicas wanted) as Serve reports them."""
    from ray import serve

    from serving.app import APP_NAME

    dep = serve.status().applications[APP_NAME].deployments[deployment]
    running = dep.replica_states.get("RUNNING", 0)
    return running, sum(dep.replica_states.values()) if dep.replica_states else 0


def _replacement_startup(stack, before: set[int], t_kill: float) -> dict | None:
    """Where the replacement replica's start went (its own report, published with the decode
    loop's timing), in seconds after the kill: when its worker process started, when its
    constructor began (the time before that is Ray starting the actor and the imports), the
    engine (model and predictor) and control state with warm-up, and when it was ready."""
    r, p = stack.redis(), stack.settings.redis.prefix
    new = [rep["pid"] for rep in _replicas(stack) if rep["pid"] not in before]
    # the timing document is published every second, its startup part once the replica is ready
    report = wait_until(lambda: json.loads(r.get(Keys(p).llm_timing(new[0])) or "{}").get("startup"), 10, 0.2) \
        if new else None
    if not report:
        return None
    return {"process_started_after_kill_s": round(report["process_started_at"] - t_kill, 2),
            "constructor_began_after_kill_s": round(report["init_at"] - t_kill, 2),
            "engine_s": report["engine_s"], "state_and_warmup_s": report["state_and_warmup_s"],
            "ready_after_kill_s": round(report["ready_at"] - t_kill, 2)}


def _served_again(load: Load, t_kill: float, t_back: float) -> dict:
    """How the service carried the load while a replica was missing: when every client had
    again an answer (200) to a request it began after the kill, when the last request in flight
    at the kill ended (the gateway retries one whose replica died on another), and the rate of
    answers before the kill and until the replacement was in (a death costs capacity)."""
    rows = load.between(t_kill - 20, time.time())
    first: dict[int, float] = {}
    for o in rows:
        if o.ok and o.t0 >= t_kill:
            first[o.client] = min(first.get(o.client, o.t1), o.t1)
    in_flight = [o.t1 for o in rows if o.t0 <= t_kill <= o.t1]
    w = max(1e-3, min(20.0, t_kill - load.started_at))
    return {"served_again_s": round(max(first.values()) - t_kill, 2) if len(first) == load.clients else None,
            "in_flight_done_s": round(max(in_flight) - t_kill, 2) if in_flight else None,
            "ok_per_s_before": round(sum(o.ok and t_kill - w <= o.t1 <= t_kill for o in rows) / w, 2),
            "ok_per_s_until_replaced": round(sum(o.ok and t_kill <= o.t1 <= t_back for o in rows)
                                             / max(1e-3, t_back - t_kill), 2)}


def replica_kill(stack, load: Load, settle_s: float = 5.0) -> dict:
    """SIGKILL one GatedLLM replica under load. Two figures: when the service answered every
    client again (`served_again_s`: with a spare replica the survivor takes the traffic at once)
    and when the replica was replaced (`recovery_s`: Serve runs every replica again and the
    replacement has reported to the control state)."""
    wanted = stack.settings.serve.llm_replicas
    assert wait_until(lambda: _serve_running()[0] >= wanted, 120), "not every replica is running"
    time.sleep(settle_s)
    before = {r["pid"] for r in _replicas(stack)}
    victim = max(_replicas(stack), key=lambda r: r["ts"])
    t_kill = time.time()
    os.kill(victim["pid"], signal.SIGKILL)
    # Serve notices the death and starts a replacement, which loads the model, warms up and
    # reports to the control state
    noticed = wait_until(lambda: _serve_running()[0] < wanted, 30, 0.1)
    t_noticed = time.time()
    back = wait_until(lambda: _serve_running()[0] >= wanted and any(
        r["pid"] not in before for r in _replicas(stack)), 180, 0.2)
    t_back = time.time()
    time.sleep(settle_s)
    out = load.summary(t_kill, time.time())
    failed = [o for o in load.between(t_kill, time.time()) if not o.ok]
    return {**out, "killed_pid": victim["pid"], "replicas": wanted, **_served_again(load, t_kill, t_back),
            "recovery_s": round(t_back - t_kill, 2) if back else None,
            "serve_noticed_s": round(t_noticed - t_kill, 2) if noticed else None,
            "replacement": _replacement_startup(stack, before, t_kill),
            "last_failure_after_kill_s": round(max(o.t1 for o in failed) - t_kill, 2) if failed else None}


def _stream_ids(r, key: str) -> set[str]:
    return {(e[0].decode() if isinstance(e[0], bytes) else e[0]) for e in r.xrange(key, "-", "+")}


def _writes_after(r, prefix: str, written: dict, last: int = 50) -> list[str]:
    """Who wrote the control document after `written` (same epoch, later generations), from
    the newest entries of its history: "generation by writer"."""
    out = []
    for _, fields in r.xrevrange(Keys(prefix).control_history, count=last):
        s = json.loads(fields.get(b"state") or fields["state"])
        if s["epoch"] == written["epoch"] and s["generation"] > written["generation"]:
            out.append(f"{s['generation']} by {s['updated_by']}")
    return sorted(out)


def redis_kill(stack, load: Load, down_s: float = 5.0, settle_s: float = 5.0) -> dict:
    """SIGKILL redis-server, keep it down `down_s`, start it again on its AOF."""
    import redis

    from monitor.alerts import AlertStore

    p = stack.settings.redis.prefix
    probe_key = Keys(p).bench_probe
    acked: dict[str, list[str]] = {"probe": [], "alerts": []}
    stop = threading.Event()
    write_failures = {"n": 0}

    def writer():
        # one client: redis-py drops a broken connection and connects again on the next call
        i, r = 0, stack.redis()
        while not stop.is_set():
            try:
                entry = r.xadd(probe_key, {"i": str(i)})
                acked["probe"].append(entry.decode() if isinstance(entry, bytes) else entry)
                alert = AlertStore(r, p, stack.settings.alerts).raise_alert(
                    "recovered", "info", f"fault-bench probe {i}", evidence={"probe": i},
                    dedup_key=f"bench-probe:{i}")
                if alert is not None:
                    acked["alerts"].append(alert.id)
                i += 1
            except (redis.RedisError, OSError):
                write_failures["n"] += 1
            time.sleep(0.02)

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    time.sleep(settle_s)
    r = stack.redis()
    samples_key, alerts_key = Keys(p).shadow_samples, Keys(p).alerts
    before = {"samples": _stream_ids(r, samples_key), "alerts": _stream_ids(r, alerts_key)}
    state_before = json.loads(r.get(Keys(p).control_state))
    t_kill = time.time()
    stack.kill("redis")
    time.sleep(down_s)
    t_restart = time.time()
    stack.restart_redis()
    t_up = time.time()
    # the control state followed again: one write, served by every replica. Another writer
    # may come after it (the monitor pulls the fallback lever when the champion breaks the
    # fidelity SLO, the rollout controller): a replica serving a later generation of the same
    # document has applied this one too (generations are applied in order within an epoch)
    with _admin(stack) as a:
        new_sparsity = 0.35 if state_before["sparsity"] != 0.35 else 0.4
        put = a.put("/admin/state", json={"sparsity": new_sparsity})
        written = put.json()["state"] if put.status_code == 200 else None
    gen = written["generation"] if written else None
    reports: list[dict] = []

    def every_replica_follows() -> bool:
        reports[:] = _replicas(stack, "llm") + _replicas(stack, "gateway")
        return bool(reports) and all(rep["epoch"] == written["epoch"] and rep["generation"] >= gen
                                     for rep in reports)

    followed = wait_until(lambda: written is not None and every_replica_follows(), 30, 0.05)
    t_followed = time.time()
    time.sleep(settle_s)
    stop.set()
    w.join(10)
    writer_stuck = w.is_alive()  # a write still in flight would be acknowledged after the read below
    r = stack.redis()
    after = {"samples": _stream_ids(r, samples_key), "alerts": _stream_ids(r, alerts_key),
             "probe": _stream_ids(r, probe_key)}
    state_after = json.loads(r.get(Keys(p).control_state))
    lost_ids = {"shadow_samples": before["samples"] - after["samples"],
                "alerts": (before["alerts"] | set(acked["alerts"])) - after["alerts"],
                "probe_entries": set(acked["probe"]) - after["probe"]}
    lost = {k: len(v) for k, v in lost_ids.items()}
    # when each lost entry was written (its id's milliseconds), relative to the kill: a loss
    # just before the kill is a write Redis acknowledged before it reached the AOF file
    lost_at = {k: sorted(round(int(i.split("-")[0]) / 1000 - t_kill, 3) for i in v)[:20]
               for k, v in lost_ids.items() if v}
    later = _writes_after(r, p, written) if written else None
    with _admin(stack) as a:
        a.put("/admin/state", json={"sparsity": state_before["sparsity"]})
    return {**load.summary(t_kill, time.time()), "down_s": round(t_restart - t_kill, 2),
            "restart_s": round(t_up - t_restart, 2), "put_status": put.status_code,
            "followed_after_restart_s": round(t_followed - t_up, 2) if followed else None,
            "put_generation": gen, "later_writes": later,
            "replicas_when_checked": [(rep["role"], rep["generation"]) for rep in reports],
            "epoch_kept": state_after["epoch"] == state_before["epoch"],
            "acknowledged": {"probe_entries": len(acked["probe"]), "alerts": len(acked["alerts"]),
                             "shadow_samples_before_kill": len(before["samples"]),
                             "alerts_before_kill": len(before["alerts"])},
            "probe_write_failures": write_failures["n"], "lost": lost, "lost_written_after_kill_s": lost_at,
            "probe_writer_stuck": writer_stuck}


def _job_failures(stack, since: float) -> list[dict]:
    with _admin(stack) as a:
        alerts = a.get("/admin/alerts", params={"kind": "job_failure", "limit": 50}).json()["alerts"]
    return [x for x in alerts if x["ts"] >= since]


def mlflow_outage(stack, load: Load, down_s: float = 60.0, settle_s: float = 5.0, how: str = "stop",
                  alert_wait_s: float = 60.0) -> dict:
    """Stop the MLflow server (`how`: "stop", SIGTERM and its graceful shutdown, or "kill",
    SIGKILL) for `down_s`; set and clear a fallback while it is down. When no job_failure has
    come by then, MLflow stays down up to `alert_wait_s` longer (the outage reported is the
    real one)."""
    from monitor.alerts import AlertStore

    r = stack.redis()
    p = stack.settings.redis.prefix
    # a new incident: a job_failure of an earlier fault (Redis down mid-job) must not hold
    # this one back under the alert cool-down
    AlertStore(r, p, stack.settings.alerts).clear_dedup("job_failure:rollout")
    time.sleep(settle_s)
    t_stop = time.time()
    (stack.kill if how == "kill" else stack.stop)("mlflow")
    fallback = {}
    with _admin(stack) as a:
        time.sleep(min(5.0, down_s / 4))
        put = a.put("/admin/state", json={"fallback": "dense"})
        t_put = time.time()
        dense = wait_until(lambda: [o for o in load.between(time.time() - 0.5, time.time())
                                    if o.ok and o.t0 > t_put and o.body and o.body["fallback"] == "dense"], 30, 0.1)
        fallback = {"put_status": put.status_code, "served_s": round(time.time() - t_put, 2) if dense else None}
        alert = wait_until(lambda: _job_failures(stack, t_stop),
                           max(5.0, down_s - (time.time() - t_stop)) + alert_wait_s, 0.5)
        t_alert = time.time()
        remaining = down_s - (time.time() - t_stop)
        if remaining > 0:
            time.sleep(remaining)
        a.put("/admin/state", json={"fallback": "none"})
    t_restart = time.time()
    stack.restart_mlflow()
    t_up = time.time()
    ok_again = wait_until(lambda: (json.loads(r.hget(Keys(p).jobs_last, "rollout") or "{}").get("started", 0) > t_up
                                   and json.loads(r.hget(Keys(p).jobs_last, "rollout"))["status"] == "ok"), 90, 0.5)
    time.sleep(settle_s)
    failure = (alert or [{}])[0]
    return {**load.summary(t_stop, time.time()), "down_s": round(t_restart - t_stop, 2), "how": how,
            "fallback": fallback, "job_failure_alert_after_s": round(t_alert - t_stop, 2) if alert else None,
            "job_failure_message": failure.get("message"),
            "job_ok_after_restart_s": round(time.time() - settle_s - t_up, 2) if ok_again else None}


def _broken(src: Path, dst: Path, how: str) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    if how == "corrupt":
        (dst / "predictor.safetensors").write_bytes(b"\x00not a safetensors file" * 16)
    else:
        cfg = json.loads((dst / "predictor.json").read_text())
        cfg["model_fingerprint"] = "0" * len(cfg["model_fingerprint"])
        (dst / "predictor.json").write_text(json.dumps(cfg))
    return dst


def _served_by(bodies: list[dict]) -> dict[str, int]:
    """Responses counted by what they say served them: "version/arm/fallback"."""
    counts: dict[str, int] = {}
    for b in bodies:
        key = f"{b['predictor_version']}/{b['arm']}/{b['fallback']}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def bad_artifact(stack, load: Load, work: Path, settle_s: float = 3.0) -> dict:
    """A corrupt and a mismatched version approved; then one forced in as challenger."""
    registry = stack.registry()
    champion = stack.champion
    src = registry.download(champion)
    out: dict = {"champion": champion, "approved": {}}
    t0 = time.time()
    with _admin(stack) as a:
        for how in ("corrupt", "mismatched"):
            version = registry.register(_broken(src, work / f"bad-{how}", how), tags={"source": f"bench-{how}"})
            t_approve = time.time()
            a.post(f"/admin/rollout/approve/{version}")
            decided = wait_until(lambda: [d for d in a.get("/admin/rollout").json()["decisions"]
                                          if d["version"] == version and d["decision"] in ("refused", "canary_started")],
                                 60, 0.5)
            alerts = a.get("/admin/alerts", params={"kind": "rollback", "limit": 20}).json()["alerts"]
            state = a.get("/admin/state").json()["state"]
            out["approved"][how] = {
                "version": version, "decision": decided[0]["decision"] if decided else None,
                "decided_after_s": round(time.time() - t_approve, 2) if decided else None,
                "alert": any(x["predictor_version"] == version for x in alerts),
                "challenger_after": state["challenger"], "champion_alias": registry.aliases().get("champion")}
        # straight past the controller: the replicas refuse it at load and keep the champion.
        # The state under test is named whole: the champion's arm serving its predictor (no
        # fallback: the monitor pulls that lever when the champion breaks the fidelity SLO, and
        # the champion's arm then serves dense, naming no version), the bad version as
        # challenger for half the requests.
        forced = out["approved"]["corrupt"]["version"]
        before = a.get("/admin/state").json()["state"]
        t_put = time.time()
        put = a.put("/admin/state", json={"challenger": forced, "canary_share": 0.5, "fallback": "none"})
        written = put.json()["state"] if put.status_code == 200 else None
        # counted from the moment every GatedLLM replica has applied it (or refused its challenger)
        applied = written is not None and wait_until(lambda: all(
            rep["epoch"] == written["epoch"] and rep["generation"] >= written["generation"]
            for rep in _replicas(stack)), 60, 0.1)
        t_applied = time.time()
        time.sleep(settle_s + 2)
        after_put = [o.body for o in load.between(t_put, time.time()) if o.ok and o.t0 > t_put]
        gen = written["generation"] if written else None
        # responses of the forced generation begun once every replica had it; a later
        # generation is another writer's (reported apart)
        served = [o.body for o in load.between(t_applied, time.time())
                  if o.ok and o.t0 > t_applied and o.body["generation"] == gen]
        out["forced_challenger"] = {
            "put_status": put.status_code, "generation": gen, "applied_by_every_replica": bool(applied),
            "fallback_before": before["fallback"] if before else None, "responses": len(served),
            "served_by_bad": sum(b["predictor_version"] == forced for b in after_put),
            "served_by_champion": sum(b["predictor_version"] == champion and b["arm"] == "champion"
                                      for b in served),
            "later_generation_responses": sum(b["generation"] > gen for b in after_put) if written else None,
            # what the responses said: "version/arm/fallback" -> count, so a miss is readable
            "served": _served_by(after_put)}
        restore = {"challenger": "none", "canary_share": 0.0}
        if before and before["fallback"] != "none":
            restore["fallback"] = before["fallback"]
        a.put("/admin/state", json=restore)
    out.update(load.summary(t0, time.time()))
    return out


FAULTS = ("replica_kill", "redis_kill", "mlflow_outage", "bad_artifact")


def stack_overrides(llm_replicas: int = 2) -> dict:
    return {"serve": {"llm_replicas": llm_replicas, "replica_cpus": 0.1, "defaults": {"shadow_rate": 0.2},
                      "reconcile_s": 2.0},
            "jobs": {"rollout_every_s": 1.0, "registry_backoff_s": 0.5, "registry_backoff_max_s": 4.0},
            "runtime": {"threads": 1}}


def run(work: Path, clients: int = 4, mlflow_down_s: float = 60.0, redis_down_s: float = 5.0,
        faults: tuple[str, ...] = FAULTS, progress=print) -> dict:
    """Every fault in turn on one private stack; returns the JSON report."""
    from serving.ops.stack import private_stack

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report: dict = {"settings": {"clients": clients, "max_tokens": MAX_TOKENS, "mlflow_down_s": mlflow_down_s,
                                 "redis_down_s": redis_down_s, **stack_overrides()}, "results": {}}
    with private_stack(work / "stack", **stack_overrides()) as stack:
        load = Load(stack, clients).start()
        try:
            time.sleep(5)
            t0 = time.time()
            for name in faults:
                progress(f"fault: {name}")
                if name == "replica_kill":
                    res = replica_kill(stack, load)
                elif name == "redis_kill":
                    res = redis_kill(stack, load, down_s=redis_down_s)
                elif name == "mlflow_outage":
                    res = mlflow_outage(stack, load, down_s=mlflow_down_s)
                else:
                    res = bad_artifact(stack, load, work)
                report["results"][name] = res
                progress(json.dumps(res))
            report["overall"] = load.summary(t0, time.time())
        finally:
            load.stop()
    return report
