"""The `shadowgate` command line: the root app, its own commands (generate, eval, model,
predictor) and the command groups of serving/cli/, registered below in the order `--help`
lists them. Settings are loaded once per command, at its entry, and passed down."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from serving.cli import bench, keys, monitor, rollout, service
from serving.cli.common import ConfigOpt, JsonObjectOpt, console, fail, settings_or_exit

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="shadowgate: predictor-based contextual sparsity for LLM serving.")
model_app = typer.Typer(no_args_is_help=True, help="The embedded default models.")
predictor_app = typer.Typer(no_args_is_help=True, help="Importance traces and predictor training.")


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", help="Prompt text."),
    model: Optional[str] = typer.Option(None, "--model", help="default | default-opt | PATH | hub id."),
    max_tokens: int = typer.Option(16, "--max-tokens", min=0, max=4096),
    sparsity: float = typer.Option(0.5, "--sparsity", help="Fraction of units skipped, in [0, 1)."),
    method: str = typer.Option("shadowllm", "--method", help="dense | shadowllm | dejavu | static"),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    as_json: bool = JsonObjectOpt,
    predictors: Optional[Path] = typer.Option(None, "--predictors", help="Folder of trained predictors."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Generate from a prompt through the gated runtime."""
    from adapter.embedded.recipe import default_predictor_dir
    from adapter.selection.by_name import build_method
    from adapter.pipeline.traces import model_fingerprint
    from adapter.selection.artifact import PredictorMismatch
    from adapter.runtime.loading import ModelLoadError, load
    from adapter.runtime.gated import RequestError, SamplingParams

    settings = settings_or_exit(config)
    settings.runtime.apply_threads()
    if not 0.0 <= sparsity < 1.0:
        fail(f"--sparsity must be in [0, 1), got {sparsity}")
    try:
        name = model or settings.model.name
        loaded = load(name, settings.runtime)
        built = build_method(loaded.runtime.shape, method, sparsity, mode=settings.runtime.mode,
                             head_selection=settings.runtime.head_selection,
                             predictor_dir=predictors or default_predictor_dir(name),
                             fingerprint=model_fingerprint(loaded.runtime.model))
        ids = loaded.tokenizer.encode(prompt)
        stop = [loaded.tokenizer.eos_token_id] if loaded.tokenizer.eos_token_id is not None else []
        gen = loaded.runtime.generate([ids], built.method, max_tokens,
                                      SamplingParams(temperature=temperature, seed=seed), stop)[0]
    except (ModelLoadError, RequestError, PredictorMismatch, ValueError) as exc:
        fail(str(exc))
    text = loaded.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
    result = {"text": text, "token_ids": gen.token_ids, "sparsity": gen.sparsity,
              "effective_sparsity": round(gen.effective_sparsity, 4), "method": gen.method,
              "predictor": built.predictor, "finish_reason": gen.finish_reason,
              "model": loaded.name}
    if as_json:
        print(json.dumps(result))
    else:
        console.print(f"[bold]{prompt}[/] {text}")
        console.print(f"method={gen.method} sparsity={gen.sparsity} "
                        f"effective_sparsity={result['effective_sparsity']} predictor={built.predictor}")


