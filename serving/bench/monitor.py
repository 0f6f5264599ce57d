"""`shadowgate bench monitor`: the monitor's figures, measured on a private stack.

1. drift: a champion trained on some of the suite's families serves them, then the traffic
   switches to the others; requests from the switch to the drift alert, false alarms over
   the in-distribution phase; with and without the prompt length among the columns.
2. fallback: a broken predictor (reversed scores) served as champion; shadow samples until
   the monitor falls back; the signed alert at a real local HTTP receiver; responses after
   it are dense and equal the dense tokens.
3. restart: the Monitor replica killed with SIGKILL while samples stream; every sample
   counted exactly once (by sample id).
4. MLflow stopped: requests keep being answered; a fallback still applies.

The scenario functions drive the service over HTTP and are shared with the end-to-end test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from safetensors.torch import load_file, save_file

from monitor.keys import Keys
from serving.bench.harness import Driver, suite_prompts, wait_until


def reversed_predictor(src: Path, dst: Path) -> Path:
    """A copy of a shadowllm predictor whose scores are negated: it keeps the units it should
    skip. Its drift reference is kept (the input distribution has not changed)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    path = dst / "predictor.safetensors"
    tensors = load_file(str(path))
    for name in list(tensors):
        if name.startswith(("heads.2.", "neurons.2.")):  # the output layers of both nets
            tensors[name] = -tensors[name]
    save_file(tensors, str(path))
    return dst


