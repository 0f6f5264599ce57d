"""`shadowgate bench faults`: registered on the bench app (the scenarios are serving/bench/faults.py)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table


def register(bench_app) -> None:
    @bench_app.command("faults")
    def bench_faults(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        clients: int = typer.Option(4, "--clients", min=1, help="Concurrent clients, 16-token completions."),
        mlflow_down_s: float = typer.Option(60.0, "--mlflow-down-s", min=1.0, help="MLflow outage."),
        redis_down_s: float = typer.Option(5.0, "--redis-down-s", min=0.0, help="Redis outage after its kill."),
        only: Optional[list[str]] = typer.Option(None, "--only", help="Run only these faults (repeatable)."),
        work: Path = typer.Option(Path("runs/bench-faults"), "--work", help="Folder for the private stack."),
        out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON report here."),
    ) -> None:
        """Faults under steady load on a private stack: a GatedLLM replica SIGKILLed,
        redis-server SIGKILLed and restarted, MLflow stopped, a corrupt and a mismatched
        predictor approved."""
        import platform
        import time

        from serving.bench import faults as bench

        faults = tuple(only) if only else bench.FAULTS
        unknown = [f for f in faults if f not in bench.FAULTS]
        if unknown:
            raise typer.BadParameter(f"unknown fault(s) {unknown}; the faults are {', '.join(bench.FAULTS)}")
        logging.basicConfig(level=logging.WARNING)
        console = Console(stderr=True)
        t0 = time.time()
        report = bench.run(work, clients=clients, mlflow_down_s=mlflow_down_s, redis_down_s=redis_down_s,
                           faults=faults, progress=lambda line: console.print(line))
        report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                             "python": platform.python_version()}
        report["seconds"] = round(time.time() - t0, 1)
        if out:
            out.write_text(json.dumps(report, indent=2) + "\n")
        if as_json:
            print(json.dumps(report))
        table = Table(title=f"bench faults: {clients} clients, {bench.MAX_TOKENS}-token completions")
        for col in ("fault", "requests", "failed", "failed %", "p99 s", "figure"):
            table.add_column(col, justify="right")
        for name, r in report["results"].items():
            table.add_row(name, str(r["requests"]), str(r["failed"]), str(r["failed_pct"]), str(r["p99_s"]),
                          _figure(name, r))
        console.print(table)


def _figure(name: str, r: dict) -> str:
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
