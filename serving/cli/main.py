"""The `shadowgate` command line. Settings are loaded once here and passed down."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from serving.settings import ConfigError, Settings, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="shadowgate: predictor-based contextual sparsity for LLM serving.")
model_app = typer.Typer(no_args_is_help=True, help="The embedded default models.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (commands, not tests).")
predictor_app = typer.Typer(no_args_is_help=True, help="Importance traces and predictor training.")
app.add_typer(model_app, name="model")
app.add_typer(predictor_app, name="predictor")
app.add_typer(bench_app, name="bench")

err = Console(stderr=True)
ConfigOpt = typer.Option(None, "--config", help="YAML settings file (else $SHADOWGATE_CONFIG).")


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def settings_or_exit(config: Optional[Path], **overrides) -> Settings:
    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        fail(str(exc))


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", help="Prompt text."),
    model: Optional[str] = typer.Option(None, "--model", help="default | default-opt | PATH | hub id."),
    max_tokens: int = typer.Option(16, "--max-tokens", min=0, max=4096),
    sparsity: float = typer.Option(0.5, "--sparsity", help="Fraction of units skipped, in [0, 1)."),
    method: str = typer.Option("shadowllm", "--method", help="dense | shadowllm | dejavu | static"),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    predictors: Optional[Path] = typer.Option(None, "--predictors", help="Folder of trained predictors."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Generate from a prompt through the gated runtime."""
    from adapter.embedded.recipe import default_predictor_dir
    from adapter.selection.methods import build_method
    from adapter.pipeline.traces import model_fingerprint
    from adapter.pipeline.train import PredictorMismatch
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
        Console().print(f"[bold]{prompt}[/] {text}")
        Console().print(f"method={gen.method} sparsity={gen.sparsity} "
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


@bench_app.command("speed")
def bench_speed(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    quick: bool = typer.Option(False, "--quick", help="Smaller model and fewer repeats (about a minute)."),
    arch: str = typer.Option("llama-gqa", "--arch", help="llama-gqa | llama-mha | opt"),
    batch_size: int = typer.Option(1, "--batch-size", min=1, max=64),
    batch: Optional[str] = typer.Option(None, "--batch", help="Batch sizes, a comma list (1,4,8); "
                                        "overrides --batch-size. Every row has its own prompt."),
    methods: list[str] = typer.Option([], "--method", help="Only these methods (repeatable; "
                                      "shadowllm, dejavu, static); dense always runs."),
    sparsities: list[float] = typer.Option([], "--sparsity", help="Only these sparsities (repeatable)."),
    repeats: Optional[int] = typer.Option(None, "--repeats", min=1, help="Repeats (default 5, quick 3)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Timed decode steps per repeat "
                                        "(default 32, quick 16)."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Decode speed of dense vs shadowllm / dejavu / static on a realistic random-weight model."""
    from adapter.benchmarks import decode_speed as bench

    sizes: int | list[int] = batch_size
    if batch is not None:
        try:
            sizes = [int(b) for b in batch.split(",")]
        except ValueError:
            fail(f"--batch {batch!r}: give batch sizes as a comma list, like 1,4,8")
        if any(not 1 <= b <= 64 for b in sizes):
            fail(f"--batch {batch!r}: every batch size must be in [1, 64]")
    settings = settings_or_exit(config)
    try:
        result = bench.run_speed(settings.runtime, arch=arch, quick=quick, batch_size=sizes,
                                 methods=methods or None, sparsities=sparsities or None,
                                 repeats=repeats, steps=steps)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(result))
        return
    dense = {d["batch_size"]: d["ms_per_token"] for d in result["dense"]}
    table = Table(title=f"decode speed, {result['device']}, {result['threads']} threads, "
                        f"{result['dtype']}, dense ms/token by batch: "
                        + ", ".join(f"{b}: {ms:.1f}" for b, ms in dense.items()))
    for col in ("batch", "method", "sparsity", "ms/token", "speedup", "ideal", "% of ideal",
                "predictor ms", "request ms"):
        table.add_column(col, justify="right")
    for r in result["results"]:
        table.add_row(str(r["batch_size"]), r["method"], f"{r['sparsity']:.1f}", f"{r['ms_per_token']:.2f}",
                      f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x", f"{r['pct_of_ideal']:.0f}%",
                      f"{r['predictor_ms']:.3f}", f"{r['request_ms']:.0f}")
    Console().print(table)


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
    from adapter.pipeline.train import PredictorMismatch, TrainConfig

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
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
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
    from adapter.pipeline.train import PredictorMismatch

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
    Console().print(table)
    Console().print(f"spearman: {json.dumps(report['spearman'])}\nplot: {report['plot']}")


from serving.cli import service as cli_service  # noqa: E402  (service commands live beside the core ones)

cli_service.register(app, bench_app)
from serving.cli import monitor as cli_monitor  # noqa: E402

cli_monitor.register(app)
from serving.cli import rollout as cli_rollout  # noqa: E402

cli_rollout.register(app)
from serving.cli import keys as cli_keys  # noqa: E402

cli_keys.register(app)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

from serving.cli import faults as cli_faults  # noqa: E402

cli_faults.register(bench_app)

from serving.cli import device as cli_device  # noqa: E402

cli_device.register(bench_app)