def narrow_predictor(loaded, families: list[str], work: Path, per_family: int = 150, epochs: int = 30) -> Path:
    """A shadowllm/plainact predictor trained on some families only, with its reference."""
    from adapter.pipeline.collect import collect
    from adapter.pipeline.build import train_one
    from adapter.pipeline.train import TrainConfig
    from jobs.bootstrap import with_reference

    data = collect(loaded.runtime.model, loaded.tokenizer, work / "traces",
                   {"train": per_family, "validation": max(4, per_family // 5)}, families=families)
    out = work / "narrow"
    train_one("shadowllm", "plainact", data, out, loaded.runtime, TrainConfig(epochs=epochs))
    return with_reference(out, loaded, work, families=families, per_family=max(1000 // len(families) + 1, 200))


class Receiver:
    """A real local HTTP endpoint that records webhook deliveries."""

    def __init__(self):
        self.requests: list[dict] = []
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                rec.requests.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
                                     "t": time.time()})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def fallback_scenario(d: Driver, broken_version: str, prompts: list[str], dense_tokens: dict[str, list[int]],
                      max_requests: int = 60) -> dict:
    """Serve `broken_version` as champion until the monitor falls back; returns the figures."""
    state = d.put_state(champion=broken_version, fallback="none")
    t0, sent = time.time(), 0
    while sent < max_requests:
        d.complete(prompts[sent % len(prompts)])
        sent += 1
        st = d.admin.get("/admin/state").json()["state"]
        if st["fallback"] != "none":
            break
    fell_back = wait_until(lambda: d.admin.get("/admin/state").json()["state"]["fallback"] != "none", 30)
    alert = next((a for a in d.alerts("fallback") if a["predictor_version"] == broken_version), None)
    window = alert["evidence"]["window"] if alert else {}  # what the decision saw
    st = d.admin.get("/admin/state").json()["state"]
    # responses after the fallback: dense, and the dense model's tokens
    d.put_state()  # replicas converged on the monitor's generation
    after = [(p, d.complete(p)) for p in list(dense_tokens)[:8]]
    equal = [r is not None and r["shadowgate"]["fallback"] == st["fallback"] and r["shadowgate"]["arm"] == "dense"
             and r["choices"][0]["text"] == dense_tokens[p] for p, r in after]
    return {"fell_back": bool(fell_back), "fallback": st["fallback"], "updated_by": st["updated_by"],
            "requests_until_fallback": sent, "samples_until_fallback": window.get("count"),
            "window_kl_mean": window.get("kl_mean"), "window_top1": window.get("top1"),
            "seconds": round(time.time() - t0, 2), "generation": st["generation"] - state["generation"],
            "after_dense_equal": sum(equal), "after_checked": len(equal)}


def drift_scenario(d: Driver, version: str, known: list[str], shifted: list[str]) -> dict:
    """In-distribution traffic, then the switch; requests from the switch to the drift alert."""
    before = {a["id"] for a in d.alerts("drift")}
    false_alarm_at = None
    for i, p in enumerate(known):
        d.complete(p)
        if false_alarm_at is None and i % 10 == 9 and {a["id"] for a in d.alerts("drift")} - before:
            false_alarm_at = i + 1
    # the monitor checks asynchronously: let it catch up on the in-distribution rows
    time.sleep(3)
    if false_alarm_at is None and {a["id"] for a in d.alerts("drift")} - before:
        false_alarm_at = len(known)
    seen = {a["id"] for a in d.alerts("drift")}
    detected_at, alert = None, None
    t_switch = time.time()
    def fresh():
        return [a for a in d.alerts("drift") if a["id"] not in seen and a["predictor_version"] == version]

    for i, p in enumerate(shifted):
        d.complete(p)
        if new := fresh():
            detected_at, alert = i + 1, new[-1]
            break
    if alert is None and (new := wait_until(fresh, 10)):  # a check still running on the last rows
        detected_at, alert = len(shifted), new[-1]
    return {"in_distribution_requests": len(known), "false_alarm_after": false_alarm_at,
            "drift_alert_after_requests": detected_at, "seconds_to_alert": round(time.time() - t_switch, 2)
            if detected_at else None, "drifted_columns": sorted(alert["evidence"]["drifted"]) if alert else [],
            "share": alert["evidence"]["share"] if alert else None,
            "mlflow_run": alert["evidence"].get("run_url") if alert else None}


def restart_scenario(d: Driver, prompts: list[str], redis_client, prefix: str) -> dict:
    """SIGKILL the active monitor (a Ray Serve replica) while shadow samples stream in; then
    every sample written meanwhile must be in a fidelity window exactly once (by sample id).
    The windows must be longer than the samples sent (no trimming)."""
    stream = Keys(prefix).shadow_samples
    last = redis_client.xrevrange(stream, count=1)
    start = "(" + last[0][0].decode() if last else "-"
    old_pid = d.monitor()["status"]["pid"]
    for i, p in enumerate(prompts):
        d.complete(p)
        if i == len(prompts) // 3:
            os.kill(old_pid, signal.SIGKILL)
    t_kill = time.time()
    new = wait_until(lambda: (lambda s: s if s and s["pid"] != old_pid and s["active"] else None)(
        d.monitor()["status"]), 120)
    # shadow runs finish after their responses: wait until the stream stops growing
    wait_until(lambda: (lambda n: time.sleep(2) or redis_client.xlen(stream) == n)(redis_client.xlen(stream)), 60)
    written = [e[0].decode() for e in redis_client.xrange(stream, min=start)]

    def caught_up():
        lag = (d.monitor()["summary"] or {}).get("streams", {}).get("samples", {})
        return lag.get("pending") == 0 and lag.get("lag") == 0

    wait_until(caught_up, 60)
    counted: dict[str, int] = {}
    for key in redis_client.scan_iter(Keys(prefix).monitor_windows):
        for x in redis_client.lrange(key, 0, -1):
            sid = json.loads(x)["sample_id"]
            counted[sid] = counted.get(sid, 0) + 1
    return {"killed_pid": old_pid, "new_pid": new["pid"] if new else None,
            "seconds_to_new_monitor": round(time.time() - t_kill, 1) if new else None,
            "samples_written": len(written), "lost": sum(1 for i in written if i not in counted),
            "double_counted": sum(1 for i in written if counted.get(i, 0) > 1)}


def mlflow_down_scenario(d: Driver, stack, prompts: list[str]) -> dict:
    """Stop the MLflow server: requests keep being answered, a fallback still applies."""
    stack.stop("mlflow")
    ok_before = d.failed
    for p in prompts:
        d.complete(p)
    state = d.put_state(fallback="dense")
    dense = [d.complete(p) for p in prompts[:4]]
    refused = d.admin.put("/admin/state", json={"champion": "999"}).status_code
    d.put_state(fallback="none")
    return {"requests": len(prompts) + 4, "failed": d.failed - ok_before,
            "fallback_applied": all(r is not None and r["shadowgate"]["arm"] == "dense" for r in dense),
            "fallback_generation": state["generation"], "put_unknown_version_status": refused}


def dense_texts(d: Driver, prompts: list[str]) -> dict[str, str]:
    """What the dense model answers (sparsity 0 through the service: the dense path)."""
    return {p: d.complete(p, sparsity=0.0)["choices"][0]["text"] for p in prompts}


def run(work: Path, quick: bool = False, progress=print) -> dict:
    """The whole bench on a private stack; returns the JSON report."""
    import redis

    from adapter.config import RuntimeConfig
    from adapter.runtime.loading import load
    from serving.ops.stack import private_stack

    shutil.rmtree(work, ignore_errors=True)  # each run starts from nothing
    work.mkdir(parents=True)
    known_fams, shifted_fams = ["mod_add", "successor", "lexicon"], ["table_lookup", "kv_recall", "reverse"]
    receiver = Receiver()
    loaded = load("default", RuntimeConfig(threads=1))
    progress("training a champion on " + ", ".join(known_fams))
    t0 = time.time()
    narrow = narrow_predictor(loaded, known_fams, work / "narrow", per_family=60 if quick else 150)
    train_s = time.time() - t0
    report: dict = {"settings": {"quick": quick, "known": known_fams, "shifted": shifted_fams},
                    "narrow_train_s": round(train_s, 1), "results": {}}
    n_in, n_shift = (200, 200) if quick else (1000, 400)
    windows = [(50, 25), (100, 50), (200, 100)] if not quick else [(100, 50)]
    for exclude in ([], ["prompt_len"]):
        for window, every in windows:
            label = f"window{window}" + ("-no-prompt-len" if exclude else "")
            progress(f"drift: {label}")
            overrides = {"serve": {"defaults": {"shadow_rate": 0.0}, "replica_cpus": 0.1},
                         "monitor": {"drift": {"window": window, "every_requests": every, "min_rows": 20,
                                               "exclude_columns": exclude, "interval_s": 3600}},
                         "runtime": {"threads": 1}}
            with private_stack(work / label, **overrides) as stack:
                version = stack.registry().register(narrow, tags={"source": "bench-narrow"})
                with stack.client() as c, stack.client(admin=True) as a:
                    d = Driver(c, a)
                    d.put_state(champion=version)
                    known = suite_prompts("test", known_fams, n_in)
                    shifted = suite_prompts("test", shifted_fams, n_shift)
                    res = drift_scenario(d, version, known, shifted)
                    res.update({"window": window, "every_requests": every, "exclude_columns": exclude,
                                "failed_requests": d.failed})
                    report["results"].setdefault("drift", []).append(res)
                    progress(json.dumps(res))
    progress("fallback, restart and MLflow stopped")
    overrides = {"serve": {"defaults": {"shadow_rate": 1.0}, "shadow_max_inflight": 2, "replica_cpus": 0.1},
                 "monitor": {"slo": {"min_samples": 10, "window": 200}, "lease_ttl_s": 4, "claim_idle_s": 4},
                 "alerts": {"webhooks": [{"url": receiver.url, "secret": "bench-secret"}], "backoff_s": 0.2},
                 "runtime": {"threads": 1}}
    with private_stack(work / "fallback", **overrides) as stack:
        from monitor.alerts import verify

        registry = stack.registry()
        broken = reversed_predictor(registry.download(stack.champion), work / "reversed")
        bad = registry.register(broken, tags={"source": "bench-reversed"})
        with stack.client() as c, stack.client(admin=True) as a:
            d = Driver(c, a)
            prompts = suite_prompts("test", None, 60)
            dense = dense_texts(d, prompts[:8])
            res = fallback_scenario(d, bad, prompts, dense)
            hook = wait_until(lambda: [r for r in receiver.requests if json.loads(r["body"])["kind"] == "fallback"], 30)
            res["webhook_delivered"] = bool(hook)
            if hook:
                h = hook[0]["headers"]
                res["webhook_signature_valid"] = verify("bench-secret", h["x-shadowgate-timestamp"], hook[0]["body"],
                                                        h["x-shadowgate-signature"])
            report["results"]["fallback"] = res
            progress(json.dumps(res))
            d.put_state(champion=stack.champion, fallback="none")
            wait_until(lambda: d.alerts("recovered"), 30)  # the monitor saw the end: windows afresh
            r = redis.Redis.from_url(stack.settings.redis.url)
            res = restart_scenario(d, suite_prompts("test", None, 45, offset=60), r, stack.settings.redis.prefix)
            report["results"]["restart"] = res
            progress(json.dumps(res))
            res = mlflow_down_scenario(d, stack, suite_prompts("test", None, 20, offset=120))
            report["results"]["mlflow_down"] = res
            progress(json.dumps(res))
    receiver.close()
    return report