@model_app.command("build")
def model_build(
    family: list[str] = typer.Option(["llama", "opt"], "--family", help="llama and/or opt."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output root (default: the embedded models folder)."),
    threads: int = typer.Option(2, "--threads", min=1, help="Torch threads (keep equal to reproduce bit-exactly)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Override the recipe's step count."),
    resume_from: Optional[Path] = typer.Option(
        None, "--resume-from", help="A saved model that is the recipe's result through --resume-stage."),
    resume_stage: int = typer.Option(0, "--resume-stage", min=0, max=2,
                                     help="The last stage --resume-from has done; later stages run."),
) -> None:
    """Train the tokenizer and the default models with the deterministic recipe."""
    from adapter.embedded import recipe as default_model

    bad = [f for f in family if f not in default_model.RECIPES]
    if bad:
        fail(f"unknown family {bad[0]!r}: use llama or opt")
    resume = None
    if resume_from is not None or resume_stage:
        if resume_from is None or not resume_stage or len(family) != 1:
            fail("--resume-from and --resume-stage go together, with exactly one --family")
        if not (resume_from / "config.json").exists():
            fail(f"--resume-from {resume_from}: no saved model there (config.json is missing)")
        resume = {family[0]: (resume_stage, resume_from)}
    root = out or default_model.DEFAULT_MODELS_DIR
    report = default_model.build(family, root, threads, {f: steps for f in family} if steps else None,
                                 resume)
    print(json.dumps(report, indent=2))


def _load_for_predictors(model: Optional[str], config: Optional[Path]):
    from adapter.runtime.loading import ModelLoadError, load

    settings = settings_or_exit(config)
    settings.runtime.apply_threads()
    name = model or settings.model.name
    try:
        # traces and training need float32 gradients whatever the serving dtype
        return name, load(name, settings.runtime.model_copy(update={"dtype": "float32"}))
    except ModelLoadError as exc:
        fail(str(exc))


@predictor_app.command("collect")
def predictor_collect(
    model: Optional[str] = typer.Option(None, "--model"),
    out: Optional[Path] = typer.Option(None, "--out", help="Dataset root (a new version v<N> is written)."),
    per_family: int = typer.Option(300, "--per-family", min=1, help="Training instances per task family."),
    pseudo_labels: bool = typer.Option(False, "--pseudo-labels", help="Label with the dense model's own greedy answers."),
    continuations: int = typer.Option(1, "--continuations", min=1,
                                      help="Average the targets over this many query answers (the label "
                                           "plus samples of the dense model)."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.01, help="Sampling temperature of those answers."),
    prompt_targets: str = typer.Option("none", "--prompt-targets", help="Prompt positions that are targets too: "
                                       "none, predictable or all (the target policy's; DejaVu's per-token "
                                       "predictors learn from every target position)."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Collect importance traces (every criterion) over the task suite, under the target
    policy the shadow path uses (adapter.pipeline.targets)."""
    from pydantic import ValidationError

    from adapter.pipeline.collect import collect
    from adapter.pipeline.targets import TargetPolicy
    from adapter.embedded.recipe import default_trace_dir

    try:
        policy = TargetPolicy(prompt=prompt_targets)
    except ValidationError:
        fail(f"--prompt-targets must be none, predictable or all, not {prompt_targets!r}")
    name, loaded = _load_for_predictors(model, config)
    splits = {"train": per_family, "validation": max(10, per_family // 6), "test": max(10, per_family // 6)}
    folder = collect(loaded.runtime.model, loaded.tokenizer, out or default_trace_dir(name), splits,
                     pseudo_labels=pseudo_labels, continuations=continuations, temperature=temperature,
                     policy=policy)
    print(json.dumps({"dataset": str(folder), "splits": splits}))


@predictor_app.command("train")
def predictor_train(
    criterion: str = typer.Option("plainact", "--criterion", help="plainact | fisher | l2norm | grad_norm"),
    kind: str = typer.Option("shadowllm", "--kind", help="shadowllm | dejavu | static"),
    model: Optional[str] = typer.Option(None, "--model"),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset root or version folder."),
    out: Optional[Path] = typer.Option(None, "--out", help="Predictor folder to write."),
    epochs: int = typer.Option(80, "--epochs", min=1),
    hidden: int = typer.Option(512, "--hidden", min=8, help="Width of the shadowllm predictor."),
    dejavu_rank: int = typer.Option(64, "--dejavu-rank", min=4, help="Width of each per-layer dejavu predictor."),
    dejavu_neuron_input: str = typer.Option(
        "layer_input", "--dejavu-neuron-input",
        help="What the dejavu neuron predictor reads: layer_input (the hidden state entering the layer) "
             "| ffn_input (the hidden state after its attention block; default folder dejavu-l2norm-ffn)."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Train one predictor on collected traces; prints its validation metrics."""
    from adapter.embedded.recipe import default_predictor_dir, default_trace_dir
    from adapter.pipeline.build import train_one
    from adapter.pipeline.train import TrainConfig
    from adapter.selection.artifact import PredictorMismatch

    name, loaded = _load_for_predictors(model, config)
    suffix = "-ffn" if kind == "dejavu" and dejavu_neuron_input == "ffn_input" else ""
    out = out or default_predictor_dir(name) / f"{kind}-{criterion}{suffix}"
    try:
        metrics = train_one(kind, criterion, data or default_trace_dir(name), out, loaded.runtime,
                            TrainConfig(epochs=epochs, hidden=hidden, dejavu_rank=dejavu_rank,
                                        dejavu_neuron_input=dejavu_neuron_input))
    except (FileNotFoundError, PredictorMismatch, ValueError) as exc:
        fail(str(exc))
    print(json.dumps({"predictor": str(out), "kind": kind, "criterion": criterion, "metrics": metrics}))


@predictor_app.command("build")
def predictor_build(
    model: Optional[str] = typer.Option(None, "--model"),
    per_family: int = typer.Option(300, "--per-family", min=1),
    out: Optional[Path] = typer.Option(None, "--out", help="Predictor set folder."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Collect traces, then train shadowllm (every criterion), dejavu and static."""
    from adapter.embedded.recipe import default_predictor_dir, default_trace_dir
    from adapter.pipeline.build import build_all
    from adapter.pipeline.train import TrainConfig

    name, loaded = _load_for_predictors(model, config)
    splits = {"train": per_family, "validation": max(10, per_family // 6), "test": max(10, per_family // 6)}
    report = build_all(loaded.runtime, loaded.tokenizer, default_trace_dir(name),
                       out or default_predictor_dir(name), splits, TrainConfig())
    print(json.dumps(report, indent=2))


@app.command("eval")
def eval_cmd(
    as_json: bool = JsonObjectOpt,
    quick: bool = typer.Option(False, "--quick", help="25 test prompts per family instead of 100."),
    model: Optional[str] = typer.Option(None, "--model"),
    predictors: Optional[Path] = typer.Option(None, "--predictors", help="Folder of trained predictors."),
    data: Optional[Path] = typer.Option(None, "--data", help="Trace dataset (its test split gives Spearman rho)."),
    plot: Path = typer.Option(Path("docs/eval.png"), "--plot", help="Where to write the PNG plot."),
    with_09: bool = typer.Option(False, "--with-0.9", help="Also evaluate sparsity 0.9."),
    per_family: Optional[int] = typer.Option(None, "--per-family", min=1,
                                             help="Test prompts per family (default 100, 25 with --quick)."),
    dejavu_variants: list[str] = typer.Option(["all_tokens"], "--dejavu-variant",
                                              help="all_tokens (prompt gated too) | decode_only; repeatable."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Accuracy and perplexity against sparsity for every method, through the gated runtime."""
    from adapter.evaluation import sweep as quality
    from adapter.embedded.recipe import default_predictor_dir, default_trace_dir
    from adapter.selection.artifact import PredictorMismatch

    name, loaded = _load_for_predictors(model, config)
    data = data or default_trace_dir(name)
    sparsities = quality.SPARSITIES + ((0.9,) if with_09 else ())
    try:
        report = quality.run_eval(loaded.runtime, loaded.tokenizer, name,
                                  predictors or default_predictor_dir(name),
                                  data if data.exists() else None, quick, plot, sparsities,
                                  per_family=per_family,
                                  text_sentences=None if per_family is None else 4 * per_family,
                                  dejavu_variants=tuple(dejavu_variants))
    except (FileNotFoundError, PredictorMismatch, ValueError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title=f"{name}: dense accuracy {report['dense']['accuracy']:.3f}, "
                        f"perplexity {report['dense']['perplexity']:.3f}")
    for col in ("method", "criterion", "mode", "sparsity", "accuracy", "perplexity", "effective"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        table.add_row(r["method"], r["criterion"], r["mode"], f"{r['sparsity']:.1f}", f"{r['accuracy']:.3f}",
                      f"{r['perplexity']:.3f}", f"{r['effective_sparsity']:.3f}")
    console.print(table)
    console.print(f"spearman: {json.dumps(report['spearman'])}\nplot: {report['plot']}")


# root commands after generate and eval, then the groups
app.command("up")(service.up)
app.command("down")(service.down)
app.command("alerts")(monitor.alerts_cmd)
app.command("status")(rollout.status)
app.command("approve")(rollout.approve)
app.command("rollback")(rollout.rollback)
app.add_typer(model_app, name="model")
app.add_typer(predictor_app, name="predictor")
app.add_typer(bench.bench_app, name="bench")
app.add_typer(monitor.monitor_app, name="monitor")
app.add_typer(monitor.fallback_app, name="fallback")
app.add_typer(rollout.jobs_app, name="jobs")
app.add_typer(bench.scenario_app, name="scenario")
app.add_typer(keys.keys_app, name="keys")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
