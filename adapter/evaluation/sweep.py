"""`shadowgate eval`: accuracy and perplexity of every method against sparsity, through the
gated runtime (real sparse execution), plus predictor rank correlations, and the plot.

Predictor folder layout (what `shadowgate predictor build` writes):
  <dir>/shadowllm-<criterion>/  for each criterion   (the unified predictor)
  <dir>/dejavu-l2norm/                                (per-layer magnitude predictors)
  <dir>/static-plainact/                              (one mask from mean importance)
Every folder holding a predictor.json is evaluated, by its kind, and its rows name it: a
set may hold more, e.g. <dir>/dejavu-l2norm-ffn/ (`predictor train --kind dejavu
--dejavu-neuron-input ffn_input`, neurons chosen from the FFN input) beside dejavu-l2norm.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from adapter.evaluation import scoring as evaluate

from adapter.selection import artifact, methods
from adapter.selection.methods import dense

from adapter.embedded import suite as tasks

from adapter.pipeline import traces

from adapter.pipeline import train as training
from adapter.pipeline.criteria import CRITERIA

SPARSITIES = (0.3, 0.5, 0.7)
MODES = ("per_layer", "global")


def load_set(folder: Path, shape, fingerprint: str) -> dict[str, artifact.LoadedPredictor]:
    found = {}
    for sub in sorted(Path(folder).glob("*/predictor.json")):
        found[sub.parent.name] = artifact.load_predictor(sub.parent, shape, fingerprint)
    if not found:
        raise FileNotFoundError(f"no predictors under {folder}: run `shadowgate predictor build`")
    return found


DEJAVU_VARIANTS = ("all_tokens", "decode_only")


def _configs(preds: dict, sparsities, modes, head_selection: str = "heads",
             dejavu_variants=("all_tokens",)):
    """(method name, criterion, mode, sparsity, method object, predictor folder name) to
    evaluate; the sequence-level methods select heads by `head_selection` (dejavu computes
    every KV group regardless).

    dejavu_variants: "all_tokens" gates prompt tokens too (equal terms with the sequence-level
    methods; its mode is reported as per_layer), "decode_only" gates only the tokens after the
    prompt, as DejaVu does and as its predictors were trained (mode "decode_only")."""
    if unknown := set(dejavu_variants) - set(DEJAVU_VARIANTS):
        raise ValueError(f"unknown dejavu variants {sorted(unknown)}: use {', '.join(DEJAVU_VARIANTS)}")
    out = []
    for s in sparsities:
        for name, lp in preds.items():
            if lp.kind == "dejavu":
                for variant in dejavu_variants:
                    sparse_prompt = variant == "all_tokens"
                    out.append(("dejavu", lp.criterion, "per_layer" if sparse_prompt else "decode_only", s,
                                methods.make_method("dejavu", s, lp.module_shape, lp.module,
                                                    sparse_prompt=sparse_prompt), name))
            elif lp.kind == "static":
                for mode in modes:
                    out.append(("static", lp.criterion, mode, s,
                                lp.method(s, mode, lp.module_shape, head_selection), name))
            elif lp.criterion == "plainact":
                for mode in modes:
                    out.append(("shadowllm", lp.criterion, mode, s, lp.method(s, mode, None, head_selection), name))
            else:  # other criteria: per-layer only, to compare criteria
                out.append(("shadowllm", lp.criterion, "per_layer", s,
                            lp.method(s, "per_layer", None, head_selection), name))
    return out


def spearman_table(preds: dict, test: traces.TraceSet) -> dict:
    out = {}
    x = test.tensors["predictor_input"]
    for name, lp in preds.items():
        if lp.kind != "shadowllm":
            continue
        yh, yn = training._unified_targets(test, lp.criterion)
        with torch.no_grad():
            ph, pn = lp.module(x)
        # keyed by criterion; a set holding several predictors of one criterion by folder name
        key = lp.criterion if name == f"shadowllm-{lp.criterion}" else name
        out[key] = {"heads": round(float(training.spearman(ph, yh).mean()), 4),
                             "neurons": round(float(training.spearman(pn, yn).mean()), 4)}
    for name, lp in preds.items():
        if lp.kind == "static":
            m = training.static_metrics(test, lp.criterion, lp.module)
            out[f"static-{lp.criterion}"] = {"heads": round(m["rho_heads"], 4), "neurons": round(m["rho_neurons"], 4)}
    for name, lp in preds.items():
        if lp.kind == "dejavu":  # per token, keyed by folder name (its neuron input differs)
            x, yh, yn = training._token_targets(test, lp.module.neuron_input)
            with torch.no_grad():
                ph, pn = training.dejavu_scores(lp.module, x)
            out[name] = {"heads": round(float(training.spearman(ph, yh).mean()), 4),
                         "neurons": round(float(training.spearman(pn, yn).mean()), 4)}
    return out


def run_eval(runtime, tokenizer, model_name: str, predictor_dir: Path, data_dir: Path | None,
             quick: bool = False, plot_path: Path | None = None, sparsities=SPARSITIES, modes=MODES,
             per_family: int | None = None, text_sentences: int | None = None,
             dejavu_variants=("all_tokens",)) -> dict:
    fingerprint = traces.model_fingerprint(runtime.model)
    preds = load_set(predictor_dir, runtime.shape, fingerprint)
    per_family = per_family or (25 if quick else 100)
    instances = tasks.split("test", per_family)
    ppl_pairs = evaluate.text_pairs(tokenizer, tasks.heldout_text(text_sentences or (100 if quick else 400)))

    def measure(method):
        acc = evaluate.accuracy(evaluate.runtime_score_fn(runtime, method), tokenizer, instances)
        ppl = evaluate.pair_perplexity(evaluate.runtime_score_fn(runtime, method), ppl_pairs)
        return acc, ppl

    # rank correlations first: a test split that lacks a field a predictor reads fails here,
    # before the long measurement
    if data_dir is not None:
        spearman = spearman_table(preds, traces.load_split(data_dir, "test"))
    else:
        spearman = {lp.criterion: {"heads": round(lp.config["metrics"]["rho_heads"], 4),
                                   "neurons": round(lp.config["metrics"]["rho_neurons"], 4)}
                    for lp in preds.values() if lp.kind == "shadowllm"}
    dense_acc, dense_ppl = measure(dense())
    # effective sparsity is per prompt for shadowllm: the mean over prompts of every family
    sample = [p for p, _ in evaluate.encode_pairs(tokenizer, instances[::max(1, len(instances) // 30)])]
    results = []
    head_selection = runtime.config.head_selection
    configs = _configs(preds, sparsities, modes, head_selection, dejavu_variants)
    for name, criterion, mode, s, method, folder in tqdm(configs, desc="eval", unit="config"):
        acc, ppl = measure(method)
        effective = [runtime.prefill(prompt, method, 0)[0].effective_sparsity for prompt in sample]
        inputs = {"neuron_input": preds[folder].module.neuron_input} if name == "dejavu" else {}
        results.append({"method": name, "predictor": folder, **inputs, "criterion": criterion,
                        "mode": mode, "sparsity": s,
                        "head_selection": "heads" if name == "dejavu" else head_selection,
                        "accuracy": round(acc["mean"], 4), "perplexity": round(ppl, 4),
                        "effective_sparsity": round(sum(effective) / len(effective), 4),
                        "families": {f: round(v, 4) for f, v in acc["families"].items()}})
    out = {
        "model": model_name, "n_test": len(instances), "quick": quick, "head_selection": head_selection,
        "dense": {"accuracy": round(dense_acc["mean"], 4), "perplexity": round(dense_ppl, 4),
                  "families": {f: round(v, 4) for f, v in dense_acc["families"].items()}},
        "results": results, "spearman": spearman,
    }
    if plot_path is not None:
        plot(out, plot_path)
        out["plot"] = str(plot_path)
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    lines: dict[str, list] = {}
    for r in report["results"]:
        # a predictor folder of another name than <method>-<criterion> (a second dejavu, say)
        # gets its own line, labelled by the folder
        folder = r.get("predictor", f"{r['method']}-{r['criterion']}")
        label = (f"{r['method']}/{r['criterion']}" if folder == f"{r['method']}-{r['criterion']}" else folder) \
            + ("" if r["mode"] == "per_layer" else f" ({r['mode']})")
        lines.setdefault(label, []).append(r)
    for label, rows in sorted(lines.items()):
        rows = sorted(rows, key=lambda r: r["sparsity"])
        xs = [0.0] + [r["sparsity"] for r in rows]
        style = "--" if label.endswith("(global)") else ":" if label.endswith("(decode_only)") else "-"
        axes[0].plot(xs, [report["dense"]["accuracy"]] + [r["accuracy"] for r in rows], style, marker="o", label=label)
        axes[1].plot(xs, [report["dense"]["perplexity"]] + [r["perplexity"] for r in rows], style, marker="o", label=label)
    axes[0].set_title("5-shot exact-match accuracy (test split)")
    axes[0].set_ylabel("accuracy")
    axes[1].set_title("perplexity of held-out text")
    axes[1].set_ylabel("perplexity")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("sparsity (fraction of heads and neurons skipped in layers >= 1)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{report['model']}: sparse vs dense (sparsity 0 = dense)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
