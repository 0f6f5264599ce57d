"""The fine-tune job: a candidate predictor from what the shadow runs measured.

1. Reads the shadow samples that arrived since its last run through consumer group
   `finetune` (one consumer name, so a run that was killed is retried on exactly the
   samples it held; they are acknowledged only when the run has ended).
2. Adds a replay share of the champion's own training data: the suite training instances of
   the families it was trained on (tag `families`; all six for the shipped predictor) and
   the shadow samples it was itself fine-tuned on (kept in its artifacts under training/).
3. Holds out the newest `adapt.holdout` of the samples and fine-tunes from the champion's
   weights on the rest (adapter.pipeline.train.finetune_shadowllm).
4. Evaluates candidate and champion on the held-out samples (Spearman rho against their
   targets, and replayed fidelity: the gated model with each predictor's masks, teacher-
   forced on the sample's prompt + continuation, KL and top-1 against the dense model) and
   on suite validation prompts of the champion's families (forgetting).
5. Logs everything as one MLflow run (experiment `shadowgate-finetune`): params, metrics,
   the predictor folder (weights as safetensors, config, drift reference, training data),
   eval.json and fidelity.png. A candidate whose held-out mean KL is at least `adapt.min_gain`
   (relative) below the champion's, and that forgets at most `adapt.max_forget`, is
   registered with tags and alias `candidate`; otherwise the run says why not.

A run is idempotent on its data window: a version already registered from the same samples
(tag `data_window`) is not registered again.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path

import pandas as pd
import redis
import torch
from safetensors.torch import load_file, save_file

from adapter.evaluation import scoring as evaluate

from adapter.embedded import suite as tasks

from adapter.pipeline import traces

from adapter.pipeline import train as training
from adapter.selection.methods import dense
from adapter.pipeline.traces import TraceRecord
from jobs.registry import CHAMPION, PredictorRegistry, job_registry
from monitor import drift
from monitor.fidelity import compare
from monitor.redis_client import redis_client
from monitor.state import ControlStore
from monitor.streams import GroupReader

log = logging.getLogger(__name__)
GROUP = "finetune"
CONSUMER = "finetune"  # one name: a retried run re-reads exactly what the killed one held
EXPERIMENT = "shadowgate-finetune"
TRAINING_DIR = "training"
TRAINING_KEEP = 600  # shadow examples a version keeps for later replay
CANDIDATE, APPROVED = "candidate", "approved"
KL_FLOOR = 0.05

_loaded: dict[str, object] = {}


def load_model(settings):
    """The served model, loaded once per process (float32: training and evaluation)."""
    from adapter.runtime.loading import load

    if settings.model.name not in _loaded:
        _loaded[settings.model.name] = load(settings.model.name,
                                            settings.runtime.model_copy(update={"dtype": "float32"}))
    return _loaded[settings.model.name]


def sample_reader(client: redis.Redis, prefix: str) -> GroupReader:
    return GroupReader(client, f"{prefix}:shadow:samples", GROUP, CONSUMER, claim_idle_ms=60_000)


def available(reader: GroupReader) -> int:
    lag = reader.lag()
    return lag["pending"] + lag["lag"]


class Examples:
    """Stacked predictor inputs and raw importance targets, with what replay needs."""

    def __init__(self, x, heads, neurons, prompts, conts, ids=None):
        self.x, self.heads, self.neurons = x, heads, neurons
        self.prompts, self.conts = prompts, conts
        self.ids = ids or [None] * len(prompts)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, idx) -> "Examples":
        idx = list(idx)
        return Examples(self.x[idx], self.heads[idx], self.neurons[idx], [self.prompts[i] for i in idx],
                        [self.conts[i] for i in idx], [self.ids[i] for i in idx])

    @staticmethod
    def cat(parts: list["Examples"]) -> "Examples":
        parts = [p for p in parts if len(p)]
        return Examples(torch.cat([p.x for p in parts]), torch.cat([p.heads for p in parts]),
                        torch.cat([p.neurons for p in parts]), sum([p.prompts for p in parts], []),
                        sum([p.conts for p in parts], []), sum([p.ids for p in parts], []))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"predictor_input": self.x.contiguous(), "heads": self.heads.contiguous(),
                   "neurons": self.neurons.contiguous()}, str(folder / "shadow.safetensors"))
        with open(folder / "shadow.jsonl", "w") as fh:
            for sid, p, c in zip(self.ids, self.prompts, self.conts):
                fh.write(json.dumps({"sample_id": sid, "prompt_ids": p, "token_ids": c}) + "\n")

    @staticmethod
    def load(folder: Path) -> "Examples | None":
        if not (folder / "shadow.safetensors").exists():
            return None
        t = load_file(str(folder / "shadow.safetensors"))
        rows = [json.loads(x) for x in (folder / "shadow.jsonl").read_text().splitlines()]
        return Examples(t["predictor_input"], t["heads"], t["neurons"], [r["prompt_ids"] for r in rows],
                        [r["token_ids"] for r in rows], [r.get("sample_id") for r in rows])


def read_samples(reader: GroupReader, max_n: int) -> list:
    """What this consumer holds unacknowledged (a killed run's samples: exactly those),
    else the new entries, up to max_n."""
    held = reader.own_pending(max_n)
    if held:
        return held
    out = []
    while len(out) < max_n:
        batch = reader.read_new(min(500, max_n - len(out)), None)
        if not batch:
            break
        out += batch
    return out


def parse_samples(entries, criterion: str) -> tuple[Examples | None, list[str]]:
    """Examples of the entries that hold a valid record; ids of those that do not."""
    xs, hs, ns, prompts, conts, ids, bad = [], [], [], [], [], [], []
    for e in entries:
        try:
            fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in e.fields.items()}
            rec = TraceRecord.from_fields(fields)
            xs.append(rec.tensors["predictor_input"].float())
            hs.append(rec.tensors[f"heads.{criterion}"].float())
            ns.append(rec.tensors[f"neurons.{criterion}"].float())
            prompts.append(list(rec.meta["prompt_ids"]))
            conts.append(list(rec.meta["token_ids"]))
            ids.append(e.id)
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("shadow sample %s skipped: %s", e.id, exc)
            bad.append(e.id)
    if not xs:
        return None, bad
    return Examples(torch.stack(xs), torch.stack(hs), torch.stack(ns), prompts, conts, ids), bad


def suite_examples(loaded, families: list[str], per_family: int, work: Path, criterion: str) -> Examples:
    """The champion's suite training data, regenerated (same split seeds: the same instances)."""
    from adapter.pipeline.collect import collect

    folder = collect(loaded.runtime.model, loaded.tokenizer, work / "replay", {"train": per_family},
                     families=families)
    ts = traces.load_split(folder, "train")
    instances = [i for i in tasks.split("train", per_family) if i.family in families]
    pairs = evaluate.encode_pairs(loaded.tokenizer, instances)
    return Examples(ts.tensors["predictor_input"].float(), ts.heads(criterion).float(),
                    ts.neurons(criterion).float(), [p for p, _ in pairs], [a for _, a in pairs])


class Replayer:
    """Replayed fidelity: dense logits computed once per pair, then each predictor's masks."""

    def __init__(self, runtime, pairs: list[tuple[list[int], list[int]]]):
        self.rt, self.pairs = runtime, [(p, c) for p, c in pairs if c]
        self.dense = [runtime.score(p, c, dense()) for p, c in self.pairs]

    def fidelity(self, method) -> dict:
        kls, top1 = [], []
        for (p, c), d in zip(self.pairs, self.dense):
            f = compare(d, self.rt.score(p, c, method), c)
            kls.append(f.kl_mean)
            top1 += f.top1
        return {"kl_mean": sum(kls) / max(1, len(kls)), "top1": sum(top1) / max(1, len(top1)), "n": len(kls)}


def rho(module, ex: Examples) -> dict:
    with torch.no_grad():
        ph, pn = module(ex.x)
    vh, vn = training.unified_targets(ex.heads, ex.neurons)
    return {"rho_heads": float(training.spearman(ph, vh).mean()),
            "rho_neurons": float(training.spearman(pn, vn).mean())}


def plot(evaluation: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    sets = [("held-out samples", "holdout"), ("champion's families", "old")]
    for ax, metric, label in ((axes[0], "kl_mean", "mean KL (lower is better)"),
                              (axes[1], "top1", "top-1 agreement")):
        for j, who in enumerate(("champion", "candidate")):
            vals = [evaluation[who][s][metric] for _, s in sets]
            ax.bar([i + 0.38 * j for i in range(len(sets))], vals, width=0.38, label=who)
        ax.set_xticks([i + 0.19 for i in range(len(sets))], [n for n, _ in sets])
        ax.set_title(label)
    axes[0].legend()
    fig.suptitle("replayed fidelity vs the dense model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def champion_version(settings, registry: PredictorRegistry, client: redis.Redis) -> str:
    state = ControlStore(client, settings.redis.prefix).get()
    version = (state.champion if state else None) or registry.resolve(CHAMPION)
    if version is None:
        raise RuntimeError("no champion version to fine-tune from (alias 'champion' is unset)")
    return version


def main(settings) -> dict:
    from jobs.rollout import RolloutStore
    from jobs.runner import JobRecords

    cfg = settings.adapt
    r = redis_client(settings.redis)
    registry = job_registry(settings)
    reader = sample_reader(r, settings.redis.prefix)
    n = available(reader)
    if n < cfg.min_samples:
        return {"status": "skipped", "reason": f"{n} new shadow samples, {cfg.min_samples} needed"}

    t0 = time.time()
    records = JobRecords(r, settings.redis.prefix)
    records.phase("finetune", "loading")
    champion = champion_version(settings, registry, r)
    loaded = load_model(settings)
    rt = loaded.runtime
    fingerprint = traces.model_fingerprint(rt.model)
    champ_folder = registry.download(champion)
    champ = training.load_predictor(champ_folder, rt.shape, fingerprint)
    if champ.kind != "shadowllm":
        return {"status": "skipped", "reason": f"champion {champion} is a {champ.kind} predictor; only "
                                               "shadowllm predictors are fine-tuned"}
    entries = read_samples(reader, cfg.max_samples)
    new, bad = parse_samples(entries, champ.criterion)
    if bad:
        r.xack(reader.stream, GROUP, *bad)
    if new is None or len(new) < cfg.min_samples:
        return {"status": "skipped", "reason": f"{0 if new is None else len(new)} usable shadow samples, "
                                               f"{cfg.min_samples} needed", "unusable": len(bad)}
    ids = list(new.ids)
    window = f"{ids[0]}..{ids[-1]}"

    def ack():
        r.xack(reader.stream, GROUP, *ids)

    done = registry.versions(tag="data_window", value=window)
    if done:  # a retry of a run that registered but was killed before it acknowledged
        ack()
        return {"status": "already_registered", "version": str(done[0].version), "data_window": window}

    champ_info = registry.version(champion).tags or {}
    families = [f for f in (champ_info.get("families") or ",".join(tasks.FAMILIES)).split(",") if f]
    state = ControlStore(r, settings.redis.prefix).get()
    sparsity = state.sparsity if state else settings.serve.defaults.sparsity
    mode = settings.runtime.mode

    # newest samples held out; the rest plus replay is training data
    order = list(range(len(new)))  # stream order is arrival order
    n_hold = max(2, math.ceil(cfg.holdout * len(new)))
    hold, fresh = new.take(order[-n_hold:]), new.take(order[:-n_hold])
    with tempfile.TemporaryDirectory(prefix="shadowgate-finetune-") as tmp:
        work = Path(tmp)
        parts = [fresh]
        replay_rows = 0
        if cfg.replay_per_family > 0:
            suite = suite_examples(loaded, families, cfg.replay_per_family, work, champ.criterion)
            parts.append(suite)
            replay_rows += len(suite)
        prior = Examples.load(champ_folder / TRAINING_DIR)
        if prior is not None:
            parts.append(prior)
            replay_rows += len(prior)
        train_all = Examples.cat(parts)
        gen = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(train_all), generator=gen).tolist()
        n_val = max(2, len(perm) // 8)
        val, train = train_all.take(perm[:n_val]), train_all.take(perm[n_val:])

        tcfg = training.TrainConfig(epochs=cfg.epochs, lr=cfg.lr, patience=cfg.patience,
                                    hidden=champ.config["sizes"]["hidden"],
                                    neuron_rank=champ.config["sizes"]["neuron_rank"])
        records.phase("finetune", "training")
        t_train = time.time()
        module, train_metrics = training.finetune_shadowllm(champ.module, train.x, train.heads, train.neurons,
                                                            val.x, val.heads, val.neurons, tcfg)
        train_s = time.time() - t_train
        cand = training.LoadedPredictor("shadowllm", champ.criterion, champ.config, module)
        records.phase("finetune", "evaluating")

        old_instances = [i for i in tasks.split("validation", cfg.replay_holdout_per_family) if i.family in families]
        replay_new = Replayer(rt, list(zip(hold.prompts, hold.conts)))
        replay_old = Replayer(rt, evaluate.encode_pairs(loaded.tokenizer, old_instances))
        evaluation = {}
        for who, pred in (("champion", champ), ("candidate", cand)):
            method = pred.method(sparsity, mode, rt.shape)
            evaluation[who] = {"holdout": {**replay_new.fidelity(method), **rho(pred.module, hold)},
                               "old": replay_old.fidelity(method)}
        c_kl, k_kl = evaluation["candidate"]["holdout"]["kl_mean"], evaluation["champion"]["holdout"]["kl_mean"]
        c_old, k_old = evaluation["candidate"]["old"]["kl_mean"], evaluation["champion"]["old"]["kl_mean"]
        gain = (k_kl - c_kl) / max(k_kl, 1e-9)
        # relative, with KLs below KL_FLOOR counted as KL_FLOOR: a rise from 0.020 to 0.027 is
        # no forgetting worth refusing a candidate for
        forget = (c_old - k_old) / max(k_old, KL_FLOOR)
        reasons = []
        if gain < cfg.min_gain:
            reasons.append(f"held-out mean KL {c_kl:.4f} vs champion {k_kl:.4f}: gain {gain:.1%} < "
                           f"adapt.min_gain {cfg.min_gain:.1%}")
        if forget > cfg.max_forget:
            reasons.append(f"mean KL on the champion's families {c_old:.4f} vs {k_old:.4f}: rises "
                           f"{forget:.1%} > adapt.max_forget {cfg.max_forget:.1%}")

        # the candidate's folder: weights + config, its drift reference (the prompts it was
        # trained on) and the shadow examples it learnt from (replayed by its own fine-tunes)
        out = work / "predictor"
        metrics = {**train_metrics, "gain": gain, "forget": forget}
        ts = traces.TraceSet(manifest={"version": f"shadow:{window}"}, tensors={"predictor_input": train.x},
                             metas=[{}] * len(train))
        training.save_predictor(out, "shadowllm", champ.criterion, module, rt.shape, fingerprint, metrics, ts, tcfg)
        kept = Examples.cat([p for p in (prior, new) if p is not None])
        kept.take(range(max(0, len(kept) - TRAINING_KEEP), len(kept))).save(out / TRAINING_DIR)
        ref_x = torch.cat([train_all.x, hold.x])
        basis = drift.fit_basis(ref_x)
        heads, neurons = drift.scores_for(cand, ref_x)
        lens = [len(p) for p in train_all.prompts + hold.prompts]
        rows = drift.feature_rows(basis, ref_x, lens, heads, neurons)
        drift.write_reference(out, basis, pd.DataFrame(rows, columns=drift.feature_columns(basis.k)))
        (work / "eval.json").write_text(json.dumps(evaluation, indent=2))
        plot(evaluation, work / "fidelity.png")

        records.phase("finetune", "logging")
        run_tags = {"shadowgate.kind": "finetune", "parent_version": champion, "data_window": window}
        run_id = registry.start_run(EXPERIMENT, tags=run_tags)
        client = registry.client
        params = {"samples": len(new), "holdout": len(hold), "train_rows": len(train), "replay_rows": replay_rows,
                  "families_replayed": ",".join(families), "epochs": cfg.epochs, "lr": cfg.lr,
                  "sparsity": sparsity, "mode": mode, "criterion": champ.criterion, "parent_version": champion}
        for k, v in params.items():
            client.log_param(run_id, k, v)
        flat = {f"{who}.{s}.{m}": v for who, d in evaluation.items() for s, dd in d.items()
                for m, v in dd.items() if isinstance(v, float)}
        for k, v in {**flat, "gain": gain, "forget": forget, "train_s": train_s,
                     "rho_heads_val": train_metrics["rho_heads"], "rho_neurons_val": train_metrics["rho_neurons"]}.items():
            client.log_metric(run_id, k, float(v))
        client.log_artifacts(run_id, str(out), artifact_path="predictor")
        client.log_artifact(run_id, str(work / "eval.json"))
        client.log_artifact(run_id, str(work / "fidelity.png"))
        version = None
        if not reasons:
            vtags = {"source": "finetune", "parent_version": champion, "data_window": window,
                     "model_fingerprint": fingerprint, "families": ",".join(families),
                     "holdout_kl_mean": f"{c_kl:.5f}", "champion_holdout_kl_mean": f"{k_kl:.5f}",
                     "holdout_top1": f"{evaluation['candidate']['holdout']['top1']:.4f}",
                     "gain": f"{gain:.4f}", "forget": f"{forget:.4f}", "run_id": run_id}
            version = registry.register_run(run_id, vtags)
            registry.set_alias(CANDIDATE, version)
            client.set_tag(run_id, "registered_version", version)
            if cfg.auto_approve:
                registry.set_alias(APPROVED, version)
        else:
            client.set_tag(run_id, "not_registered_reason", "; ".join(reasons))
        client.set_terminated(run_id)
    ack()
    result = {"status": "registered" if version else "not_registered", "version": version,
              "parent_version": champion, "data_window": window, "samples": len(new), "holdout": len(hold),
              "replay_rows": replay_rows, "run_id": run_id, "gain": round(gain, 4), "forget": round(forget, 4),
              "candidate_holdout_kl": round(c_kl, 5), "champion_holdout_kl": round(k_kl, 5),
              "reasons": reasons, "train_s": round(train_s, 2), "duration_s": round(time.time() - t0, 2)}
    RolloutStore(r, settings.redis.prefix).decide("candidate" if version else "not_registered", version,
                                                  result, by="finetune")
    log.info("fine-tune: %s", result)
    return result
