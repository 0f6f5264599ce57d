"""Offline ablation of the fine-tune's target policy (adapter.pipeline.targets).

The adaptation scenario (docs/ADAPTATION.md) changed targets, data and training settings
together, so it cannot say which decides how much a narrow champion learns from ~500
samples of new-family traffic. This command holds data and training fixed and varies only
the TargetPolicy, with the fine-tune job's own steps (jobs/finetune.py): a champion trained
on KNOWN families; "traffic" of NEW families from the suite's traffic split, targets made
as the shadow path makes them (dense pseudo-labels cut by the policy); replay of the
champion's suite training data under the same policy; the job's own fit (jobs.finetune._fit:
a seeded 1/8 validation split, the epoch with the lowest replayed KL on it) from the
champion's weights with the scenario's settings. Every candidate is scored by exact-match
accuracy through the gated runtime and by KL against the dense model on the answer span and
its terminator of the NEW test prompts.

  .venv/bin/python -m jobs.target_ablation --out docs/target_ablation.json \
      --plot docs/target_ablation.png [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from adapter.embedded import suite as tasks
from adapter.evaluation import scoring as evaluate
from adapter.pipeline import targets, traces
from adapter.pipeline import train as training
from adapter.pipeline.collect import suite_specs
from adapter.pipeline.targets import TargetPolicy
from adapter.selection import artifact
from adapter.selection.methods import dense
from jobs.config import AdaptSettings
from jobs.finetune import Examples, _fit
from monitor.fidelity import compare

KNOWN = ["mod_add", "successor", "lexicon"]  # serving/bench/adapt.py: the champion's families
NEW = ["table_lookup", "kv_recall", "reverse"]  # ... and the families the traffic shifts to
CRITERION = "plainact"  # the served predictor's criterion (jobs/bootstrap.py SERVED)

BASE_ARMS = [TargetPolicy(continuation=c, max_tokens=m, prompt=p, continuations=1)
             for c, m in (("stop", TargetPolicy().max_tokens), ("tokens", 4))
             for p in ("none", "predictable", "all")]
# the default's lever beside it: every target token weighing the same, or by its loss
BASE_ARMS += [TargetPolicy(continuation="stop", prompt=p, equalize=False) for p in ("none", "predictable")]


@dataclass(frozen=True)
class Setup:
    """What one ablation run measures; recorded whole in the JSON."""

    traffic_per_family: int = 170  # ~500 samples: what one fine-tune of the live scenario learnt from
    replay_per_family: int = 100  # adapt.replay_per_family
    replay_pseudo_labels: bool = False  # the job replays suite instances with their labels
    test_per_family: int = 100
    epochs: int = 60  # the scenario's adapt settings (serving/cli/bench.py ADAPT_STACK)
    lr: float = 1e-3
    patience: int = 12
    champion_per_family: int = 150  # serving.bench.monitor.narrow_predictor
    champion_epochs: int = 30
    champion_seed: int = 0  # TrainConfig's default, as narrow_predictor trains it
    champion_policy: TargetPolicy = TargetPolicy()  # the default at start, as narrow_predictor's collect
    sparsity: float = 0.5
    mode: str = "global"
    seeds: tuple[int, ...] = (0, 1, 2)  # fine-tune seed: validation split and training order
    arms: tuple[TargetPolicy, ...] = tuple(BASE_ARMS)
    multi_continuations: int = 4
    multi_top: int = 2  # base arms re-run with multi_continuations, best by new-family accuracy
    quick: bool = False

    def record(self) -> dict:
        out = asdict(self)
        out["arms"] = [a.model_dump() for a in self.arms]
        out["champion_policy"] = self.champion_policy.model_dump()
        out["seeds"] = list(self.seeds)
        return out


QUICK = Setup(traffic_per_family=20, replay_per_family=10, test_per_family=10, epochs=3, patience=3,
              champion_per_family=20, champion_epochs=3, seeds=(0,),
              arms=(BASE_ARMS[1], BASE_ARMS[4]), multi_top=1, quick=True)


def rows_of(loaded, instances: list[tasks.Instance], policy: TargetPolicy, pseudo_labels: bool, source: str,
            batch_size: int = 32) -> tuple[Examples, dict]:
    """Targets of `instances` as the collector and the shadow path make them (suite_specs +
    targets.score), with what the policy made of them: target counts and how often the
    continuation targets start with the true answer (the dense model got it right)."""
    model, tok, shape = loaded.runtime.model, loaded.tokenizer, loaded.runtime.shape
    common = {"model_fingerprint": traces.model_fingerprint(model), "source": source,
              "targets": "pseudo_labels" if pseudo_labels else "labels"}
    records, label_lens, positions, right = [], [], [], []
    for start in tqdm(range(0, len(instances), batch_size), desc=f"targets {source} {policy.name()}",
                      unit="batch", leave=False):
        chunk = instances[start:start + batch_size]
        specs = suite_specs(model, tok, chunk, pseudo_labels, policy)
        metas = [{"family": i.family, "prompt_len": len(s.prompt_ids)} for i, s in zip(chunk, specs)]
        records += targets.score(model, tok, shape, specs, policy, metas, common, batch_size)
        for inst, spec in zip(chunk, specs):
            answer = tok.encode(inst.answer, add_special_tokens=False)
            label_lens.append(len(spec.labels))
            positions.append(len(spec.positions))
            right.append(spec.labels[:len(answer)] == answer)
    stats = {"rows": len(records), "label_tokens_mean": statistics.fmean(label_lens),
             "prompt_targets_mean": statistics.fmean(positions), "labels_start_with_answer": statistics.fmean(right)}
    return Examples.from_records(records, CRITERION), stats


def train_champion(loaded, work: Path, setup: Setup) -> artifact.LoadedPredictor:
    """The narrow champion: serving.bench.monitor.narrow_predictor's steps, less the drift
    reference this ablation does not use; its policy pinned in the setup (the default may
    change between runs)."""
    from adapter.pipeline.build import train_one
    from adapter.pipeline.collect import collect

    rt = loaded.runtime
    data = collect(rt.model, loaded.tokenizer, work / "traces",
                   {"train": setup.champion_per_family, "validation": max(4, setup.champion_per_family // 5)},
                   families=KNOWN, policy=setup.champion_policy)
    out = work / "narrow"
    torch.manual_seed(setup.champion_seed)  # train_shadowllm initialises the module before _fit seeds
    train_one("shadowllm", CRITERION, data, out, rt,
              training.TrainConfig(epochs=setup.champion_epochs, seed=setup.champion_seed))
    return artifact.load_predictor(out, rt.shape, traces.model_fingerprint(rt.model))


def finetune(champ: artifact.LoadedPredictor, data: Examples, seed: int, setup: Setup,
             rt) -> tuple[artifact.LoadedPredictor, dict]:
    """The fine-tune job's own step (jobs.finetune._fit): 1/8 of the rows validate, the
    epoch kept is the one with the lowest replayed KL on them. `seed`: the training order."""
    cfg = AdaptSettings(epochs=setup.epochs, lr=setup.lr, patience=setup.patience)
    t0 = time.time()
    torch.manual_seed(seed)
    module, metrics, _, train = _fit(champ, data, cfg, select_with=(rt, setup.sparsity, setup.mode), seed=seed)
    info = {"train_s": time.time() - t0, "train_rows": len(train), "rho_heads": metrics["rho_heads"],
            "rho_neurons": metrics["rho_neurons"], "best_epoch": metrics["epoch"]}
    return artifact.LoadedPredictor("shadowllm", champ.criterion, champ.config, module), info


class Evaluator:
    """Exact-match accuracy on the test prompts of every family (one pass through the gated
    runtime) and KL against the dense model on the NEW answer spans with their terminator
    (" ;": what a served answer that stops where the dense one does carries; the fine-tune
    job's held-out measure under the default policy)."""

    def __init__(self, loaded, instances: list[tasks.Instance]):
        self.rt, self.tok, self.instances = loaded.runtime, loaded.tokenizer, instances
        self.pairs = evaluate.encode_pairs(self.tok, instances)
        self.new_idx = [i for i, inst in enumerate(instances) if inst.family in NEW]
        semi = self.tok.encode(";", add_special_tokens=False)
        self.kl_pairs = {i: (self.pairs[i][0], self.pairs[i][1] + semi) for i in self.new_idx}
        self.dense = {i: self.rt.score(*self.kl_pairs[i], dense()) for i in self.new_idx}

    def __call__(self, method) -> dict:
        logits: list[torch.Tensor] = []
        base = evaluate.runtime_score_fn(self.rt, method)

        def score(pairs):
            out = base(pairs)
            logits.extend(out)
            return out

        acc = evaluate.accuracy(score, self.tok, self.instances)
        fams = acc["families"]
        hits = [bool((lg.argmax(-1) == torch.tensor(a)).all()) for lg, (_, a) in zip(logits, self.pairs)]
        kls = [compare(self.dense[i], self.rt.score(*self.kl_pairs[i], method), self.kl_pairs[i][1]).kl_mean
               for i in self.new_idx]
        return {"new": statistics.fmean(fams[f] for f in NEW), "known": statistics.fmean(fams[f] for f in KNOWN),
                "kl_new": statistics.fmean(kls), "families": fams, "hits_new": [hits[i] for i in self.new_idx]}


def binomial_se(families: dict[str, float], names: list[str], n: int) -> float:
    """Standard error of the mean over `names` of per-family accuracies on n prompts each."""
    return math.sqrt(sum(families[f] * (1 - families[f]) / n for f in names)) / len(names)


def summarise(name: str, kind: str, policy: TargetPolicy | None, runs: list[dict], n_test: int,
              data_stats: dict | None = None) -> dict:
    """One table row: means over seeds, their spread, and the test-sample standard error."""
    def agg(key: str) -> float:
        return statistics.fmean(r[key] for r in runs)

    def sd(key: str) -> float:
        return statistics.stdev(r[key] for r in runs) if len(runs) > 1 else 0.0

    families = {f: statistics.fmean(r["families"][f] for r in runs) for f in runs[0]["families"]}
    row = {"name": name, "kind": kind, "policy": policy.model_dump() if policy else None,
           "new": agg("new"), "new_sd_seeds": sd("new"), "new_se_test": binomial_se(families, NEW, n_test),
           "known": agg("known"), "known_sd_seeds": sd("known"),
           "kl_new": agg("kl_new"), "kl_new_sd_seeds": sd("kl_new"),
           "families": families, "seeds": [{k: v for k, v in r.items() if k != "hits_new"} for r in runs]}
    for key in ("train_s", "train_rows", "val_rows", "rho_heads", "rho_neurons", "champion_rho_heads",
                "champion_rho_neurons"):
        if key in runs[0]:
            row[key] = agg(key)
    if data_stats:
        row["data"] = data_stats
    row["hits_new"] = [statistics.fmean(h) for h in zip(*(r["hits_new"] for r in runs))]
    return row


def paired(a: dict, b: dict) -> dict:
    """a minus b in new-family accuracy over the same test prompts (per-prompt hits averaged
    over seeds), with the paired standard error: tighter than two independent ones."""
    diff = [x - y for x, y in zip(a["hits_new"], b["hits_new"])]
    se = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
    return {"vs": b["name"], "diff": statistics.fmean(diff), "se_paired": se}


SOURCES = ("adapter/pipeline/targets.py", "adapter/pipeline/collect.py", "adapter/pipeline/criteria.py",
           "adapter/pipeline/train.py")  # what the measured policy and fine-tune are made of


def source_digests() -> dict[str, str | None]:
    """sha1 of the files that define what is measured: taken at the start and the end, so a
    report whose code changed under it (a shared working tree) says so."""
    root = Path(__file__).resolve().parents[2]
    return {f: hashlib.sha1((root / f).read_bytes()).hexdigest()[:12] if (root / f).exists() else None
            for f in SOURCES}


def machine() -> dict:
    """Taken when the run starts: the code measured is the code at this commit."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        head, dirty = None, None
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "arch": platform.machine(), "git_head": head, "git_dirty": dirty}


def run(setup: Setup, work: Path) -> dict:
    from adapter.config import RuntimeConfig
    from adapter.runtime.loading import load

    t0 = time.time()
    host, sources = machine(), source_digests()
    loaded = load("default", RuntimeConfig(dtype="float32", threads=1))
    rt = loaded.runtime
    champ = train_champion(loaded, work, setup)
    traffic = [i for i in tasks.split("traffic", setup.traffic_per_family) if i.family in NEW]
    replay = [i for i in tasks.split("train", setup.replay_per_family) if i.family in KNOWN]
    test = [i for i in tasks.split("test", setup.test_per_family) if i.family in NEW + KNOWN]
    evaluator = Evaluator(loaded, test)
    n = setup.test_per_family

    rows = [summarise("dense", "reference", None, [evaluator(dense())], n)]
    rows.append(summarise("narrow champion", "reference", None,
                          [evaluator(champ.method(setup.sparsity, setup.mode, rt.shape))], n))
    from jobs.bootstrap import shipped_predictor

    shipped_dir = shipped_predictor("default", rt)
    if shipped_dir is None:
        raise FileNotFoundError("the embedded model's shipped all-family predictor is missing or stale")
    shipped = artifact.load_predictor(shipped_dir, rt.shape, traces.model_fingerprint(rt.model))
    rows.append(summarise("offline all-family", "reference", None,
                          [evaluator(shipped.method(setup.sparsity, setup.mode, rt.shape))], n))

    def arm(policy: TargetPolicy, bar: tqdm) -> dict:
        new = rows_of(loaded, traffic, policy, True, "traffic")
        old = rows_of(loaded, replay, policy, setup.replay_pseudo_labels, "replay")
        new, new_stats = new
        old, old_stats = old
        data = Examples.cat([new, old])
        runs = []
        for seed in setup.seeds:
            bar.set_description(f"arm {policy.name()} seed {seed}")
            cand, info = finetune(champ, data, seed, setup, rt)
            runs.append({**evaluator(cand.method(setup.sparsity, setup.mode, rt.shape)), **info, "seed": seed})
            bar.update(1)
        return summarise(policy.name(), "arm", policy, runs, n, {"traffic": new_stats, "replay": old_stats})

    steps = (len(setup.arms) + setup.multi_top) * len(setup.seeds)
    with tqdm(total=steps, desc="ablation", unit="fine-tune") as bar:
        base = [arm(p, bar) for p in setup.arms]
        best = sorted(base, key=lambda r: -r["new"])[:setup.multi_top]
        multi = [arm(TargetPolicy(**r["policy"]).model_copy(update={"continuations": setup.multi_continuations}), bar)
                 for r in best]
    arms = base + multi
    rows += arms
    ranked = sorted(arms, key=lambda r: -r["new"])
    winner = ranked[0]
    default = TargetPolicy().model_dump()  # adapt.targets' default: what the job and the collector use
    comparisons = [{**paired(winner, r), **({"note": "the default policy"} if r["policy"] == default else {})}
                   for r in ranked[1:] + [rows[1]]]
    for r in rows:
        r.pop("hits_new")
    return {"what": "offline ablation of the fine-tune's target policy (jobs.target_ablation)",
            "known_families": KNOWN, "new_families": NEW, "criterion": CRITERION,
            "settings": setup.record(), "machine": host, "sources": sources,
            "default_policy": default,
            "champion": {"sizes": champ.config["sizes"], "metrics": champ.config["metrics"],
                         "families": KNOWN, "per_family": setup.champion_per_family, "epochs": setup.champion_epochs,
                         "policy": setup.champion_policy.model_dump(), "targets": "labels",
                         "how": "serving.bench.monitor.narrow_predictor's collect + train_one (no drift reference)"},
            "rows": rows, "winner": {"name": winner["name"], "new": winner["new"], "paired": comparisons},
            "notes": notes(setup) + changed(sources), "wall_s": round(time.time() - t0, 1)}


def changed(sources: dict[str, str | None]) -> list[str]:
    now = source_digests()
    moved = [f for f in sources if sources[f] != now[f]]
    return [f"WARNING: {', '.join(moved)} changed during the run; the measurement used the code loaded at "
            "its start (sources)"] if moved else []


def notes(setup: Setup) -> list[str]:
    out = [f"accuracy: exact match through the gated runtime at sparsity {setup.sparsity}, mode {setup.mode}, on "
           f"{setup.test_per_family} test prompts per family; new/known are means over 3 families",
           "new_se_test: binomial standard error of the new-family mean from the test sample alone; "
           "new_sd_seeds: spread over fine-tune seeds (one champion, one test set)",
           "paired: the winner minus each other row on the same new-family test prompts; se_paired is the "
           "standard error of that difference",
           "kl_new: mean over new-family test prompts of the mean KL(dense || sparse) over the answer tokens",
           "traffic: suite traffic split (never a validation/test prompt); targets from the dense model's greedy "
           "continuation (pseudo-labels) cut by the policy, stop string ';'; every traffic sample trains once (the "
           "job holds out adapt.holdout of the prompts by hash for its gate and refits a passing candidate on "
           "all; this ablation replaces the gate by the test split and does not refit)",
           f"the champion is trained once with labels under {setup.champion_policy.name()} (the default at the run's "
           "start, as narrow_predictor): arms close to that policy fine-tune towards targets of the same kind as "
           "the champion's own",
           f"replay: {setup.replay_per_family} suite train instances per known family with "
           f"{'pseudo-labels' if setup.replay_pseudo_labels else 'their labels'} under the arm's policy, as the "
           "job's suite replay"]
    if len(setup.seeds) == 1:
        out.append("one fine-tune seed only: new_sd_seeds is 0 and says nothing about seed spread")
    if setup.quick:
        out.append("--quick: a smoke run, not a measurement")
    return out


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"target policy ablation ({'quick' if report['settings']['quick'] else 'full'}, "
                        f"{len(report['settings']['seeds'])} seed(s), wall {report['wall_s']:.0f} s)")
    for col in ("row", "acc new", "± se(test)", "sd(seeds)", "acc known", "KL new", "rows", "rho h/n", "train s"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in report["rows"]:
        table.add_row(r["name"], f"{r['new']:.3f}", f"{r['new_se_test']:.3f}", f"{r['new_sd_seeds']:.3f}",
                      f"{r['known']:.3f}", f"{r['kl_new']:.4f}",
                      str(int(r.get("train_rows", 0) + r.get("val_rows", 0)) or ""),
                      f"{r['rho_heads']:.3f}/{r['rho_neurons']:.3f}" if "rho_heads" in r else "",
                      f"{r['train_s']:.1f}" if "train_s" in r else "")
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(table)
    w = report["winner"]
    console.print(f"winner: {w['name']} (new-family accuracy {w['new']:.3f})")
    for c in w["paired"]:
        console.print(f"  vs {c['vs']}: {c['diff']:+.3f} ± {c['se_paired']:.3f} (paired se)"
                      + (f"  ({c['note']})" if "note" in c else ""))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["kind"] == "arm" or r["name"] == "narrow champion"]
    ref = next(r for r in report["rows"] if r["name"] == "offline all-family")
    dense_row = next(r for r in report["rows"] if r["name"] == "dense")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    names = [r["name"] for r in rows]
    colors = ["0.6" if r["kind"] == "reference" else ("C1" if r["name"] == report["winner"]["name"] else "C0")
              for r in rows]
    for ax, key, title in ((axes[0], "new", f"new families ({', '.join(NEW)})"),
                           (axes[1], "known", f"known families ({', '.join(KNOWN)})")):
        err = [r["new_se_test"] for r in rows] if key == "new" else None
        ax.bar(range(len(rows)), [r[key] for r in rows], color=colors, yerr=err, capsize=3)
        ax.axhline(ref[key], color="C3", lw=1.5, label=f"offline all-family {ref[key]:.3f}")
        ax.axhline(dense_row[key], color="k", lw=1, ls=":", label=f"dense {dense_row[key]:.3f}")
        ax.set_xticks(range(len(rows)), names, rotation=40, ha="right", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("exact-match accuracy")
        ax.legend(fontsize=8, loc="lower right")
    s = report["settings"]
    fig.suptitle(f"fine-tune target policy: accuracy at sparsity {s['sparsity']} ({s['mode']}), "
                 f"{s['test_per_family']} test prompts/family, {len(s['seeds'])} seed(s); error bars: test-sample se",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--plot", type=Path, help="the PNG bar chart")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (minutes), not a measurement")
    parser.add_argument("--seeds", type=int, nargs="+", help="fine-tune seeds (default: 0 1 2; --quick: 0)")
    parser.add_argument("--work", type=Path, help="keep the champion and its traces here (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a shared machine: leave the other cores alone
    setup = QUICK if args.quick else Setup()
    if args.seeds:
        setup = Setup(**{**setup.__dict__, "seeds": tuple(args.seeds)})
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        report = run(setup, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="target-ablation-") as tmp:
            report = run(setup, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(report, args.plot)
        report["plot"] = str(args.plot)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return report


if __name__ == "__main__":
    main()
