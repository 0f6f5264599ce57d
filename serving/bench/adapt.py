"""`shadowgate scenario adapt`: the whole adaptation loop against a running service.

1. A champion trained on three of the suite's families (mod_add, successor, lexicon) is
   installed (alias + control state, as an operator does on a fresh registry) and serves them.
2. The traffic switches to two others (table_lookup, kv_recall): the drift alert comes and
   the fidelity drops. The controller runs the fine-tune early on the new shadow samples;
   each candidate is approved as it is registered (the alias `approved`, the one the MLflow
   UI sets), canaried and promoted or rolled back; the controller fine-tunes again while the
   episode's target is not met, until a promoted candidate meets it or the phase's time
   budget ends.
3. A second switch, to the last family (reverse): adapted again the same way, with no
   forgetting of phases 1 and 2.
4. A bad candidate (reversed scores) is approved and rolled back automatically.

Client traffic comes from the suite's traffic split, which never repeats a validation or
test prompt; accuracy is measured here, offline, on test prompts (never sent as traffic):
5-shot exact match, `per_family` prompts per family, the served sparsity and mode, for the
narrow champion, each phase's promoted predictor and a predictor trained offline on every
family (the shipped one). Requests ask for the answer like an evaluation client: stop at ";".
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import redis

from adapter.embedded import suite as tasks
from adapter.evaluation import scoring as evaluate
from adapter.pipeline import traces
from adapter.selection import artifact
from jobs.registry import registry_for
from jobs.rollout import arm_stats
from jobs.rollout_store import RolloutStore
from monitor.keys import Keys
from serving.bench.harness import Driver, suite_prompts
from serving.bench.monitor import narrow_predictor, reversed_predictor

KNOWN = ["mod_add", "successor", "lexicon"]
PHASES = [("phase2", ["table_lookup", "kv_recall"]), ("phase3", ["reverse"])]
SHIFTED = [f for _, fams in PHASES for f in fams]
TRAFFIC_SPLIT = "traffic"
STOP = [";"]


class Timeline:
    def __init__(self, progress):
        self.t0, self.events, self.progress = time.time(), [], progress

    def add(self, event: str, **detail) -> float:
        t = round(time.time() - self.t0, 2)
        self.events.append({"t": t, "event": event, "detail": detail})
        self.progress(f"[{t:7.1f} s] {event} {json.dumps(detail)[:160]}")
        return t


def accuracy(loaded, folder: Path, families: list[str], per_family: int, sparsity: float, mode: str) -> float:
    pred = artifact.load_predictor(folder, loaded.runtime.shape, traces.model_fingerprint(loaded.runtime.model))
    instances = [i for i in tasks.split("test", per_family) if i.family in families]
    method = pred.method(sparsity, mode, loaded.runtime.shape)
    return evaluate.accuracy(evaluate.runtime_score_fn(loaded.runtime, method), loaded.tokenizer, instances)["mean"]


class Scenario:
    def __init__(self, d: Driver, settings, work: Path, progress, max_requests: int, phase_budget_s: float):
        self.d, self.s, self.work = d, settings, work
        self.tl = Timeline(progress)
        self.r = redis.Redis.from_url(settings.redis.url)
        self.p = settings.redis.prefix
        self.registry = registry_for(settings, cache_dir=work / "cache")
        self.rollout = RolloutStore(self.r, self.p)
        self.max_requests, self.phase_budget_s = max_requests, phase_budget_s
        self.i = 0

    def send(self, prompts: list[str], n: int = 1) -> None:
        for _ in range(n):
            self.d.complete(prompts[self.i % len(prompts)], stop=STOP)
            self.i += 1

    def decision(self, kinds: tuple[str, ...], after: float, version: str | None = None) -> dict | None:
        return next((x for x in self.rollout.recent(50) if x["decision"] in kinds and x["ts"] >= after
                     and (version is None or x["version"] == version)), None)

    def traffic_until(self, prompts, cond, limit: int, deadline: float | None = None):
        start = self.d.requests
        while self.d.requests - start < limit and (deadline is None or time.time() < deadline):
            self.send(prompts, 2)
            got = cond()
            if got:
                return got, self.d.requests - start
        return None, self.d.requests - start

    def generation(self) -> int:
        return self.d.admin.get("/admin/state").json()["state"]["generation"]

    def adapt(self, name: str, families: list[str], champion: str) -> dict:
        """One switch of the traffic to `families`, adapted: drift, early fine-tunes, each
        candidate approved, canaried and promoted or rolled back, until a promoted one met
        the target or the budget ends. Returns the phase's figures."""
        prompts = suite_prompts(TRAFFIC_SPLIT, families, 600)
        t_switch = time.time()
        gen_switch = self.generation()
        self.tl.add("switch", phase=name, families=families, champion=champion)

        def drift_alert():
            return next((a for a in self.d.alerts("drift") if a["ts"] >= t_switch
                         and a["predictor_version"] == champion), None)

        alert, n_alert = self.traffic_until(prompts, drift_alert, self.max_requests)
        self.tl.add("drift_alert", phase=name, after_requests=n_alert,
                    columns=sorted((alert or {}).get("evidence", {}).get("drifted", {})) if alert else None)
        before = arm_stats(self.r, self.p, champion, "champion", gen_switch)
        self.tl.add("fidelity_drop", phase=name, kl_mean=before["kl_mean"], top1=before["top1"],
                    samples=before["count"])
        deadline = t_switch + self.phase_budget_s
        candidates, promoted, met, first_promotion = [], [], False, None
        seen = t_switch
        while not met and time.time() < deadline:
            cand, _ = self.traffic_until(prompts, lambda: self.decision(("candidate",), seen), 10 ** 9, deadline)
            if cand is None:
                break
            seen = cand["ts"] + 1e-6
            v = cand["version"]
            ev = cand["evidence"]
            candidates.append({"version": v, **{k: ev.get(k) for k in ("samples", "distinct_prompts", "gain",
                                                                      "forget", "target_met", "target_kl",
                                                                      "candidate_holdout_kl", "champion_holdout_kl",
                                                                      "episode", "episode_samples",
                                                                      "skipped_before_drift", "train_s")},
                               "refit_kept": (ev.get("refit") or {}).get("kept")})
            self.tl.add("candidate_registered", phase=name, version=v,
                        **{k: ev.get(k) for k in ("samples", "gain", "forget", "target_met", "train_s")})
            t_approve = time.time()
            self.registry.set_alias("approved", v)
            self.tl.add("approved", phase=name, version=v)
            done, _ = self.traffic_until(prompts, lambda: self.decision(("promoted", "rolled_back", "refused"),
                                                                        t_approve, v), self.max_requests)
            ok = done is not None and done["decision"] == "promoted"
            self.tl.add("promoted" if ok else "candidate_rolled_back", phase=name, version=v,
                        evidence={k: (done or {}).get("evidence", {}).get(k)
                                  for k in ("reason", "against", "top1_difference", "challenger_top1")})
            if ok:
                promoted.append(v)
                first_promotion = first_promotion or time.time() - t_switch
                met = bool(ev.get("target_met"))
        final = promoted[-1] if promoted else champion
        gen_after = self.generation()
        self.send(prompts, 60)
        time.sleep(3)
        after = arm_stats(self.r, self.p, final, "champion", gen_after)
        self.tl.add("fidelity_after", phase=name, version=final, kl_mean=after["kl_mean"], top1=after["top1"],
                    samples=after["count"])
        return {"phase": name, "families": families, "champion_before": champion, "promoted": promoted,
                "final_version": final, "target_met": met, "candidates": candidates,
                "drift_alert_after_requests": n_alert if alert else None,
                "fidelity_before": before, "fidelity_after": after,
                "seconds": {"switch_to_first_promotion": first_promotion,
                            "phase": round(time.time() - t_switch, 1)}}


