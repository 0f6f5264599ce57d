"""`shadowgate bench ...` and `shadowgate scenario ...`: the benchmarks and the end-to-end
scenarios (commands, not tests). Each runs the measurement in serving/bench/ or
adapter/benchmarks/, records the machine and the settings it ran with, and prints the JSON
report or a table.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from serving.cli.common import (ConfigOpt, JsonObjectOpt, JsonOpt, UrlOpt, console, err, fail, service_keys,
                                service_settings, service_url, settings_or_exit)

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (commands, not tests).")
scenario_app = typer.Typer(no_args_is_help=True, help="End-to-end scenarios against a running service.")

ReportOpt = typer.Option(None, "--out", help="Also write the JSON report here.")
DTYPES = ("float32", "bfloat16")


def _comma_list(flag: str, text: str, cast, lo, hi, names: tuple[str, str], example: str) -> tuple:
    """A comma list option's values, each cast and in [lo, hi], or a CLI error naming the flag;
    names: what the values are called (plural, one)."""
    try:
        values = tuple(cast(v) for v in text.split(","))
    except ValueError:
        fail(f"{flag} {text!r}: give {names[0]} as a comma list, like {example}")
    if any(not lo <= v <= hi for v in values):
        fail(f"{flag} {text!r}: every {names[1]} must be in [{lo}, {hi}]")
    return values


def _batch_sizes(text: str) -> tuple[int, ...]:
    return _comma_list("--batch", text, int, 1, 64, ("batch sizes", "batch size"), "1,4,8")


def _emit(report: dict, out: Optional[Path], as_json: bool) -> None:
    """Write the report to `out` when given; print it as one JSON object with --json."""
    if out:
        out.write_text(json.dumps(report, indent=2) + "\n")
    if as_json:
        print(json.dumps(report))


def _measured(run, runtime, out: Optional[Path], as_json: bool) -> dict | None:
    """An in-process bench's report with the machine recorded, written to `out` and printed
    with --json (then None: no table); a ValueError of the bench is a CLI error."""
    try:
        report = run()
    except ValueError as exc:
        fail(str(exc))
    report.update(machine=_machine(runtime))
    _emit(report, out, as_json)
    return None if as_json else report


@bench_app.command("speed")
def bench_speed(
    as_json: bool = JsonObjectOpt,
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
    units: list[str] = typer.Option([], "--units", help="The shadowllm rows' batch units (repeatable): "
                                    "per_request (default), heads, heads_neurons: a row each."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", min=1, max=4096,
                                      help="Tokens in each row's prompt: the cache a decode step attends over."),
    out: Optional[Path] = ReportOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Decode speed of dense vs shadowllm / dejavu / static on a realistic random-weight model."""
    from adapter.benchmarks import decode_speed as bench

    sizes: int | list[int] = batch_size
    if batch is not None:
        sizes = list(_batch_sizes(batch))
    settings = settings_or_exit(config)
    try:
        result = bench.run_speed(settings.runtime, arch=arch, quick=quick, batch_size=sizes,
                                 methods=methods or None, sparsities=sparsities or None,
                                 repeats=repeats, steps=steps, units=tuple(units) or ("per_request",),
                                 prompt_tokens=prompt_tokens)
    except ValueError as exc:
        fail(str(exc))
    _emit(result, out, as_json)
    if as_json:
        return
    dense = {d["batch_size"]: d["ms_per_token"] for d in result["dense"]}
    table = Table(title=f"decode speed, {result['device']}, {result['threads']} threads, "
                        f"{result['dtype']}, dense ms/token by batch: "
                        + ", ".join(f"{b}: {ms:.1f}" for b, ms in dense.items()))
    for col in ("batch", "method", "units", "sparsity", "ms/token", "speedup", "ideal", "% of ideal",
                "predictor ms", "request ms"):
        table.add_column(col, justify="right")
    for r in result["results"]:
        table.add_row(str(r["batch_size"]), r["method"], r["units"], f"{r['sparsity']:.1f}", f"{r['ms_per_token']:.2f}",
                      f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x", f"{r['pct_of_ideal']:.0f}%",
                      f"{r['predictor_ms']:.3f}", "-" if r["request_ms"] is None else f"{r['request_ms']:.0f}")
    console.print(table)


