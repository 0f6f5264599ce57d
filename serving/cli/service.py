"""Service commands of the `shadowgate` CLI (up, down, bench serve): registered on the app."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

ConfigOpt = typer.Option(None, "--config", help="YAML settings file (else $SHADOWGATE_CONFIG).")


def register(app, bench_app) -> None:
    """Attach the service commands to the CLI."""

    @app.command("up")
    def up_cmd(config: Optional[Path] = ConfigOpt) -> None:
        """Start the service for one machine in the foreground (Redis, MLflow, Ray, Serve app)."""
        from serving.cli.main import fail, settings_or_exit
        from serving.ops.launcher import LaunchError, up

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        settings = settings_or_exit(config)
        try:
            up(settings, say=lambda line: print(line, flush=True))
        except LaunchError as exc:
            fail(str(exc), 1)

    @app.command("down")
    def down_cmd(config: Optional[Path] = ConfigOpt) -> None:
        """Stop exactly what `shadowgate up` started."""
        from serving.cli.main import settings_or_exit
        from serving.ops.launcher import down

        down(settings_or_exit(config))

    @bench_app.command("monitor")
    def bench_monitor(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        quick: bool = typer.Option(False, "--quick", help="One drift window size, fewer requests."),
        work: Path = typer.Option(Path("runs/bench-monitor"), "--work", help="Folder for the private stacks."),
        out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON report here."),
    ) -> None:
        """The monitor's figures on private stacks: drift detection vs window size (with and
        without prompt length), fallback on a broken predictor, monitor SIGKILL, MLflow stopped."""
        import platform
        import time as _time

        from serving.bench import monitor as bench_monitor

        logging.basicConfig(level=logging.WARNING)
        console = Console(stderr=True)
        t0 = _time.time()
        report = bench_monitor.run(work, quick=quick, progress=lambda line: console.print(line))
        report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
        report["seconds"] = round(_time.time() - t0, 1)
        if out:
            out.write_text(json.dumps(report, indent=2) + "\n")
        if as_json:
            print(json.dumps(report))
        table = Table(title="bench monitor: drift")
        for col in ("window", "every", "columns", "in-dist requests", "false alarm at", "alert after", "seconds"):
            table.add_column(col, justify="right")
        for r in report["results"].get("drift", []):
            table.add_row(str(r["window"]), str(r["every_requests"]),
                          "no prompt_len" if r["exclude_columns"] else "all", str(r["in_distribution_requests"]),
                          str(r["false_alarm_after"] or "-"), str(r["drift_alert_after_requests"] or "-"),
                          str(r["seconds_to_alert"] or "-"))
        console.print(table)
        for name in ("fallback", "restart", "mlflow_down"):
            console.print(f"{name}: {json.dumps(report['results'].get(name))}")

    @bench_app.command("serve")
    def bench_serve(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        url: Optional[str] = typer.Option(None, "--url", help="Service URL (default: the configured host:port)."),
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
        out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON report here."),
        config: Optional[Path] = ConfigOpt,
    ) -> None:
        """Throughput, p50, p99, failures and where the time goes per request, at each concurrency
        and sparsity (default: 1, 4, 16 x 0, 0.5), prompts from the suite's test split."""
        import asyncio
        import platform
        import time as _time
        from contextlib import nullcontext

        import httpx

        from serving.bench import serve as bench
        from serving.cli.main import fail, settings_or_exit
        from serving.api.auth import client_keys

        settings = settings_or_exit(config)
        sparsities = tuple(sparsity) or (0.0, 0.5)
        if any(not 0.0 <= s < 1.0 for s in sparsities):
            fail("--sparsity must be in [0, 1)")
        if 0.0 not in sparsities:
            sparsities = (0.0,) + sparsities  # the ratios are against dense
        levels = tuple(concurrency) or (1, 4, 16)
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
        console = Console(stderr=True)
        t0 = _time.time()
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
                api_key, admin_key = client_keys(settings)
                if api_key is None or admin_key is None:
                    fail("bench serve needs an API key and the admin key (settings or the key files `up` writes)")
                base, s = url or f"http://{settings.host}:{settings.port}", settings
            try:
                result = asyncio.run(bench.run(base, api_key, admin_key, concurrencies=levels, sparsities=sparsities,
                                               requests=requests, max_tokens=max_tokens, shadow_rate=shadow_rate,
                                               prompts=prompts, rounds=rounds, redis_url=s.redis.url,
                                               prefix=s.redis.prefix, progress=lambda line: console.print(line)))
            except httpx.HTTPError as exc:
                fail(f"cannot drive the service at {base}: {exc} (is `shadowgate up` running?)", 1)
        result["model"] = given or settings.model.name
        result["settings"] = {"threads": s.runtime.threads, "dtype": s.runtime.dtype, "mode": s.runtime.mode,
                              "llm_replicas": s.serve.llm_replicas, "max_ongoing_requests": s.serve.max_ongoing_requests}
        result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                             "python": platform.python_version()}
        result["seconds"] = round(_time.time() - t0, 1)
        if out:
            out.write_text(json.dumps(result, indent=2) + "\n")
        if as_json:
            print(json.dumps(result))
        table = Table(title=f"bench serve {result['model']}, max_tokens {result['max_tokens']}, "
                            f"{result['prompts']} distinct suite prompts")
        for col in ("sparsity", "eff.", "conc.", "requests", "failed", "req/s", "tokens/s", "p50 ms", "p99 ms",
                    "client", "gateway+hops", "queue", "prefill", "decode", "detok", "finish", "batch"):
            table.add_column(col, justify="right")
        for r in result["results"]:
            pr = r["per_request"] or {}

            def ms(key):
                return f"{pr[key]:.1f}" if key in pr else "-"

            table.add_row(f"{r['sparsity']:.2f}", f"{r['effective_sparsity'] or 0:.2f}", str(r["concurrency"]),
                          str(r["requests"]), str(r["failed"]), f"{r['throughput_rps']:.2f}", f"{r['tokens_per_s']:.0f}",
                          f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", ms("client_ms"), ms("gateway_and_hops_ms"),
                          ms("queue_ms"), ms("prefill_ms"), ms("decode_ms"), ms("detokenize_ms"), ms("finish_ms"),
                          f"{pr.get('mean_batch', 0):.1f}")
        console = Console(stderr=as_json)
        if not console.is_terminal:  # a pipe or file: rich would squeeze the table to 80 columns
            console.width = 200
        console.print(table)
        for r in result["ratios"]:
            console.print(f"concurrency {r['concurrency']}: sparsity {r['sparsity']} / dense throughput = {r['ratio']}")

    @bench_app.command("checkpoint")
    def bench_checkpoint(
        out: Path = typer.Argument(..., help="Folder to write (save_pretrained) the bench-shape model to."),
        arch: str = typer.Option("llama-gqa", "--arch", help="llama-gqa | llama-mha | opt"),
    ) -> None:
        """Save the decode-speed bench's model shape (random weights, about 309 M parameters) as a
        checkpoint to serve with `bench serve --model PATH` (weight reads dominate its decode)."""
        from serving.bench import serve as bench
        from serving.cli.main import fail

        try:
            info = bench.save_bench_checkpoint(out, arch)
        except ValueError as exc:
            fail(str(exc))
        print(json.dumps({"path": str(out), **info}))
