"""The fine-tune job: a candidate predictor from what the shadow runs measured.

1. Reads the shadow samples through consumer group `finetune`: first what this consumer
   holds unacknowledged (a run that was killed is retried on exactly the samples it held),
   else the entries that arrived since the last run, in arrival order, up to
   `adapt.max_samples`; they are acknowledged only when the run has ended. A sample is token
   ids (prompt, served continuation, the dense model's tokens, the request's stop strings);
   its targets follow the target policy `adapt.targets` (adapter.pipeline.targets, the one
   the offline collector uses), scored here in batches. One example per prompt (the newest).
2. Adds a replay share of the champion's own training data: the suite training instances of
   the families it was trained on (tag `families`; all six for the shipped predictor) and
   the shadow examples it and its ancestors learnt (kept in its artifacts under training/,
   rescored when the policy changed).
3. Holds out `adapt.holdout` of the prompts by hash (the same prompt always on the same side)
   and fine-tunes from the champion's weights on the rest (finetune_shadowllm).
4. Evaluates candidate and champion on the held-out samples (Spearman rho against their
   targets, and replayed fidelity on the continuation targets, under the default policy the
   answer span: the gated model with each predictor's masks, teacher-forced, KL and top-1
   against the dense model) and on what the champion was trained for: suite validation
   prompts of its families and the shadow examples it learnt (forgetting; its
   in-distribution level).
5. Gate: held-out mean KL at least `adapt.min_gain` (relative) below the champion's, and
   forgetting at most `adapt.max_forget`. The absolute target (held-out KL within 1.1x the
   champion's in-distribution KL) is recorded (`target_met`); while drift lasts and it is
   not met, the controller keeps running early fine-tunes. A candidate that passes is
   refitted on the training data plus the held-out samples (`adapt.refit`).
6. Logs everything as one MLflow run (experiment `shadowgate-finetune`): params, metrics,
   the predictor folder (weights as safetensors, config, drift reference, training data),
   eval.json and fidelity.png; registers the candidate with tags and alias `candidate`, or
   says why not.

A run is idempotent on its data window: a version already registered from the same samples
(tag `data_window`) is not registered again.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd
import redis
import torch
from safetensors.torch import load_file, save_file

from adapter.embedded import suite as tasks
from adapter.pipeline import targets, traces
from adapter.pipeline import train as training
from adapter.pipeline.collect import suite_specs
from adapter.selection import artifact
from adapter.selection.methods import dense
from adapter.pipeline.traces import TraceRecord
from jobs.registry import CHAMPION, PredictorRegistry, job_registry
from jobs.rollout_store import RolloutStore
from jobs.runner import JobRecords
from jobs.shadow_reader import GROUP, available, sample_reader
from monitor import drift
from monitor.fidelity import compare
from monitor.redis_client import redis_client
from monitor.state import ControlStore
from monitor.streams import GroupReader

log = logging.getLogger(__name__)
EXPERIMENT = "shadowgate-finetune"
TRAINING_DIR = "training"
TRAINING_KEEP = 3000  # shadow examples a version keeps for later replay (one per prompt)
LEARNT_EVAL = 60  # of the champion's learnt shadow examples, measured for forgetting
SELECT_PAIRS = 96  # validation examples the epoch is selected on (scored every epoch: keep it cheap)
TARGET_RATIO = 1.1  # the absolute target: held-out KL within this multiple of the in-distribution level
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


class Examples:
    """Stacked predictor inputs and raw importance targets, with the target specs they were
    scored from (token ids: what replay, evaluation and a later rescoring need)."""

    def __init__(self, x, heads, neurons, specs: list[targets.Spec], ids=None):
        self.x, self.heads, self.neurons, self.specs = x, heads, neurons, specs
        self.ids = ids or [None] * len(specs)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def pairs(self) -> list[tuple[list[int], list[int]]]:
        """(prompt, continuation targets): what replayed fidelity is measured on (under the
        default policy, the answer span)."""
        return [(s.prompt_ids, s.labels) for s in self.specs]

    def take(self, idx) -> "Examples":
        idx = list(idx)
        return Examples(self.x[idx], self.heads[idx], self.neurons[idx], [self.specs[i] for i in idx],
                        [self.ids[i] for i in idx])

    @staticmethod
    def cat(parts: list["Examples"]) -> "Examples":
        parts = [p for p in parts if p is not None and len(p)]
        return Examples(torch.cat([p.x for p in parts]), torch.cat([p.heads for p in parts]),
                        torch.cat([p.neurons for p in parts]), sum([p.specs for p in parts], []),
                        sum([p.ids for p in parts], []))

    @staticmethod
    def from_records(records: list[TraceRecord], criterion: str, ids=None) -> "Examples":
        return Examples(torch.stack([r.tensors["predictor_input"].float() for r in records]),
                        torch.stack([r.tensors[f"heads.{criterion}"].float() for r in records]),
                        torch.stack([r.tensors[f"neurons.{criterion}"].float() for r in records]),
                        [targets.Spec.from_meta(r.meta) for r in records], ids)

    def save(self, folder: Path, policy: targets.TargetPolicy) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"predictor_input": self.x.contiguous(), "heads": self.heads.contiguous(),
                   "neurons": self.neurons.contiguous()}, str(folder / "shadow.safetensors"))
        with open(folder / "shadow.jsonl", "w") as fh:
            for sid, spec in zip(self.ids, self.specs):
                fh.write(json.dumps({"sample_id": sid, **spec.meta()}) + "\n")
        (folder / "policy.json").write_text(json.dumps(policy.model_dump()))

    @staticmethod
    def load(folder: Path, loaded, policy: targets.TargetPolicy, criterion: str) -> "Examples | None":
        """A version's learnt examples; rescored from their token ids when they were scored
        under another policy (or by a version that kept no specs)."""
        if not (folder / "shadow.jsonl").exists():
            return None
        rows = [json.loads(x) for x in (folder / "shadow.jsonl").read_text().splitlines() if x]
        if not rows:
            return None
        stored = json.loads((folder / "policy.json").read_text()) if (folder / "policy.json").exists() else None
        if stored == policy.model_dump() and all("label_ids" in r for r in rows):
            t = load_file(str(folder / "shadow.safetensors"))
            return Examples(t["predictor_input"], t["heads"], t["neurons"],
                            [targets.Spec.from_meta(r) for r in rows], [r.get("sample_id") for r in rows])
        specs = [spec_of(r, stored, loaded, policy) for r in rows]
        return score_examples(loaded, specs, [r.get("sample_id") for r in rows], policy, criterion)


def skip_before(reader: GroupReader, since_s: float) -> int:
    """Acknowledge, unread, what this group holds or has not read yet of the samples older
    than `since_s`: an early fine-tune of a drift episode learns from the traffic of the
    episode, not from a backlog of what the champion already serves well (a backlog of
    `adapt.max_samples` would otherwise fill the run). Returns how many were skipped."""
    r, stream, group = reader.r, reader.stream, reader.group
    reader.ensure_group()
    since_ms = int(since_s * 1000)
    skipped = 0
    held = r.xpending_range(stream, group, min="-", max=f"{since_ms}-0", count=100_000, consumername=reader.consumer)
    ids = [h["message_id"] for h in held]
    if ids:
        skipped += r.xack(stream, group, *ids)
    last = next((g["last-delivered-id"] for g in r.xinfo_groups(stream)
                 if (g["name"].decode() if isinstance(g["name"], bytes) else g["name"]) == group), None)
    last = last.decode() if isinstance(last, bytes) else last
    older = r.xrevrange(stream, max=f"{since_ms}-0", count=1)
    if last is not None and older:
        newest_old = older[0][0].decode() if isinstance(older[0][0], bytes) else older[0][0]
        if _id_key(newest_old) > _id_key(last):
            skipped += len(r.xrange(stream, min=f"({last}", max=newest_old))
            r.xgroup_setid(stream, group, newest_old)
    return skipped


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def read_samples(reader: GroupReader, max_n: int) -> list:
    """What this consumer holds unacknowledged (a killed run's samples: exactly those),
    else the new entries in arrival order, up to max_n."""
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


def spec_of(meta: dict, made_under: dict | None, loaded, policy: targets.TargetPolicy) -> targets.Spec:
    """The spec of a stored example under `policy`: as stored when it was made under the same
    policy, else made again from its token ids (the dense tokens, else the served ones)."""
    if made_under == policy.model_dump() and "label_ids" in meta:
        return targets.Spec.from_meta(meta)
    labels = meta.get("pseudo_labels") or meta.get("label_ids") or list(meta["token_ids"])
    return targets.make_spec(loaded.runtime.model, loaded.tokenizer, list(meta["prompt_ids"]), labels,
                             meta.get("stop") or [], policy)


def sample_specs(entries, loaded, policy: targets.TargetPolicy) -> tuple[list[targets.Spec], list[str], list[str]]:
    """Target specs of the entries that hold a valid shadow record (the replica's spec when
    it used this policy, else made again from the stored token ids); ids of those that do
    not."""
    specs, ids, bad = [], [], []
    for e in entries:
        try:
            fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in e.fields.items()}
            meta = TraceRecord.from_fields(fields).meta
            spec = spec_of(meta, meta.get("policy"), loaded, policy)
            if not spec.prompt_ids or not spec.labels:
                raise ValueError("empty prompt or continuation")
            specs.append(spec)
            ids.append(e.id)
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("shadow sample %s skipped: %s", e.id, exc)
            bad.append(e.id)
    return specs, ids, bad


def dedupe(specs: list[targets.Spec], ids: list[str]) -> tuple[list[targets.Spec], list[str]]:
    """One example per prompt (the newest sample of it): a client repeating a prompt must
    not weigh it twice, nor put it on both sides of the hold-out split."""
    newest = {s.key(): (s, i) for s, i in zip(specs, ids)}
    kept = [v for v in newest.values()]
    return [s for s, _ in kept], [i for _, i in kept]


def in_holdout(spec: targets.Spec, share: float) -> bool:
    """Held out by the prompt's hash: the same prompt is always on the same side, in every
    run, whatever order the samples came in."""
    return int(spec.key()[8:16], 16) / 16 ** 8 < share


def score_examples(loaded, specs: list[targets.Spec], ids: list, policy: targets.TargetPolicy,
                   criterion: str) -> Examples:
    rt = loaded.runtime
    records = targets.score(rt.model, loaded.tokenizer, rt.shape, specs, policy, [{} for _ in specs], {})
    return Examples.from_records(records, criterion, list(ids))


def suite_examples(loaded, families: list[str], per_family: int, work: Path, criterion: str,
                   policy: targets.TargetPolicy) -> Examples:
    """The champion's suite training data, regenerated under the policy (same split seeds:
    the same instances)."""
    from adapter.pipeline.collect import collect

    folder = collect(loaded.runtime.model, loaded.tokenizer, work / "replay", {"train": per_family},
                     families=families, policy=policy)
    ts = traces.load_split(folder, "train")
    return Examples(ts.tensors["predictor_input"].float(), ts.heads(criterion).float(),
                    ts.neurons(criterion).float(), [targets.Spec.from_meta(m) for m in ts.metas])


def grow_replay(prior: Examples | None, learnt: Examples, keep: int) -> Examples:
    """What a version keeps for its own fine-tunes to replay: what its parent kept plus what
    it learnt, one example per prompt; over `keep`, a seeded uniform thinning of the whole
    history (not only the newest), so an earlier drift is not forgotten by a later one."""
    merged = Examples.cat([prior, learnt])
    last = {s.key(): i for i, s in enumerate(merged.specs)}
    idx = sorted(last.values())
    if len(idx) > keep:
        gen = torch.Generator().manual_seed(len(idx))
        idx = sorted(idx[i] for i in torch.randperm(len(idx), generator=gen)[:keep].tolist())
    return merged.take(idx)


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


def _fit(champ, train_all: Examples, cfg, epochs: int | None = None, select_with=None, seed: int = 0):
    """Fine-tune a copy of the champion on train_all (1/8 of it, seeded, for early stopping);
    `epochs`: the refit instead: all of train_all, on the first fit's learning-rate schedule
    (cosine over `adapt.epochs`), stopped after the epoch the first fit kept, whose weights it
    keeps (not the epoch that ranks an in-sample split best: the refit has no held-out data).
    `select_with` = (runtime, sparsity, mode): the epoch kept is the one whose masks give the
    lowest replayed KL on the validation examples (what the gate measures), not the best rho."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train_all), generator=gen).tolist()
    n_val = max(2, len(perm) // 8)
    val = train_all.take(perm[:n_val])
    train = train_all if epochs is not None else train_all.take(perm[n_val:])
    tcfg = training.TrainConfig(epochs=cfg.epochs, lr=cfg.lr, patience=1 if epochs else cfg.patience,
                                hidden=champ.config["sizes"]["hidden"],
                                neuron_rank=champ.config["sizes"]["neuron_rank"], seed=seed)
    select = None
    if epochs is not None:
        done = iter(range(cfg.epochs + 1))

        def select(module):  # every epoch up to `epochs` beats the one before; the next ends the fit
            n = next(done)
            return float(n) if n < epochs else float("-inf")
    elif select_with is not None:
        rt, sparsity, mode = select_with
        replay = Replayer(rt, val.pairs[:SELECT_PAIRS])  # val is a seeded shuffle: a fair subset

        def select(module):
            pred = artifact.LoadedPredictor("shadowllm", champ.criterion, champ.config, module)
            return -replay.fidelity(pred.method(sparsity, mode, rt.shape))["kl_mean"]

    module, metrics = training.finetune_shadowllm(champ.module, train.x, train.heads, train.neurons,
                                                  val.x, val.heads, val.neurons, tcfg, select=select)
    return module, metrics, tcfg, train


def main(settings) -> dict:
    cfg = settings.adapt
    policy = cfg.targets
    r = redis_client(settings.redis)
    registry = job_registry(settings)
    reader = sample_reader(r, settings.redis.prefix)
    episode = RolloutStore(r, settings.redis.prefix).state().get("drift")
    skipped = skip_before(reader, episode["since"] - cfg.drift_lookback_s) if episode else 0
    n = available(reader)
    if n < cfg.min_samples:
        return {"status": "skipped", "reason": f"{n} new shadow samples, {cfg.min_samples} needed",
                "skipped_before_drift": skipped}

    t0 = time.time()
    records = JobRecords(r, settings.redis.prefix)
    records.phase("finetune", "loading")
    champion = champion_version(settings, registry, r)
    loaded = load_model(settings)
    rt = loaded.runtime
    fingerprint = traces.model_fingerprint(rt.model)
    champ_folder = registry.download(champion)
    champ = artifact.load_predictor(champ_folder, rt.shape, fingerprint)
    if champ.kind != "shadowllm":
        return {"status": "skipped", "reason": f"champion {champion} is a {champ.kind} predictor; only "
                                               "shadowllm predictors are fine-tuned"}
    entries = read_samples(reader, cfg.max_samples)
    all_specs, all_ids, bad = sample_specs(entries, loaded, policy)
    if bad:
        r.xack(reader.stream, GROUP, *bad)
    specs, ids = dedupe(all_specs, all_ids)
    if len(specs) < cfg.min_samples:
        return {"status": "skipped", "reason": f"{len(specs)} usable shadow samples of distinct prompts, "
                                               f"{cfg.min_samples} needed", "unusable": len(bad),
                "duplicates": len(all_specs) - len(specs)}
    window = f"{all_ids[0]}..{all_ids[-1]}"
    # the mixture read: how many of the samples arrived during the drift episode (after its
    # start less the lookback, the rest are older traffic)
    in_episode = (sum(_id_key(i)[0] >= int(episode["since"] * 1000) for i in all_ids) if episode else None)

    def ack():
        r.xack(reader.stream, GROUP, *all_ids)

    done = registry.versions(tag="data_window", value=window)
    if done:  # a retry of a run that registered but was killed before it acknowledged
        ack()
        return {"status": "already_registered", "version": str(done[0].version), "data_window": window}

    champ_info = registry.version(champion).tags or {}
    families = [f for f in (champ_info.get("families") or ",".join(tasks.FAMILIES)).split(",") if f]
    state = ControlStore(r, settings.redis.prefix).get()
    sparsity = state.sparsity if state else settings.serve.defaults.sparsity
    mode = settings.runtime.mode

    # held out by prompt hash (at least 2 on each side); the rest plus replay is training data
    records.phase("finetune", "scoring")
    hold_idx = [i for i, s in enumerate(specs) if in_holdout(s, cfg.holdout)]
    if len(hold_idx) < 2 or len(specs) - len(hold_idx) < 2:
        hold_idx = sorted(range(len(specs)), key=lambda i: specs[i].key())[:max(2, round(cfg.holdout * len(specs)))]
    held = set(hold_idx)
    new = score_examples(loaded, specs, ids, policy, champ.criterion)
    hold = new.take(sorted(held))
    fresh = new.take([i for i in range(len(new)) if i not in held])
    with tempfile.TemporaryDirectory(prefix="shadowgate-finetune-") as tmp:
        work = Path(tmp)
        replay = []
        if cfg.replay_per_family > 0:
            replay.append(suite_examples(loaded, families, cfg.replay_per_family, work, champ.criterion, policy))
        prior = Examples.load(champ_folder / TRAINING_DIR, loaded, policy, champ.criterion)
        replay.append(prior)
        replay_rows = sum(len(x) for x in replay if x is not None)

        records.phase("finetune", "training")
        t_train = time.time()
        module, train_metrics, tcfg, train = _fit(champ, Examples.cat([fresh, *replay]), cfg,
                                                  select_with=(rt, sparsity, mode))
        train_s = time.time() - t_train
        cand = artifact.LoadedPredictor("shadowllm", champ.criterion, champ.config, module)
        records.phase("finetune", "evaluating")

        old_instances = [i for i in tasks.split("validation", cfg.replay_holdout_per_family) if i.family in families]
        learnt = prior.pairs[:: max(1, len(prior) // LEARNT_EVAL)][:LEARNT_EVAL] if prior is not None else []
        replay_new = Replayer(rt, hold.pairs)
        old_pairs = [(x.prompt_ids, x.labels) for x in suite_specs(rt.model, loaded.tokenizer, old_instances, False,
                                                                   policy)]
        replay_old = Replayer(rt, old_pairs + learnt)
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
        # the absolute target: on the held-out traffic, as close to the dense model as the
        # champion is on what it was trained for (both on the answer span)
        target_kl = TARGET_RATIO * k_old
        target_met = c_kl <= target_kl
        reasons = []
        if gain < cfg.min_gain:
            reasons.append(f"held-out mean KL {c_kl:.4f} vs champion {k_kl:.4f}: gain {gain:.1%} < "
                           f"adapt.min_gain {cfg.min_gain:.1%}")
        if forget > cfg.max_forget:
            reasons.append(f"mean KL on the champion's families {c_old:.4f} vs {k_old:.4f}: rises "
                           f"{forget:.1%} > adapt.max_forget {cfg.max_forget:.1%}")
        refit = None
        if not reasons and cfg.refit:
            # the gate passed on held-out data: the registered weights learn from it too, if
            # the refit keeps what the gate measured (it has seen the held-out samples, so it
            # must do at least as well on them, and forget no more than the gate allows)
            records.phase("finetune", "refit")
            epochs = int(train_metrics.get("epoch", cfg.epochs - 1)) + 1
            r_module, _, r_tcfg, r_train = _fit(champ, Examples.cat([fresh, hold, *replay]), cfg, epochs=epochs)
            r_method = artifact.LoadedPredictor("shadowllm", champ.criterion, champ.config,
                                                r_module).method(sparsity, mode, rt.shape)
            r_kl, r_old = replay_new.fidelity(r_method)["kl_mean"], replay_old.fidelity(r_method)["kl_mean"]
            refit = {"epochs": epochs, "rows": len(r_train), "holdout_kl": round(r_kl, 5), "old_kl": round(r_old, 5),
                     "kept": r_kl <= c_kl and (r_old - k_old) / max(k_old, KL_FLOOR) <= cfg.max_forget}
            if refit["kept"]:
                module, tcfg, train = r_module, r_tcfg, r_train
            else:
                log.warning("fine-tune: the refit is not registered (held-out KL %.4f vs %.4f before it, old KL "
                            "%.4f vs champion %.4f); the gated weights are", r_kl, c_kl, r_old, k_old)

        # the candidate's folder: weights + config, its drift reference (the prompts it was
        # trained on) and the shadow examples it learnt from (replayed by its own fine-tunes)
        out = work / "predictor"
        metrics = {**train_metrics, "gain": gain, "forget": forget}
        ts = traces.TraceSet(manifest={"version": f"shadow:{window}"}, tensors={"predictor_input": train.x},
                             metas=[{}] * len(train))
        artifact.save_predictor(out, "shadowllm", champ.criterion, module, rt.shape, fingerprint, metrics, ts, tcfg)
        kept = grow_replay(prior, new, TRAINING_KEEP)
        kept.save(out / TRAINING_DIR, policy)
        ref = Examples.cat([fresh, hold, *replay])
        final = artifact.LoadedPredictor("shadowllm", champ.criterion, champ.config, module)
        basis = drift.fit_basis(ref.x)
        heads, neurons = drift.scores_for(final, ref.x)
        lens = [len(s.prompt_ids) for s in ref.specs]
        rows = drift.feature_rows(basis, ref.x, lens, heads, neurons)
        drift.write_reference(out, basis, pd.DataFrame(rows, columns=drift.feature_columns(basis.k)))
        (work / "eval.json").write_text(json.dumps({**evaluation, "target_kl": target_kl, "target_met": target_met,
                                                    "refit": refit}, indent=2))
        plot(evaluation, work / "fidelity.png")

        records.phase("finetune", "logging")
        run_tags = {"shadowgate.kind": "finetune", "parent_version": champion, "data_window": window}
        run_id = registry.start_run(EXPERIMENT, tags=run_tags)
        client = registry.client
        params = {"samples": len(all_specs), "distinct_prompts": len(specs), "holdout": len(hold),
                  "train_rows": len(train), "replay_rows": replay_rows, "families_replayed": ",".join(families),
                  "epochs": cfg.epochs, "lr": cfg.lr, "sparsity": sparsity, "mode": mode,
                  "criterion": champ.criterion, "parent_version": champion, "target_policy": policy.name(),
                  "refit_epochs": refit["epochs"] if refit else 0, "refit_kept": bool(refit and refit["kept"]),
                  "episode_samples": in_episode if in_episode is not None else -1}
        for k, v in params.items():
            client.log_param(run_id, k, v)
        flat = {f"{who}.{s}.{m}": v for who, d in evaluation.items() for s, dd in d.items()
                for m, v in dd.items() if isinstance(v, float)}
        for k, v in {**flat, "gain": gain, "forget": forget, "train_s": train_s, "target_kl": target_kl,
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
                     "target_kl": f"{target_kl:.5f}", "target_met": str(target_met).lower(),
                     "replay_samples": str(len(kept)), "target_policy": policy.name(),
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
              "parent_version": champion, "data_window": window, "samples": len(all_specs),
              "distinct_prompts": len(specs), "skipped_before_drift": skipped, "episode_samples": in_episode,
              "episode": episode.get("episode") if episode else None, "holdout": len(hold),
              "replay_rows": replay_rows,
              "replay_kept": len(kept), "run_id": run_id, "gain": round(gain, 4), "forget": round(forget, 4),
              "candidate_holdout_kl": round(c_kl, 5), "champion_holdout_kl": round(k_kl, 5),
              "target_kl": round(target_kl, 5), "target_met": target_met, "refit": refit,
              "reasons": reasons, "train_s": round(train_s, 2), "duration_s": round(time.time() - t0, 2)}
    RolloutStore(r, settings.redis.prefix).decide("candidate" if version else "not_registered", version,
                                                  result, by="finetune")
    log.info("fine-tune: %s", result)
    return result