@bench_app.command("step-profile")
def bench_step_profile(
    as_json: bool = JsonObjectOpt,
    quick: bool = typer.Option(False, "--quick", help="Smaller model (8 layers)."),
    arch: str = typer.Option("llama-gqa", "--arch", help="llama-gqa | llama-mha | opt"),
    batch: int = typer.Option(1, "--batch", min=1, max=64, help="Rows, each with its own prompt."),
    sparsity: float = typer.Option(0.5, "--sparsity"),
    units: str = typer.Option("per_request", "--units", help="per_request | heads | heads_neurons"),
    steps: int = typer.Option(20, "--steps", min=1, help="Decode steps timed and profiled."),
    out: Optional[Path] = ReportOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Where a decode step's time goes, dense vs shadowllm: matmuls (what the byte model
    counts) against the other operators, and the wall time."""
    from adapter.benchmarks import step_profile

    settings = settings_or_exit(config)
    report = _measured(lambda: step_profile.run(settings.runtime, arch, batch, sparsity, units, steps, quick),
                       settings.runtime, out, as_json)
    if report is None:
        return
    table = Table(title=f"decode step, {arch}, batch {batch}, shadowllm {sparsity} ({units}), {steps} steps")
    for col in ("", "wall ms", "profiled ms", "matmul ms", "other ms", "weight MB read"):
        table.add_column(col, justify="right")
    for name in ("dense", "shadowllm"):
        r = report[name]
        table.add_row(name, str(r["wall_ms"]), str(r["profiled_ms"]), str(r["matmul_ms"]), str(r["other_ms"]),
                      f"{r['bytes'] / 2**20:.0f}")
    console.print(table)
    console.print(f"speedup: ideal (bytes) {report['ideal_speedup']}x, matmuls {report['matmul_speedup']}x, "
                  f"profiled {report['profiled_speedup']}x, wall {report['wall_speedup']}x")


@bench_app.command("attention")
def bench_attention(
    as_json: bool = JsonObjectOpt,
    cache_tokens: str = typer.Option("128,256,384,512,1024", "--cache-tokens",
                                     help="Cache lengths, a comma list."),
    spread: str = typer.Option("3,2,2,1", "--spread", help="Kept heads per kept KV group, a comma list "
                               "(the bench shape: 4 groups of 4 heads)."),
    repeats: int = typer.Option(300, "--repeats", min=1, max=100000),
    out: Optional[Path] = ReportOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """One layer's decode attention with unevenly kept heads: padded queries (the runtime's
    way) against selecting the cache's rows per head, and dense GQA, by cache length."""
    from adapter.benchmarks import attention

    settings = settings_or_exit(config)
    settings.runtime.apply_threads()
    lengths = _comma_list("--cache-tokens", cache_tokens, int, 1, 32768, ("cache lengths", "cache length"), "128,512")
    counts = _comma_list("--spread", spread, int, 1, 64, ("head counts", "head count"), "3,2,2,1")
    report = _measured(lambda: attention.run(lengths, counts, repeats), settings.runtime, out, as_json)
    if report is None:
        return
    table = Table(title=f"decode attention, kept heads per group {report['spread']}, median of {repeats} (ms)")
    for col in ("cached tokens", "padded queries", "select keys/values", "dense GQA", "max |diff|"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        table.add_row(str(r["cache_tokens"]), f"{r['padded_ms']:.3f}", f"{r['select_ms']:.3f}",
                      f"{r['dense_ms']:.3f}", f"{r['max_abs_diff']:.1e}")
    console.print(table)


@bench_app.command("batch-quality")
def bench_batch_quality(
    as_json: bool = JsonObjectOpt,
    model: Optional[str] = typer.Option(None, "--model", help="Default: the configured model."),
    predictors: Optional[Path] = typer.Option(None, "--predictors", help="Folder of trained predictors."),
    predictor: str = typer.Option("shadowllm-plainact", "--predictor", help="Its subfolder."),
    per_family: int = typer.Option(50, "--per-family", min=1, help="Test prompts per family."),
    batch: str = typer.Option("1,4,8", "--batch", help="Batch sizes, a comma list."),
    sparsities: list[float] = typer.Option([], "--sparsity", help="Repeatable (default 0.5 and 0.7)."),
    tokens: int = typer.Option(16, "--tokens", min=1, help="Greedy tokens per prompt compared with dense."),
    batch_keep: str = typer.Option("1.0", "--batch-keep", help="Batch units per a row's kept units "
                                   "(runtime.batch_keep), a comma list of values in [1, 8], like 1,1.5."),
    out: Optional[Path] = ReportOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Quality of batch-invariant heads and neurons: test prompts generated in batches of
    distinct prompts on each row's own mask vs the batch's units (accuracy, agreement with dense)."""
    from adapter.benchmarks import batch_quality
    from adapter.embedded.recipe import default_predictor_dir
    from adapter.evaluation.sweep import load_set
    from adapter.pipeline import traces
    from adapter.runtime.loading import ModelLoadError, load
    from adapter.selection.artifact import PredictorMismatch

    sizes = _batch_sizes(batch)
    if any(not 0 < s < 1 for s in sparsities):
        fail("--sparsity must be in (0, 1)")
    keeps = _comma_list("--batch-keep", batch_keep, float, 1, 8, ("numbers", "value"), "1,1.5")
    settings = settings_or_exit(config)
    settings.runtime.apply_threads()
    name = model or settings.model.name
    try:
        loaded = load(name, settings.runtime)
        preds = load_set(predictors or default_predictor_dir(name), loaded.runtime.shape,
                         traces.model_fingerprint(loaded.runtime.model))
    except (ModelLoadError, FileNotFoundError, PredictorMismatch) as exc:
        fail(str(exc))
    if predictor not in preds:
        fail(f"--predictor {predictor!r}: not among {', '.join(sorted(preds))}")
    report = batch_quality.run(loaded.runtime, loaded.tokenizer, preds[predictor], tuple(sparsities) or (0.5, 0.7),
                               sizes, per_family, tokens, settings.runtime.mode, keeps=keeps)
    report.update(model=name, machine=_machine(settings.runtime))
    _emit(report, out, as_json)
    if as_json:
        return
    table = Table(title=f"{name}, {predictor} ({report['mode']}): {report['prompts']} test prompts, "
                        f"{tokens} greedy tokens")
    for col in ("sparsity", "batch", "units", "keep", "accuracy", "% of dense", "agreement with dense"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        keep = r.get("batch_keep")
        table.add_row(f"{r['sparsity']:.1f}", str(r["batch"]), r["units"], "-" if keep is None else f"{keep:g}",
                      f"{r['accuracy']:.3f}",
                      f"{100 * r['accuracy_vs_dense']:.1f}%", f"{r['agreement']:.3f}")
    console.print(table)


def _machine(runtime) -> dict:
    import torch

    from serving.bench.harness import machine

    return {**machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": runtime.resolved_device(), "dtype": runtime.dtype}


@bench_app.command("monitor")
def bench_monitor(
    as_json: bool = JsonObjectOpt,
    quick: bool = typer.Option(False, "--quick", help="One drift window size, fewer requests."),
    work: Path = typer.Option(Path("runs/bench-monitor"), "--work", help="Folder for the private stacks."),
    out: Optional[Path] = ReportOpt,
) -> None:
    """The monitor's figures on private stacks: drift detection vs window size (with and
    without prompt length), fallback on a broken predictor, monitor SIGKILL, MLflow stopped."""
    from serving.bench import monitor as scenarios
    from serving.bench.harness import machine

    logging.basicConfig(level=logging.WARNING)
    t0 = time.time()
    report = scenarios.run(work, quick=quick, progress=err.print)
    report["machine"] = machine()
    report["seconds"] = round(time.time() - t0, 1)
    _emit(report, out, as_json)
    table = Table(title="bench monitor: drift")
    for col in ("window", "every", "columns", "in-dist requests", "false alarm at", "alert after", "seconds"):
        table.add_column(col, justify="right")
    for r in report["results"].get("drift", []):
        table.add_row(str(r["window"]), str(r["every_requests"]),
                      "no prompt_len" if r["exclude_columns"] else "all", str(r["in_distribution_requests"]),
                      str(r["false_alarm_after"] or "-"), str(r["drift_alert_after_requests"] or "-"),
                      str(r["seconds_to_alert"] or "-"))
    err.print(table)
    for name in ("fallback", "restart", "mlflow_down"):
        err.print(f"{name}: {json.dumps(report['results'].get(name))}")


@bench_app.command("serve")
def bench_serve(
    as_json: bool = JsonObjectOpt,
    url: Optional[str] = UrlOpt,
    model: Optional[str] = typer.Option(None, "--model", help="Serve this model (a saved checkpoint "
                                        "folder, or default) on a private stack for the run instead of driving --url; "
                                        "its predictor is bootstrapped as for any user's checkpoint."),
    work: Path = typer.Option(Path("runs/bench-serve"), "--work", help="Folder of the private stack (--model)."),
    requests: int = typer.Option(64, "--requests", min=1, help="Requests per concurrency level and sparsity."),
    max_tokens: int = typer.Option(8, "--max-tokens", min=1),
    sparsity: list[float] = typer.Option([], "--sparsity", help="Sparsities to compare (repeatable; "
                                         "default 0 and 0.5), switched through the control state."),
    concurrency: list[int] = typer.Option([], "--concurrency", help="Levels (repeatable; default 1, 4, 16)."),
    shadow_rate: float = typer.Option(0.0, "--shadow-rate", min=0.0, max=1.0),
    prompts: int = typer.Option(240, "--prompts", min=1, help="Distinct suite test-split prompts."),
    rounds: int = typer.Option(1, "--rounds", min=1, help="Repeat the sweep (ratios are medians)."),
    bootstrap_per_family: int = typer.Option(4, "--bootstrap-per-family", min=1,
                                             help="With --model: suite instances per family to train "
                                                  "its first predictor on."),
    units: Optional[str] = typer.Option(None, "--units", help="With --model: the replicas' batch units, "
                                        "per_request | heads | heads_neurons (default: runtime.batch_heads "
                                        "and batch_neurons of the settings)."),
    batch_keep: Optional[float] = typer.Option(None, "--batch-keep", min=1.0, max=8.0,
                                               help="With --model: the replicas' runtime.batch_keep (batch "
                                                    "units per a row's kept units; default: the settings')."),
    out: Optional[Path] = ReportOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Throughput, p50, p99, failures and where the time goes per request, at each concurrency
    and sparsity (default: 1, 4, 16 x 0, 0.5), prompts from the suite's test split."""
    import asyncio
    from contextlib import nullcontext

    import httpx

    from serving.bench import serve as bench
    from serving.bench.harness import machine

    settings = service_settings(config)
    sparsities = tuple(sparsity) or (0.0, 0.5)
    if any(not 0.0 <= s < 1.0 for s in sparsities):
        fail("--sparsity must be in [0, 1)")
    if 0.0 not in sparsities:
        sparsities = (0.0,) + sparsities  # the ratios are against dense
    levels = tuple(concurrency) or (1, 4, 16)
    if units is not None:
        from adapter.runtime.gather import BATCH_UNITS

        if model is None:
            fail("--units needs --model: a running service keeps its own runtime settings")
        if units not in BATCH_UNITS:
            fail(f"--units {units!r}: use {', '.join(BATCH_UNITS)}")
        parts = BATCH_UNITS[units]
        settings = settings.model_copy(update={"runtime": settings.runtime.model_copy(
            update={"batch_heads": "attn" in parts, "batch_neurons": "ffn" in parts})})
    if batch_keep is not None:
        if model is None:
            fail("--batch-keep needs --model: a running service keeps its own runtime settings")
        settings = settings.model_copy(update={"runtime": settings.runtime.model_copy(
            update={"batch_keep": batch_keep})})
    if model is not None and not Path(model).exists() and ("/" in model or model.startswith(".")):
        from adapter.runtime.loading import ModelLoadError, load

        try:  # a hub id or an embedded name loads; a missing folder is a clean error
            load(model, settings.runtime)
        except ModelLoadError as exc:
            fail(f"--model {model}: {exc}")
    if model is not None and Path(model).exists():
        if not (Path(model) / "config.json").exists():
            fail(f"--model {model}: no saved model there (config.json is missing)")
        given, model = model, str(Path(model).resolve())  # the report names it as given
    else:
        given = model
    t0 = time.time()
    if model is not None:
        from serving.ops.stack import private_stack

        logging.basicConfig(level=logging.WARNING)
        stack_cm = private_stack(work, model={"name": model},
                                 runtime=settings.runtime.model_dump(),
                                 mlflow={"bootstrap_per_family": bootstrap_per_family, "bootstrap_epochs": 5,
                                         "reference_per_family": 20},
                                 serve={"max_tokens_limit": max(256, max_tokens)})
    else:
        stack_cm = nullcontext()
    with stack_cm as stack:
        if stack is not None:
            base, api_key, admin_key, s = stack.base, stack.api_key, stack.admin_key, stack.settings
        else:
            api_key, admin_key = service_keys(settings, "bench serve")
            base, s = service_url(settings, url), settings
        try:
            result = asyncio.run(bench.run(base, api_key, admin_key, concurrencies=levels, sparsities=sparsities,
                                           requests=requests, max_tokens=max_tokens, shadow_rate=shadow_rate,
                                           prompts=prompts, rounds=rounds, redis_url=s.redis.url,
                                           prefix=s.redis.prefix, progress=err.print))
        except httpx.HTTPError as exc:
            fail(f"cannot drive the service at {base}: {exc} (is `shadowgate up` running?)", 1)
    result["model"] = given or settings.model.name
    result["settings"] = {"threads": s.runtime.threads, "dtype": s.runtime.dtype, "mode": s.runtime.mode,
                          "batch_heads": s.runtime.batch_heads, "batch_neurons": s.runtime.batch_neurons,
                          "batch_keep": s.runtime.batch_keep,
                          "llm_replicas": s.serve.llm_replicas, "max_ongoing_requests": s.serve.max_ongoing_requests}
    result["machine"] = machine()
    result["seconds"] = round(time.time() - t0, 1)
    _emit(result, out, as_json)
    table = Table(title=f"bench serve {result['model']}, max_tokens {result['max_tokens']}, "
                        f"{result['prompts']} distinct suite prompts")
    for col in ("sparsity", "eff.", "conc.", "requests", "failed", "req/s", "tokens/s", "p50 ms", "p99 ms",
                "client", "gateway+hops", "queue", "prefill", "of it copy", "decode", "detok", "finish", "batch"):
        table.add_column(col, justify="right")
    for r in result["results"]:
        pr = r["per_request"] or {}

        def ms(key):
            return f"{pr[key]:.1f}" if key in pr else "-"

        table.add_row(f"{r['sparsity']:.2f}", f"{r['effective_sparsity'] or 0:.2f}", str(r["concurrency"]),
                      str(r["requests"]), str(r["failed"]), f"{r['throughput_rps']:.2f}", f"{r['tokens_per_s']:.0f}",
                      f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", ms("client_ms"), ms("gateway_and_hops_ms"),
                      ms("queue_ms"), ms("prefill_ms"), ms("gather_ms"), ms("decode_ms"), ms("detokenize_ms"), ms("finish_ms"),
                      f"{pr.get('mean_batch', 0):.1f}")
    wide = Console(stderr=as_json)  # its own: the width is set for this table only
    if not wide.is_terminal:  # a pipe or file: rich would squeeze the table to 80 columns
        wide.width = 200
    wide.print(table)
    for r in result["ratios"]:
        wide.print(f"concurrency {r['concurrency']}: sparsity {r['sparsity']} / dense throughput = {r['ratio']}")


@bench_app.command("checkpoint")
def bench_checkpoint(
    out: Path = typer.Argument(..., help="Folder to write (save_pretrained) the bench-shape model to."),
    arch: str = typer.Option("llama-gqa", "--arch", help="llama-gqa | llama-mha | opt"),
) -> None:
    """Save the decode-speed bench's model shape (random weights, about 309 M parameters) as a
    checkpoint to serve with `bench serve --model PATH` (weight reads dominate its decode)."""
    from serving.bench import serve as bench

    try:
        info = bench.save_bench_checkpoint(out, arch)
    except ValueError as exc:
        fail(str(exc))
    print(json.dumps({"path": str(out), **info}))


@bench_app.command("faults")
def bench_faults(
    as_json: bool = JsonObjectOpt,
    clients: int = typer.Option(4, "--clients", min=1, help="Concurrent clients, 16-token completions."),
    mlflow_down_s: float = typer.Option(60.0, "--mlflow-down-s", min=1.0, help="MLflow outage."),
    redis_down_s: float = typer.Option(5.0, "--redis-down-s", min=0.0, help="Redis outage after its kill."),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Run only these faults (repeatable)."),
    work: Path = typer.Option(Path("runs/bench-faults"), "--work", help="Folder for the private stack."),
    out: Optional[Path] = ReportOpt,
) -> None:
    """Faults under steady load on a private stack: a GatedLLM replica SIGKILLed,
    redis-server SIGKILLed and restarted, MLflow stopped, a corrupt and a mismatched
    predictor approved."""
    from serving.bench import faults as bench
    from serving.bench.harness import machine

    faults = tuple(only) if only else bench.FAULTS
    unknown = [f for f in faults if f not in bench.FAULTS]
    if unknown:
        raise typer.BadParameter(f"unknown fault(s) {unknown}; the faults are {', '.join(bench.FAULTS)}")
    logging.basicConfig(level=logging.WARNING)
    t0 = time.time()
    report = bench.run(work, clients=clients, mlflow_down_s=mlflow_down_s, redis_down_s=redis_down_s,
                       faults=faults, progress=err.print)
    report["machine"] = machine()
    report["seconds"] = round(time.time() - t0, 1)
    _emit(report, out, as_json)
    table = Table(title=f"bench faults: {clients} clients, {bench.MAX_TOKENS}-token completions")
    for col in ("fault", "requests", "failed", "failed %", "p99 s", "figure"):
        table.add_column(col, justify="right")
    for name, r in report["results"].items():
        table.add_row(name, str(r["requests"]), str(r["failed"]), str(r["failed_pct"]), str(r["p99_s"]),
                      _fault_figure(name, r))
    err.print(table)


def _fault_figure(name: str, r: dict) -> str:
    """The headline figure of one fault's result, for the table."""
    if name == "replica_kill":
        rep = r.get("replacement") or {}
        parts = [f"recovery {r['recovery_s']} s", f"Serve noticed after {r.get('serve_noticed_s')} s"]
        if rep:
            parts.append(f"replacement's constructor began {rep['constructor_began_after_kill_s']} s after the "
                         f"kill (process started {rep['process_started_after_kill_s']} s), engine {rep['engine_s']} s, "
                         f"state and warm-up {rep['state_and_warmup_s']} s")
        return "; ".join(parts)
    if name == "redis_kill":
        return (f"lost {r['lost']}; followed {r['followed_after_restart_s']} s after restart; "
                f"epoch kept {r['epoch_kept']}")
    if name == "mlflow_outage":
        return (f"down {r['down_s']} s; job_failure after {r['job_failure_alert_after_s']} s; "
                f"fallback served after {r['fallback']['served_s']} s")
    return "; ".join(f"{how}: {v['decision']}, alert {v['alert']}" for how, v in r["approved"].items()) + \
        f"; forced challenger served {r['forced_challenger']['served_by_bad']} times"


@bench_app.command("device")
def bench_device(
    as_json: bool = JsonObjectOpt,
    device: str = typer.Option("cuda", "--device", help="cuda | cuda:N | cpu"),
    dtypes: list[str] = typer.Option(list(DTYPES), "--dtype", help="Repeatable: float32, bfloat16."),
    timings: bool = typer.Option(True, "--timings/--no-timings", help="Also time batch 1 and 8 "
                                 "decode steps of the 309 M shape (dense, shadowllm and static at 0.5)."),
    prompts_per_family: int = typer.Option(2, "--prompts-per-family", min=1),
    steps: int = typer.Option(16, "--steps", min=1, help="Greedy tokens compared per prompt."),
    out: Optional[Path] = ReportOpt,
) -> None:
    """The runtime on a device: correctness at sparsity 0 against transformers there (both
    embedded defaults, each dtype), the shipped predictor there against the CPU, then
    batch-1 and batch-8 timings. Exits 1 when a correctness check fails."""
    from adapter.benchmarks import device_check

    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise typer.BadParameter(f"unknown dtype {bad[0]!r}; use {' or '.join(DTYPES)}")
    try:
        result = device_check.run_check(device, tuple(dtypes), timings, prompts_per_family, steps)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if out:  # not _emit: this report is indented by 1, and printed so with --json
        out.write_text(json.dumps(result, indent=1))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        table = Table(title=f"runtime on {result['device_name']}")
        cols = {"model": "model", "dtype": "dtype", "max_abs_logit_diff": "logit diff",
                "dense_tokens_equal_transformers": "dense = hf", "sparsity0_tokens_equal_dense": "s=0 = dense",
                "sparse05_masks_equal_cpu": "s=0.5 mask = cpu", "sparse05_tokens_equal_cpu": "s=0.5 tokens = cpu",
                "ok": "ok"}
        for label in cols.values():
            table.add_column(label)
        for r in result["correctness"]:
            table.add_row(*(str(r[c]) for c in cols))
        console.print(table)
        for dtype, speed in (result.get("timings") or {}).items():
            t = Table(title=f"decode, {dtype} (309 M shape, sparsity 0.5)")
            for c in ("method", "batch", "ms/step", "dense ms/step", "speedup", "% of ideal"):
                t.add_column(c)
            for r in speed["results"]:
                t.add_row(r["method"], str(r["batch_size"]), str(r["ms_per_token"]),
                          str(r["dense_ms_per_token"]), f"{r['speedup']}x", str(r["pct_of_ideal"]))
            console.print(t)
    if not result["ok"]:
        raise typer.Exit(1)


# scenario-sized settings of `scenario adapt --private`: drift checked every 30 requests,
# the rollout controller every second, canaries decided on 20 samples
ADAPT_STACK = {"serve": {"defaults": {"shadow_rate": 0.5}, "shadow_max_inflight": 2, "replica_cpus": 0.1,
                         "reconcile_s": 1.0},
               "monitor": {"lease_ttl_s": 3, "claim_idle_s": 3,
                           "drift": {"window": 60, "every_requests": 30, "min_rows": 30}},
               "jobs": {"rollout_every_s": 1.0},
               "adapt": {"min_samples": 150, "drift_shadow_rate": 1.0, "lr": 1e-3, "epochs": 60, "patience": 12},
               "canary": {"share": 0.5, "min_samples": 20, "shadow_rate": 1.0},
               "runtime": {"threads": 1}}


@scenario_app.command("adapt")
def scenario_adapt(
    as_json: bool = JsonOpt, url: Optional[str] = UrlOpt, config: Optional[Path] = ConfigOpt,
    work: Path = typer.Option(Path("runs/scenario-adapt"), "--work", help="Folder for predictors and, with "
                              "--private, the stack."),
    private: bool = typer.Option(False, "--private", help="Start a private stack (free ports, under --work) "
                                 "with scenario-sized settings instead of using the running service."),
    out_json: Optional[Path] = ReportOpt,
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write the timeline plot (PNG) here."),
    per_family: int = typer.Option(100, "--per-family", min=10, help="Test prompts per family for accuracy."),
    phase_budget: float = typer.Option(900, "--phase-budget", min=60, help="Seconds a traffic switch may take to "
                                       "adapt (fine-tunes, canaries) before the scenario moves on."),
):
    """Drift, fine-tune, approval, canary, promotion and rollback, with a timeline."""
    from serving.bench import adapt as scenario
    from serving.bench.harness import Driver, bearer_client, machine

    logging.basicConfig(level=logging.WARNING)
    t0 = time.time()

    def go(settings, base, api_key, admin_key):
        with bearer_client(base, api_key, timeout=120) as c, bearer_client(base, admin_key, timeout=60) as a:
            return scenario.run(Driver(c, a, max_tokens=8), settings, work, progress=err.print,
                                per_family=per_family, phase_budget_s=phase_budget)

    if private:
        from serving.ops.stack import private_stack

        with private_stack(work / "stack", **ADAPT_STACK) as st:
            report = go(st.settings, st.base, st.api_key, st.admin_key)
            settings = st.settings
    else:
        settings = service_settings(config)
        api_key, admin_key = service_keys(settings, "the scenario")
        report = go(settings, service_url(settings, url), api_key, admin_key)
    report["machine"] = machine()
    adapt = settings.adapt.model_dump(mode="json", exclude={"webhook_secret"})
    report["settings"] = {"sparsity_mode": settings.runtime.mode, "adapt": adapt,
                          "canary": settings.canary.model_dump(), "private_stack": private}
    report["wall_s"] = round(time.time() - t0, 1)
    if plot_path:
        scenario.plot(report, plot_path)
        report["plot"] = str(plot_path)
    if out_json:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(report, indent=2) + "\n")
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title="scenario adapt")
    table.add_column("event")
    table.add_column("t (s)", justify="right")
    table.add_column("detail")
    for e in report["timeline"]:
        table.add_row(e["event"], f"{e['t']:.1f}", json.dumps(e["detail"])[:100])
    console.print(table)
    console.print_json(json.dumps({k: report.get(k) for k in ("failed_requests", "requests", "fidelity",
                                                              "accuracy", "goals", "seconds")}))
    for ph in report.get("phases", []):
        acc = ph.get("accuracy", {})
        console.print(f"{ph['phase']} {ph['families']}: promoted {ph['promoted']}, target met {ph['target_met']}, "
                     f"accuracy {acc.get('new_before')} -> {acc.get('new_after')}")
