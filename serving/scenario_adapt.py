"""`shadowgate scenario adapt`: the whole adaptation loop against a running service.

1. A champion trained on three of the suite's families (mod_add, successor, lexicon) is
   installed (alias + control state, as an operator does on a fresh registry) and serves them.
2. The traffic switches to the other three (table_lookup, kv_recall, reverse): the drift
   alert comes and the fidelity drops.
3. The controller runs the fine-tune job early on the new shadow samples; a candidate is
   registered.
4. It is approved (the alias `approved`, the one the MLflow UI sets), canaried and promoted.
5. A bad candidate (reversed scores) is approved and rolled back automatically.

Fidelity is the monitor's (mean KL of the shadow samples served in each phase); accuracy is
measured here, offline, on the embedded model (5-shot exact match, `per_family` test prompts
per family, the served sparsity, per-layer) for the narrow champion, the promoted candidate
and a predictor trained offline on every family (the shipped one).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import redis

from adapter.evaluation import scoring as evaluate

from adapter.embedded import suite as tasks

from adapter.pipeline import train as training

from adapter.pipeline import traces
from jobs.registry import PredictorRegistry
from jobs.rollout import RolloutStore, arm_stats
from serving.bench_monitor import Driver, narrow_predictor, reversed_predictor, suite_prompts

KNOWN = ["mod_add", "successor", "lexicon"]
SHIFTED = ["table_lookup", "kv_recall", "reverse"]


class Timeline:
    def __init__(self, progress):
        self.t0, self.events, self.progress = time.time(), [], progress

    def add(self, event: str, **detail) -> float:
        t = round(time.time() - self.t0, 2)
        self.events.append({"t": t, "event": event, "detail": detail})
        self.progress(f"[{t:7.1f} s] {event} {json.dumps(detail)[:160]}")
        return t


def accuracy(loaded, folder: Path, families: list[str], per_family: int, sparsity: float, mode: str) -> float:
    pred = training.load_predictor(folder, loaded.runtime.shape, traces.model_fingerprint(loaded.runtime.model))
    instances = [i for i in tasks.split("test", per_family) if i.family in families]
    method = pred.method(sparsity, mode, loaded.runtime.shape)
    return evaluate.accuracy(evaluate.runtime_score_fn(loaded.runtime, method), loaded.tokenizer, instances)["mean"]


def run(d: Driver, settings, work: Path, progress=print, per_family: int = 100, max_requests: int = 3000) -> dict:
    from adapter.runtime.loading import load
    from jobs.bootstrap import shipped_predictor

    work.mkdir(parents=True, exist_ok=True)
    tl = Timeline(progress)
    r = redis.Redis.from_url(settings.redis.url)
    p = settings.redis.prefix
    registry = PredictorRegistry(settings.mlflow.tracking_uri, settings.mlflow.registered_model, work / "cache")
    rollout = RolloutStore(r, p)
    loaded = load(settings.model.name, settings.runtime.model_copy(update={"dtype": "float32"}))
    known_prompts = suite_prompts("test", KNOWN, 400)
    shifted_prompts = suite_prompts("test", SHIFTED, 600)
    counter = {"i": 0}

    def send(prompts: list[str], n: int = 1) -> None:
        for _ in range(n):
            d.complete(prompts[counter["i"] % len(prompts)])
            counter["i"] += 1

    def decision(kind: str, after: float, version: str | None = None) -> dict | None:
        return next((x for x in rollout.recent(50) if x["decision"] == kind and x["ts"] >= after
                     and (version is None or x["version"] == version)), None)

    def traffic_until(prompts, cond, limit: int):
        start = d.requests
        while d.requests - start < limit:
            send(prompts, 2)
            got = cond()
            if got:
                return got, d.requests - start
        return None, d.requests - start

    # 1. the narrow champion serves the families it knows
    narrow = narrow_predictor(loaded, KNOWN, work / "narrow")
    v_narrow = registry.register(narrow, tags={"source": "scenario-narrow", "families": ",".join(KNOWN)})
    registry.set_alias("champion", v_narrow)
    state = d.put_state(champion=v_narrow, challenger="none", canary_share=0.0, fallback="none")
    sparsity = state["sparsity"]
    tl.add("narrow_champion", version=v_narrow, families=KNOWN, sparsity=sparsity)
    gen_known = state["generation"]
    send(known_prompts, 80)
    time.sleep(3)
    known = arm_stats(r, p, v_narrow, "champion", gen_known)
    tl.add("known_traffic", requests=80, kl_mean=known["kl_mean"], top1=known["top1"], samples=known["count"])

    # 2. the traffic switches
    t_switch = time.time()
    gen_switch = d.admin.get("/admin/state").json()["state"]["generation"]
    tl.add("switch", families=SHIFTED)

    def drift_alert():
        return next((a for a in d.alerts("drift") if a["ts"] >= t_switch and a["predictor_version"] == v_narrow), None)

    alert, n_alert = traffic_until(shifted_prompts, drift_alert, max_requests)
    tl.add("drift_alert", after_requests=n_alert, columns=sorted((alert or {}).get("evidence", {}).get("drifted", {}))
           if alert else None)
    shifted_before = arm_stats(r, p, v_narrow, "champion", gen_switch)
    tl.add("fidelity_drop", kl_mean=shifted_before["kl_mean"], top1=shifted_before["top1"],
           samples=shifted_before["count"])

    # 3. the fine-tune job (run early by the controller after the drift alert)
    cand, n_cand = traffic_until(shifted_prompts, lambda: decision("candidate", t_switch), max_requests)
    if cand is None:
        nr = decision("not_registered", t_switch)
        tl.add("no_candidate", reasons=(nr or {}).get("evidence", {}).get("reasons"))
        return {"failed_requests": d.failed, "requests": d.requests, "timeline": tl.events, "error": "no candidate"}
    v_cand = cand["version"]
    tl.add("candidate_registered", version=v_cand, after_requests=n_cand,
           **{k: cand["evidence"].get(k) for k in ("samples", "gain", "forget", "train_s", "run_id")})

    # 4. approved (the alias the MLflow UI sets), canaried, promoted
    t_approve = time.time()
    registry.set_alias("approved", v_cand)
    tl.add("approved", version=v_cand)
    done, _ = traffic_until(shifted_prompts, lambda: decision("promoted", t_approve, v_cand)
                            or decision("rolled_back", t_approve, v_cand), max_requests)
    promoted = done is not None and done["decision"] == "promoted"
    tl.add("promoted" if promoted else "candidate_rolled_back", version=v_cand,
           evidence=(done or {}).get("evidence"))
    gen_after = d.admin.get("/admin/state").json()["state"]["generation"]
    send(shifted_prompts, 60)
    time.sleep(3)
    # the candidate's shifted-traffic fidelity: as champion after a promotion, else its canary arm
    shifted_after = arm_stats(r, p, v_cand, "champion" if promoted else "challenger", gen_after if promoted else 0)
    tl.add("fidelity_after", kl_mean=shifted_after["kl_mean"], top1=shifted_after["top1"],
           samples=shifted_after["count"])

    # 5. a bad candidate is rolled back automatically
    bad_folder = reversed_predictor(registry.download(v_cand), work / "reversed")
    v_bad = registry.register(bad_folder, tags={"source": "scenario-reversed"})
    t_bad = time.time()
    registry.set_alias("approved", v_bad)
    tl.add("bad_approved", version=v_bad)
    rb, _ = traffic_until(shifted_prompts, lambda: decision("rolled_back", t_bad, v_bad), max_requests)
    tl.add("bad_rolled_back" if rb else "bad_not_rolled_back", version=v_bad,
           reason=(rb or {}).get("evidence", {}).get("reason"))

    # offline accuracy on the embedded model
    mode = settings.runtime.mode
    cand_folder = registry.download(v_cand)
    full = shipped_predictor(settings.model.name, loaded.runtime)
    acc = {"shifted_before": accuracy(loaded, narrow, SHIFTED, per_family, sparsity, mode),
           "shifted_after": accuracy(loaded, cand_folder, SHIFTED, per_family, sparsity, mode),
           "offline_all_families": accuracy(loaded, full, SHIFTED, per_family, sparsity, mode) if full else None,
           "known_before": accuracy(loaded, narrow, KNOWN, per_family, sparsity, mode),
           "known_after": accuracy(loaded, cand_folder, KNOWN, per_family, sparsity, mode)}
    tl.add("accuracy", **acc)
    times = {e["event"]: e["t"] for e in tl.events}
    t_sw = times["switch"]
    goals = {"shifted_kl_within_10pct_of_known": (shifted_after["kl_mean"] is not None and
                                                  shifted_after["kl_mean"] <= 1.10 * known["kl_mean"]),
             "shifted_accuracy_95pct_of_offline": (acc["offline_all_families"] is not None and
                                                    acc["shifted_after"] >= 0.95 * acc["offline_all_families"]),
             "known_accuracy_within_2_points": acc["known_after"] >= acc["known_before"] - 0.02,
             "no_failed_requests": d.failed == 0}
    return {"failed_requests": d.failed, "requests": d.requests, "drift_alert_after_requests": n_alert if alert else None,
            "promoted_version": v_cand if promoted else None, "rolled_back_version": v_bad if rb else None,
            "narrow_version": v_narrow,
            "fidelity": {"known_kl": known["kl_mean"], "shifted_kl_before": shifted_before["kl_mean"],
                         "shifted_kl_after": shifted_after["kl_mean"], "known_top1": known["top1"],
                         "shifted_top1_before": shifted_before["top1"], "shifted_top1_after": shifted_after["top1"]},
            "accuracy": acc, "goals": goals,
            "seconds": {"switch_to_alert": times.get("drift_alert", t_sw) - t_sw,
                        "switch_to_candidate": times.get("candidate_registered", t_sw) - t_sw,
                        "switch_to_promotion": (times["promoted"] - t_sw) if "promoted" in times else None},
            "timeline": tl.events, "samples": shadow_points(r, p, tl.t0)}


def shadow_points(client: redis.Redis, prefix: str, since: float) -> list[dict]:
    """(t, kl_mean, version, arm) of every shadow sample since `since`, from the stream ids."""
    out = []
    for eid, fields in client.xrange(f"{prefix}:shadow:samples", min=f"{int(since * 1000)}-0", max="+"):
        eid = eid.decode() if isinstance(eid, bytes) else eid
        meta = json.loads(fields[b"meta"])
        fid = json.loads(fields[b"fidelity"])
        out.append({"t": round(int(eid.split("-")[0]) / 1000 - since, 2), "kl_mean": fid["kl_mean"],
                    "version": meta.get("predictor_version"), "arm": meta.get("arm")})
    return out


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.2))
    pts = report.get("samples") or []
    for v in sorted({x["version"] for x in pts}, key=lambda s: int(s or 0)):
        sel = [x for x in pts if x["version"] == v]
        ax.scatter([x["t"] for x in sel], [x["kl_mean"] for x in sel], s=9,
                   label=f"predictor {v}" if v else "dense (fallback): KL 0")
    ax.set_yscale("symlog", linthresh=0.05)
    ax.set_ylim(bottom=0)
    marks = {"switch": "traffic switches", "drift_alert": "drift alert", "candidate_registered": "candidate",
             "approved": "approved", "promoted": "promoted", "bad_approved": "bad approved",
             "bad_rolled_back": "rolled back"}
    for e in report["timeline"]:
        if e["event"] in marks:
            ax.axvline(e["t"], color="grey", lw=0.8, ls="--")
            ax.text(e["t"], ax.get_ylim()[1] * 0.95, marks[e["event"]], rotation=90, va="top", fontsize=8)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("shadow sample mean KL (dense || served)")
    ax.set_title("shadowgate scenario adapt: drift, fine-tune, canary, promotion, rollback")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
