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
        from serving.cli import fail, settings_or_exit
        from serving.launcher import LaunchError, up

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        settings = settings_or_exit(config)
        try:
            up(settings, say=lambda line: print(line, flush=True))
        except LaunchError as exc:
            fail(str(exc), 1)

    @app.command("down")
    def down_cmd(config: Optional[Path] = ConfigOpt) -> None:
        """Stop exactly what `shadowgate up` started."""
        from serving.cli import settings_or_exit
        from serving.launcher import down

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

        from serving import bench_monitor

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
        requests: int = typer.Option(64, "--requests", min=1, help="Requests per concurrency level."),
        max_tokens: int = typer.Option(8, "--max-tokens", min=1),
        config: Optional[Path] = ConfigOpt,
    ) -> None:
        """Throughput, p50, p99 and failures at concurrency 1, 4, 16 with shadow rate 0 and 0.05."""
        import asyncio

        import httpx

        from serving import bench_serve as bench
        from serving.cli import fail, settings_or_exit
        from serving.keys import client_keys

        settings = settings_or_exit(config)
        api_key, admin_key = client_keys(settings)
        if api_key is None or admin_key is None:
            fail("bench serve needs an API key and the admin key (settings or the key files `up` writes)")
        base = url or f"http://{settings.host}:{settings.port}"
        try:
            result = asyncio.run(bench.run(base, api_key, admin_key, requests=requests, max_tokens=max_tokens))
        except httpx.HTTPError as exc:
            fail(f"cannot drive the service at {base}: {exc} (is `shadowgate up` running?)", 1)
        if as_json:
            print(json.dumps(result))
        table = Table(title=f"bench serve {base}, max_tokens {result['max_tokens']}")
        for col in ("shadow rate", "concurrency", "requests", "failed", "req/s", "tokens/s", "p50 ms", "p99 ms",
                    "sampled", "dropped"):
            table.add_column(col, justify="right")
        for r in result["results"]:
            table.add_row(f"{r['shadow_rate']:.2f}", str(r["concurrency"]), str(r["requests"]), str(r["failed"]),
                          f"{r['throughput_rps']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['p50_ms']:.0f}",
                          f"{r['p99_ms']:.0f}", str(r["shadow_sampled"]), str(r["shadow_dropped"]))
        console = Console(stderr=as_json)
        if not console.is_terminal:  # a pipe or file: rich would squeeze the table to 80 columns
            console.width = 120
        console.print(table)
