"""`shadowgate bench device`: registered on the bench app (the check is adapter/benchmarks/device_check.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

DTYPES = ("float32", "bfloat16")


def register(bench_app) -> None:
    @bench_app.command("device")
    def bench_device(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        device: str = typer.Option("cuda", "--device", help="cuda | cuda:N | cpu"),
        dtypes: list[str] = typer.Option(list(DTYPES), "--dtype", help="Repeatable: float32, bfloat16."),
        timings: bool = typer.Option(True, "--timings/--no-timings", help="Also time batch 1 and 8 "
                                     "decode steps of the 309 M shape (dense, shadowllm and static at 0.5)."),
        prompts_per_family: int = typer.Option(2, "--prompts-per-family", min=1),
        steps: int = typer.Option(16, "--steps", min=1, help="Greedy tokens compared per prompt."),
        out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON report here."),
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
        if out:
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
            console = Console()
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
