"""Operator commands of the monitor: `monitor status|run`, `fallback clear|set` and the root
command `alerts` (serving/cli/main.py registers them on the app).

They talk to the running service's admin API with the admin key (settings or the key file
`shadowgate up` writes); only `monitor run` runs a monitor in this process.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from serving.cli.common import (ConfigOpt, JsonOpt, UrlOpt, admin_client, call, console, fail, fmt,
                                settings_or_exit, utc)

monitor_app = typer.Typer(no_args_is_help=True, help="Fidelity windows, drift checks, the monitor process.")
fallback_app = typer.Typer(no_args_is_help=True, help="The fallback lever of the control state.")


@monitor_app.command("status")
def monitor_status(as_json: bool = JsonOpt, url: Optional[str] = UrlOpt, config: Optional[Path] = ConfigOpt):
    """Fidelity per predictor version and arm, the SLO, the last drift checks."""
    with admin_client(config, url) as client:
        data = call(client, "GET", "/admin/monitor")
    if as_json:
        print(json.dumps(data))
        return
    summary = data.get("summary")
    if not summary:
        console.print("the monitor has not written a summary yet (is it running?)")
        return
    slo = summary["slo"]
    console.print(f"monitor {data['active'] or 'none active'}; summary {data['age_s']} s old; champion "
              f"{summary['champion']}; fallback {summary['fallback']}; SLO: mean KL <= {slo['kl_mean_max']}, "
              f"top-1 >= {slo['top1_min']} over the last {slo['window']} (min {slo['min_samples']}"
              + (f", breaches clear at {slo['confidence']:.0%})" if slo.get("confidence") else ")"))
    table = Table(title="fidelity windows")
    for col in ("version", "arm", "window", "total", "mean KL", "p95 KL", "top-1", "exact"):
        table.add_column(col, justify="right")
    for w in summary["windows"]:
        table.add_row(w["version"], w["arm"], str(w["count"]), str(w["total"]), fmt(w["kl_mean"]),
                      fmt(w["kl_p95"]), fmt(w["top1"], ".3f"), fmt(w["exact_match"], ".3f"))
    console.print(table)
    if summary["drift"]:
        table = Table(title="last drift check per version")
        for col in ("version", "at", "window", "drift", "share", "drifted columns", "MLflow run"):
            table.add_column(col)
        for v, d in sorted(summary["drift"].items()):
            table.add_row(v, utc(d["ts"]), str(d["window"]), str(d["drift"]), f"{d['share']:.2f}",
                          ", ".join(sorted(d["drifted"])) or "-", d.get("run_url") or "-")
        console.print(table)


@monitor_app.command("run")
def monitor_run(config: Optional[Path] = ConfigOpt):
    """Run a monitor in this process (outside Ray); waits for the lease while another is active."""
    from serving.replica.monitor import build_monitor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    loop = build_monitor(settings_or_exit(config))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"monitor {loop.instance} running (pid-scoped lease); stop with Ctrl-C", flush=True)
    loop.run(stop)


@fallback_app.command("clear")
def fallback_clear(url: Optional[str] = UrlOpt, config: Optional[Path] = ConfigOpt):
    """End a fallback: serve the champion's sparsity again (raises a `recovered` alert)."""
    with admin_client(config, url) as client:
        state = call(client, "PUT", "/admin/state", json={"fallback": "none"})["state"]
    console.print(f"fallback cleared: generation {state['generation']}")


@fallback_app.command("set")
def fallback_set(mode: str = typer.Argument(..., help="dense | lower"), url: Optional[str] = UrlOpt,
                 config: Optional[Path] = ConfigOpt):
    """Pull the lever by hand."""
    if mode not in ("dense", "lower"):
        fail(f"fallback must be dense or lower, not {mode!r}")
    with admin_client(config, url) as client:
        state = call(client, "PUT", "/admin/state", json={"fallback": mode})["state"]
    console.print(f"fallback {mode}: generation {state['generation']}")


def alerts_cmd(follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new alerts."),
               kind: Optional[str] = typer.Option(None, "--kind", help="drift | fallback | recovered | "
                                                  "rollback | promotion | job_failure"),
               limit: int = typer.Option(20, "--limit", min=1, max=1000),
               as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
               url: Optional[str] = UrlOpt, config: Optional[Path] = ConfigOpt):
    """The alerts (newest last), from the durable alert stream."""
    params = {"limit": limit, **({"kind": kind} if kind else {})}

    def show(alerts: list[dict]) -> None:
        for a in alerts:
            if as_json:
                print(json.dumps(a), flush=True)
            else:
                console.print(f"{utc(a['ts'])}  [bold]{a['kind']}[/] {a['severity']:8} "
                          f"v{a['predictor_version'] or '-'}  {a['message']}")

    with admin_client(config, url) as client:
        alerts = list(reversed(call(client, "GET", "/admin/alerts", params=params)["alerts"]))
        show(alerts)
        last = alerts[-1]["id"] if alerts else None
        while follow:
            time.sleep(1.0)
            newer = call(client, "GET", "/admin/alerts", params={**params, **({"after": last} if last else {})})
            fresh = list(reversed(newer["alerts"]))  # with no alert before, every one is new
            show(fresh)
            if fresh:
                last = fresh[-1]["id"]
