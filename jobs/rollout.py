"""The rollout controller: approval -> canary -> promotion or automatic rollback.

It is the only writer of the registry alias `champion` and of the control state's
champion/challenger/canary share (the monitor only pulls the fallback lever). One tick
(`main(settings)`, the `rollout` job, every `jobs.rollout_every_s`):

1. reconcile, at the controller's start (first tick of the process): the alias `champion`
   and the control state's champion must agree; when they do not, the alias wins (it is the
   registry's contract), the state is corrected and an alert says so;
2. commands from operators (`shadowgate rollback`), queued at P:rollout:commands;
3. approval: a version that holds the alias `approved` or the tag `approval=approved` (set by
   a person in the MLflow UI; learnt from the registry webhook, P:rollout:events, and by
   polling, since deliveries are best effort), that is neither the champion nor decided
   already, becomes the challenger with `canary.share` of the traffic, once its artifact is
   verified: it must load as a predictor (valid safetensors and config) built for the served
   model (shape and fingerprint of the champion's, which the replicas checked against the
   model). A version that does not is refused (tag `refused`, alias `approved` removed, a
   `rollback` alert); the champion serves on, untouched;
4. the canary: the monitor's fidelity windows of both arms, counting only samples served
   since the canary began. A challenger that breaks the SLO is rolled back at once; after
   `canary.min_samples` per arm it is promoted once a confidence bound on its top-1
   agreement clears the champion's minus `canary.margin` (under a fallback: the dense
   outputs, against the SLO), rolled back once the bound shows it worse, and rolled back
   when still undecided at `canary.timeout_s` (see Controller.judge);
5. drift: while the champion's latest drift check says drift, the shadow rate is raised to
   `adapt.drift_shadow_rate` and the fine-tune job is run early once `adapt.min_samples` new
   samples exist, again (at most every `adapt.early_retry_s`) while no candidate of the
   episode met the fine-tune's absolute target; the rate returns to its value after. An
   episode lasts while the champion drifts, and after that while the last promotion of the
   episode did not meet the target (a promoted candidate that learnt only part of the new
   traffic is fine-tuned further on it).

Its record in Redis is the RolloutStore (jobs/rollout_store.py).
"""

from __future__ import annotations

import json
import logging
import time

import redis

from jobs.approval import ensure_webhook
from jobs.registry import BadArtifact, CHAMPION, PredictorRegistry, job_registry
from jobs.rollout_store import ACTOR, DECISIONS_LEN, RolloutStore
from jobs.shadow_reader import available, sample_reader
from monitor.alerts import AlertStore
from monitor.keys import Keys
from monitor.redis_client import redis_client
from monitor.service import bound, slo_breach, window_stats, z_of
from monitor.state import ControlStore, ControlUpdate

log = logging.getLogger(__name__)
APPROVED = "approved"
_webhook: str | None = None  # the registry webhook's id once set up in this process ("" : none)
_reconciled = False  # alias and state reconciled once per process, at the controller's start


def arm_rows(client: redis.Redis, prefix: str, version: str, arm: str, since_generation: int) -> list[dict]:
    rows = [json.loads(x) for x in client.lrange(Keys(prefix).monitor_window(version, arm), 0, -1)]
    return [x for x in rows if (x.get("generation") or 0) >= since_generation]


def arm_stats(client: redis.Redis, prefix: str, version: str, arm: str, since_generation: int) -> dict:
    return window_stats(arm_rows(client, prefix, version, arm, since_generation))