def run(d: Driver, settings, work: Path, progress=print, per_family: int = 100, max_requests: int = 3000,
        phase_budget_s: float = 900) -> dict:
    from adapter.runtime.loading import load
    from jobs.bootstrap import shipped_predictor

    work.mkdir(parents=True, exist_ok=True)
    sc = Scenario(d, settings, work, progress, max_requests, phase_budget_s)
    tl, r, p, registry = sc.tl, sc.r, sc.p, sc.registry
    loaded = load(settings.model.name, settings.runtime.model_copy(update={"dtype": "float32"}))

    # 1. the narrow champion serves the families it knows
    narrow = narrow_predictor(loaded, KNOWN, work / "narrow")
    v_narrow = registry.register(narrow, tags={"source": "scenario-narrow", "families": ",".join(KNOWN)})
    registry.set_alias("champion", v_narrow)
    state = d.put_state(champion=v_narrow, challenger="none", canary_share=0.0, fallback="none")
    sparsity = state["sparsity"]
    tl.add("narrow_champion", version=v_narrow, families=KNOWN, sparsity=sparsity)
    gen_known = state["generation"]
    sc.send(suite_prompts(TRAFFIC_SPLIT, KNOWN, 400), 80)
    time.sleep(3)
    known = arm_stats(r, p, v_narrow, "champion", gen_known)
    tl.add("known_traffic", requests=80, kl_mean=known["kl_mean"], top1=known["top1"], samples=known["count"])

    # 2., 3. two switches, each adapted
    phases, champion = [], v_narrow
    for name, families in PHASES:
        ph = sc.adapt(name, families, champion)
        phases.append(ph)
        champion = ph["final_version"]

    # 4. a bad candidate is rolled back automatically
    v_bad = None
    rb = None
    if champion != v_narrow:
        bad_folder = reversed_predictor(registry.download(champion), work / "reversed")
        v_bad = registry.register(bad_folder, tags={"source": "scenario-reversed"})
        t_bad = time.time()
        registry.set_alias("approved", v_bad)
        tl.add("bad_approved", version=v_bad)
        rb, _ = sc.traffic_until(suite_prompts(TRAFFIC_SPLIT, SHIFTED, 600),
                                 lambda: sc.decision(("rolled_back",), t_bad, v_bad), max_requests)
        tl.add("bad_rolled_back" if rb else "bad_not_rolled_back", version=v_bad,
               reason=(rb or {}).get("evidence", {}).get("reason"))

    # offline accuracy on the embedded model, on test prompts never sent as traffic
    mode = settings.runtime.mode
    full = shipped_predictor(settings.model.name, loaded.runtime)

    def acc(folder, families):
        return accuracy(loaded, folder, families, per_family, sparsity, mode)

    folders = {v: registry.download(v) for v in {ph["final_version"] for ph in phases}}
    seen_families = list(KNOWN)
    for ph in phases:
        f = folders[ph["final_version"]]
        ph["accuracy"] = {"new_before": acc(registry.download(ph["champion_before"]), ph["families"]),
                          "new_after": acc(f, ph["families"]),
                          "offline_all_families": acc(full, ph["families"]) if full else None,
                          "earlier_after": {fam: acc(f, [fam]) for fam in seen_families}}
        seen_families += ph["families"]
    final = folders[phases[-1]["final_version"]]
    p2 = phases[0]
    acc_report = {"shifted_before": p2["accuracy"]["new_before"],
                  "shifted_after": p2["accuracy"]["new_after"],
                  "offline_all_families": p2["accuracy"]["offline_all_families"],
                  "known_before": acc(narrow, KNOWN), "known_after": acc(final, KNOWN),
                  "new_families_final": acc(final, SHIFTED),
                  "new_families_offline": acc(full, SHIFTED) if full else None,
                  "phase2_families_after_phase2": p2["accuracy"]["new_after"],
                  "phase2_families_final": acc(final, p2["families"])}
    tl.add("accuracy", **acc_report)
    after2 = p2["fidelity_after"]
    last_kl = [ph["fidelity_after"]["kl_mean"] for ph in phases]
    times = [ph["seconds"]["switch_to_first_promotion"] for ph in phases]
    goals = {"new_accuracy_95pct_of_offline": (acc_report["new_families_offline"] is not None and
                                               acc_report["new_families_final"]
                                               >= 0.95 * acc_report["new_families_offline"]),
             "new_kl_within_1_1x_known": all(k is not None and k <= 1.10 * known["kl_mean"] for k in last_kl),
             "known_accuracy_within_2_points": acc_report["known_after"] >= acc_report["known_before"] - 0.02,
             "phase2_not_forgotten_within_2_points": (acc_report["phase2_families_final"]
                                                     >= acc_report["phase2_families_after_phase2"] - 0.02),
             "switch_to_promotion_within_5_min": all(t is not None and t <= 300 for t in times),
             "no_failed_requests": d.failed == 0}
    return {"failed_requests": d.failed, "requests": d.requests,
            "traffic_split": TRAFFIC_SPLIT, "accuracy_split": "test",
            "traffic_disjoint_from_accuracy_prompts": True,
            "drift_alert_after_requests": p2["drift_alert_after_requests"],
            "promoted_version": p2["promoted"][-1] if p2["promoted"] else None,
            "rolled_back_version": v_bad if rb else None, "narrow_version": v_narrow,
            "final_version": phases[-1]["final_version"],
            "fidelity": {"known_kl": known["kl_mean"], "shifted_kl_before": p2["fidelity_before"]["kl_mean"],
                         "shifted_kl_after": after2["kl_mean"], "known_top1": known["top1"],
                         "shifted_top1_before": p2["fidelity_before"]["top1"], "shifted_top1_after": after2["top1"],
                         "phase3_kl_after": phases[-1]["fidelity_after"]["kl_mean"]},
            "accuracy": acc_report, "goals": goals, "phases": phases,
            "seconds": {"switch_to_promotion": {ph["phase"]: ph["seconds"]["switch_to_first_promotion"]
                                                for ph in phases}},
            "timeline": tl.events, "samples": shadow_points(r, p, tl.t0)}


def shadow_points(client: redis.Redis, prefix: str, since: float) -> list[dict]:
    """(t, kl_mean, version, arm) of every shadow sample since `since`, from the stream ids."""
    out = []
    for eid, fields in client.xrange(Keys(prefix).shadow_samples, min=f"{int(since * 1000)}-0", max="+"):
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