class Controller:
    def __init__(self, settings, client: redis.Redis | None = None, registry: PredictorRegistry | None = None,
                 run_soon=None):
        self.s = settings
        self.r = client or redis_client(settings.redis)
        self.p, self.keys = settings.redis.prefix, Keys(settings.redis.prefix)
        self.registry = registry or job_registry(settings)
        self.control = ControlStore(self.r, self.p)
        self.store = RolloutStore(self.r, self.p)
        self.alerts = AlertStore(self.r, self.p, settings.alerts)
        self.run_soon = run_soon  # callable(job name): run a job early (the scheduler's)

    # ---- one tick -------------------------------------------------------------------------
    def tick(self) -> dict:
        global _webhook
        if _webhook is None:
            _webhook = ensure_webhook(self.s, self.registry, self.r) or ""
        global _reconciled
        out: list[dict] = []
        aliases = self.registry.aliases()
        if not _reconciled:  # at the controller's start; later state writes are the operator's
            out += self.reconcile(aliases)
            _reconciled = True
        events = self.store.pop_events()
        for cmd in self.store.pop_commands():
            out += self.run_command(cmd)
        st = self.store.state()
        if not st.get("canary"):
            approved = self.approved(aliases, events)
            if approved:
                served = self.control.get()
                problem = self.verify(approved, (served.champion if served else None) or aliases.get(CHAMPION))
                out.append(self.refuse(approved, problem) if problem else self.start_canary(approved))
        else:
            out += self.judge()
        out += self.drift()
        return {"decisions": out, "phase": "canary" if self.store.state().get("canary") else "idle"}

    def reconcile(self, aliases: dict) -> list[dict]:
        state = self.control.get()
        alias = aliases.get(CHAMPION)
        if state is None or alias is None or state.champion in (None, alias):
            return []
        self.control.update(ControlUpdate(champion=alias), by=ACTOR)
        msg = (f"the control state served predictor {state.champion} but the registry alias "
               f"'champion' names {alias}: the state now follows the alias")
        self.alerts.raise_alert("reconcile", "warning", msg, predictor_version=alias,
                                evidence={"state_champion": state.champion, "alias_champion": alias},
                                dedup_key=f"reconcile:{state.champion}:{alias}")
        return [self.store.decide("reconciled", alias, {"state_champion": state.champion, "alias": alias})]

    def run_command(self, cmd: dict) -> list[dict]:
        if cmd.get("action") == "rollback":
            canary = self.store.state().get("canary")
            if not canary:
                return [self.store.decide("rollback_refused", None, {"reason": "no canary in progress",
                                                                      "requested_by": cmd.get("by")})]
            return [self.rollback(canary, f"operator: {cmd.get('reason') or 'no reason given'}",
                                  {"requested_by": cmd.get("by")})]
        return []

    def _decided(self, mv) -> bool:
        tags = mv.tags or {}
        return any(k in tags for k in ("rolled_back", "retired", "promoted_at", "refused"))

    def approved(self, aliases: dict, events: list[dict]) -> str | None:
        """The newest approved version that is not the champion and not decided yet."""
        champion = aliases.get(CHAMPION)
        candidates = set()
        if aliases.get(APPROVED):
            candidates.add(aliases[APPROVED])
        for mv in self.registry.versions(tag="approval", value="approved"):
            candidates.add(str(mv.version))
        for ev in events:  # webhook deliveries: polled anyway, they only make it sooner
            data = ev.get("data") or {}
            if data.get("alias") == APPROVED or (data.get("key") == "approval" and data.get("value") == "approved"):
                candidates.add(str(data.get("version")))
        for v in sorted((c for c in candidates if c and c.isdigit() and c != champion), key=int, reverse=True):
            try:
                mv = self.registry.version(v)
            except Exception:  # deleted since
                continue
            if not self._decided(mv):
                return v
        return None

    def verify(self, version: str, champion: str | None) -> str | None:
        """Why `version` cannot be served (None: it loads for the served model). MLflow being
        unreachable is no verdict: it raises, the job fails and the next tick tries again."""
        from adapter.selection.artifact import load_predictor
        from adapter.runtime.model_view import Shape

        if champion is None:
            return None  # nothing served to compare with; the replicas' own load check stands
        ref = json.loads((self.registry.download(champion) / "predictor.json").read_text())
        try:
            folder = self.registry.download(version)
        except BadArtifact as exc:
            return str(exc)
        try:
            load_predictor(folder, Shape(**ref["shape"]), ref["model_fingerprint"])
        except Exception as exc:  # a corrupt file, a wrong shape, another model's predictor
            return f"{type(exc).__name__}: {exc}"[:500]
        return None

    def refuse(self, version: str, problem: str) -> dict:
        """An approved version whose artifact cannot be served: never canaried."""
        self.registry.set_tag(version, "refused", problem[:500])
        if self.registry.aliases().get(APPROVED) == version:
            self.registry.delete_alias(APPROVED)
        msg = f"predictor {version} refused before its canary (the champion serves on): {problem}"
        self.alerts.raise_alert("rollback", "critical", msg, predictor_version=version,
                                evidence={"refused": True, "reason": problem}, dedup_key=f"refused:{version}")
        log.warning(msg)
        return self.store.decide("refused", version, {"reason": problem})

    def start_canary(self, version: str) -> dict:
        cs = self.s.canary
        state = self.control.get()
        change = {"challenger": version, "canary_share": cs.share}
        restore = {"shadow_rate": state.shadow_rate} if state else {}
        if cs.shadow_rate is not None and state is not None and cs.shadow_rate > state.shadow_rate:
            change["shadow_rate"] = cs.shadow_rate
        new = self.control.update(ControlUpdate(**change), by=ACTOR)
        champion = new.champion or self.registry.resolve(CHAMPION)
        st = self.store.state()
        st["canary"] = {"version": version, "champion": champion, "started": time.time(),
                        "generation": new.generation, "restore": restore}
        self.store.save(st)
        self.registry.set_tag(version, "canary_started", f"{time.time():.0f}")
        return self.store.decide("canary_started", version, {"share": cs.share, "champion": champion,
                                                             "generation": new.generation})

    def evidence(self, canary: dict) -> dict:
        g = canary["generation"]
        ch = arm_rows(self.r, self.p, canary["version"], "challenger", g)
        champ = arm_rows(self.r, self.p, canary["champion"], "champion", g)
        z = z_of(self.s.canary.confidence)
        ev = {"challenger": window_stats(ch), "champion": window_stats(champ),
              "elapsed_s": round(time.time() - canary["started"], 1), "confidence": self.s.canary.confidence}
        if ch:
            top1, kl = [x["top1"] for x in ch], [x["kl_mean"] for x in ch]
            ev["challenger_top1"], ev["challenger_kl"] = bound(top1, None, z), bound(kl, None, z)
            if champ:
                ev["top1_difference"] = bound(top1, [x["top1"] for x in champ], z)
        return ev

    def judge(self) -> list[dict]:
        """Decide with a confidence bound (canary.confidence, one-sided) on the challenger's
        per-sample top-1 agreement: against the champion's arm, promoted once the lower bound
        of the difference is at least -canary.margin, rolled back once its upper bound is
        below it. Under a fallback the champion serves dense, and the dense outputs the
        challenger's samples are compared with are the reference: its agreement with them
        must clear the SLO with the bound (lower bound of top-1 >= slo.top1_min, upper bound
        of mean KL <= slo.kl_mean_max). A challenger whose bounds break the SLO (as the
        monitor judges the champion, at canary.confidence) is rolled back at once; still
        undecided at canary.timeout_s is a rollback (no evidence of no harm)."""
        canary = self.store.state()["canary"]
        ev = self.evidence(canary)
        ch, champ = ev["challenger"], ev["champion"]
        slo, cs = self.s.monitor.slo, self.s.canary
        breach = []
        if ch["count"] >= min(slo.min_samples, cs.min_samples):
            breach = slo_breach(ev["challenger_top1"], ev["challenger_kl"], slo, cs.confidence)
        if breach:
            return [self.rollback(canary, "the challenger broke the SLO: " + "; ".join(breach), ev)]
        state = self.control.get()
        fallback = state is not None and state.fallback != "none"
        ev["against"] = "dense" if fallback else "champion"
        timed_out = ev["elapsed_s"] >= cs.timeout_s
        if ch["count"] == 0:
            if timed_out:
                return [self.rollback(canary, f"no challenger samples within canary.timeout_s {cs.timeout_s:.0f} s", ev)]
            return []
        if fallback:
            verdict = self._against_dense(ev, slo, cs)
        else:
            verdict = self._against_champion(ev, cs)
        if verdict == "promote":
            return [self.promote(canary, ev)]
        if isinstance(verdict, str) and verdict.startswith("rollback:"):
            return [self.rollback(canary, verdict[len("rollback: "):], ev)]
        if timed_out:
            return [self.rollback(canary, f"undecided after canary.timeout_s {cs.timeout_s:.0f} s: {verdict}", ev)]
        return []

    @staticmethod
    def _against_champion(ev: dict, cs) -> str:
        ch, champ = ev["challenger"], ev["champion"]
        if min(ch["count"], champ["count"]) < cs.min_samples:
            return f"{ch['count']} challenger and {champ['count']} champion samples, {cs.min_samples} needed"
        d = ev["top1_difference"]
        if d["lower"] >= -cs.margin:
            return "promote"
        if d["upper"] < -cs.margin:
            return (f"rollback: challenger top-1 agreement {ch['top1']:.3f} vs champion's {champ['top1']:.3f}: "
                    f"difference {d['estimate']:+.3f}, upper bound {d['upper']:+.3f} < -canary.margin {cs.margin} "
                    f"at {cs.confidence:.0%}")
        return (f"top-1 difference {d['estimate']:+.3f} in [{d['lower']:+.3f}, {d['upper']:+.3f}] "
                f"straddles -canary.margin {cs.margin}")

    @staticmethod
    def _against_dense(ev: dict, slo, cs) -> str:
        ch = ev["challenger"]
        if ch["count"] < cs.min_samples:
            return f"{ch['count']} challenger samples, {cs.min_samples} needed"
        top1, kl = ev["challenger_top1"], ev["challenger_kl"]
        if top1["lower"] >= slo.top1_min and kl["upper"] <= slo.kl_mean_max:
            return "promote"
        if top1["upper"] < slo.top1_min or kl["lower"] > slo.kl_mean_max:
            return (f"rollback: against the dense outputs (fallback): top-1 agreement {ch['top1']:.3f} "
                    f"(upper bound {top1['upper']:.3f}, SLO {slo.top1_min}), mean KL {ch['kl_mean']:.4f} "
                    f"(lower bound {kl['lower']:.4f}, SLO {slo.kl_mean_max}) at {cs.confidence:.0%}")
        return (f"against the dense outputs: top-1 in [{top1['lower']:.3f}, {top1['upper']:.3f}], "
                f"mean KL in [{kl['lower']:.4f}, {kl['upper']:.4f}]: not yet clear of the SLO")

    def _end_canary(self, canary: dict, champion: str | None) -> None:
        change = {"challenger": "none", "canary_share": 0.0, **canary.get("restore", {})}
        if champion is not None:
            change["champion"] = champion
            change["fallback"] = "none"  # a promotion ends a fallback of the old champion
        self.control.update(ControlUpdate(**change), by=ACTOR)
        st = self.store.state()
        st.pop("canary", None)
        self.store.save(st)

    def promote(self, canary: dict, ev: dict) -> dict:
        v, old = canary["version"], canary["champion"]
        self.registry.set_alias(CHAMPION, v)
        if old and old != v:
            self.registry.set_tag(old, "retired", f"{time.time():.0f}")
            self.registry.set_tag(old, "retired_by", v)
        self.registry.set_tag(v, "promoted_at", f"{time.time():.0f}")
        self.registry.set_tag(v, "canary_evidence", json.dumps(ev)[:4000])
        self._end_canary(canary, v)
        ch, champ = ev["challenger"], ev["champion"]
        against = (f"champion top-1 {champ['top1']:.3f} over {champ['count']}" if champ["count"]
                   else "the champion served dense (fallback): judged on the SLO")
        msg = (f"predictor {v} promoted to champion (was {old}): challenger top-1 {ch['top1']:.3f}, "
               f"mean KL {ch['kl_mean']:.4f} over {ch['count']} samples; {against}")
        self.alerts.raise_alert("promotion", "info", msg, predictor_version=v,
                                evidence={**ev, "previous": old}, dedup_key=f"promotion:{v}")
        log.info(msg)
        return self.store.decide("promoted", v, {**ev, "previous": old})

    def rollback(self, canary: dict, reason: str, ev: dict) -> dict:
        v = canary["version"]
        self._end_canary(canary, None)
        self.registry.set_tag(v, "rolled_back", reason[:500])
        self.registry.set_tag(v, "rollback_evidence", json.dumps(ev)[:4000])
        if self.registry.aliases().get(APPROVED) == v:
            self.registry.delete_alias(APPROVED)
        msg = f"predictor {v} rolled back: {reason}"
        self.alerts.raise_alert("rollback", "critical", msg, predictor_version=v,
                                evidence={**ev, "reason": reason}, dedup_key=f"rollback:{v}")
        log.warning(msg)
        return self.store.decide("rolled_back", v, {**ev, "reason": reason})

    def drift(self) -> list[dict]:
        """Raise the shadow rate while a drift episode lasts; run the fine-tune early.

        An episode begins when the champion's drift check says drift, and lasts while it
        does, and after that while the last promotion of the episode did not meet the
        fine-tune's absolute target (its new champion has learnt only part of the traffic).
        When a champion promoted within the episode drifts itself, a new episode begins: the
        traffic has moved on from what the episode's fine-tunes learnt (a second switch), so
        the next fine-tune reads from now on, with a fresh count of early runs."""
        a = self.s.adapt
        state = self.control.get()
        if state is None:
            return []
        champion = state.champion or self.registry.resolve(CHAMPION)
        raw = self.r.hget(self.keys.monitor_drift, champion) if champion else None
        check = json.loads(raw) if raw else {}
        drifting = bool(check.get("drift"))
        st = self.store.state()
        out = []
        saved = st.get("drift")
        episode = self._episode(saved["since"]) if saved else None
        active = drifting or (episode is not None and bool(episode["promoted"]) and not episode["met"])
        renewed = (drifting and saved is not None and champion is not None
                   and saved.get("champion") not in (None, champion) and champion in episode["promoted"])
        if renewed:
            st["drift"] = {**saved, "since": time.time(), "run_id": check.get("run_id"), "champion": champion,
                           "early_runs": 0, "last_early": 0, "episode": saved.get("episode", 1) + 1}
            out.append(self.store.decide("drift_episode", champion,
                                         {"drift_run": check.get("run_id"), "after": saved.get("champion"),
                                          "episode": st["drift"]["episode"]}))
            episode = self._episode(st["drift"]["since"])
        if drifting and saved is None:
            st["drift"] = {"since": time.time(), "run_id": check.get("run_id"), "shadow_rate": state.shadow_rate,
                           "champion": champion, "episode": 1}
            if a.drift_shadow_rate is not None and a.drift_shadow_rate > state.shadow_rate:
                self.control.update(ControlUpdate(shadow_rate=a.drift_shadow_rate), by=ACTOR)
            out.append(self.store.decide("drift_shadow_rate", champion,
                                         {"shadow_rate": a.drift_shadow_rate, "was": state.shadow_rate,
                                          "drift_run": check.get("run_id")}))
        elif not active and saved is not None:
            if a.drift_shadow_rate is not None:
                self.control.update(ControlUpdate(shadow_rate=saved["shadow_rate"]), by=ACTOR)
            st.pop("drift")
            out.append(self.store.decide("drift_ended", champion, {"shadow_rate": saved["shadow_rate"],
                                                                   "target_met": bool(episode and episode["met"])}))
        if active and self.run_soon is not None and not st.get("canary") \
                and self._early_due(st["drift"], episode or self._episode(st["drift"]["since"])):
            if available(sample_reader(self.r, self.p)) >= a.min_samples:
                self.run_soon("finetune")
                st["drift"]["early_runs"] = st["drift"].get("early_runs", 0) + 1
                st["drift"]["last_early"] = time.time()
                out.append(self.store.decide("finetune_early", champion, {"drift_run": check.get("run_id"),
                                                                          "attempt": st["drift"]["early_runs"],
                                                                          "drifting": drifting}))
        self.store.save(st)
        return out

    def _episode(self, since: float) -> dict:
        """Candidates of a drift episode: those awaiting a decision, the promoted ones (newest
        first) and whether the newest promoted one met the fine-tune's absolute target."""
        recent = [d for d in self.store.recent(DECISIONS_LEN) if d["ts"] >= since]
        candidates = {d["version"]: d["evidence"] for d in recent if d["decision"] == "candidate"}
        decided = {d["version"] for d in recent if d["decision"] in ("promoted", "rolled_back", "refused")}
        promoted = [d["version"] for d in recent if d["decision"] == "promoted"]
        met = bool(promoted) and bool(candidates.get(promoted[0], {}).get("target_met"))
        return {"pending": [v for v in candidates if v not in decided], "promoted": promoted, "met": met}

    def _early_due(self, drift: dict, episode: dict) -> bool:
        """While the episode lasts: a fine-tune as soon as enough samples exist, again after
        one that registered nothing or whose candidate was decided without meeting the
        target (once more samples are in); never while one runs or a candidate of the
        episode awaits approval or its canary, at most one per `adapt.early_retry_s` and
        `adapt.early_max_runs` in all."""
        if self.r.hexists(self.keys.jobs_running, "finetune"):
            return False
        if drift.get("early_runs", 0) >= self.s.adapt.early_max_runs:
            return False
        if episode["pending"] or episode["met"]:
            return False
        return time.time() - drift.get("last_early", 0) >= self.s.adapt.early_retry_s

    # ---- what `shadowgate status` shows ----------------------------------------------------
    def status(self) -> dict:
        state = self.control.get()
        st = self.store.state()
        canary = st.get("canary")
        aliases = self.registry.aliases()
        return {"champion": (state.champion if state else None) or aliases.get(CHAMPION),
                "challenger": state.challenger if state else None,
                "canary_share": state.canary_share if state else 0.0,
                "fallback": state.fallback if state else None,
                "aliases": aliases, "canary": {**canary, "evidence": self.evidence(canary)} if canary else None,
                "drift": st.get("drift"), "decisions": self.store.recent(20)}


def main(settings, run_soon=None) -> dict:
    return Controller(settings, run_soon=run_soon).tick()
