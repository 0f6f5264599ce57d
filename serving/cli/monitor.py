"""Operator commands of the monitor: `monitor status|run`, `fallback clear|set`, `alerts`.

They talk to the running service's admin API with the admin key (settings or the key file
`shadowgate up` writes); only `monitor run` runs a monitor in this process.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import httpx
import typer
from rich.console import Console
from rich.table import Table

ConfigOpt = typer.Option(None, "--config", help="YAML settings file (else $SHADOWGATE_CONFIG).")
UrlOpt = typer.Option(None, "--url", help="Service URL (default: the configured host:port).")
JsonOpt = typer.Option(False, "--json", help="Print JSON.")
out = Console()


def admin_client(config: Optional[Path], url: Optional[str]) -> httpx.Client:
    from serving.cli.main import fail, settings_or_exit
    from serving.api.auth import client_keys

    settings = settings_or_exit(config)
    _, admin = client_keys(settings)
    if admin is None:
        fail("this command needs the admin key (settings, $SHADOWGATE_ADMIN_KEY, or the key file `up` writes)")
    base = url or f"http://{settings.host}:{settings.port}"
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin}"}, timeout=30)


def call(client: httpx.Client, method: str, path: str, **kw) -> dict:
    from serving.cli.main import fail

    try:
        r = client.request(method, path, **kw)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the service at {client.base_url}: {exc} (is `shadowgate up` running?)", 1)
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        fail(f"{method} {path}: HTTP {r.status_code}: {message}", 1)
    return r.json()


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _ts(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def register(app) -> None:
    monitor_app = typer.Typer(no_args_is_help=True, help="Fidelity windows, drift checks, the monitor process.")
    fallback_app = typer.Typer(no_args_is_help=True, help="The fallback lever of the control state.")
    app.add_typer(monitor_app, name="monitor")
    app.add_typer(fallback_app, name="fallback")

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
            out.print("the monitor has not written a summary yet (is it running?)")
            return
        slo = summary["slo"]
        out.print(f"monitor {data['active'] or 'none active'}; summary {data['age_s']} s old; champion "
                  f"{summary['champion']}; fallback {summary['fallback']}; SLO: mean KL <= {slo['kl_mean_max']}, "
                  f"top-1 >= {slo['top1_min']} over the last {slo['window']} (min {slo['min_samples']})")
        table = Table(title="fidelity windows")
        for col in ("version", "arm", "window", "total", "mean KL", "p95 KL", "top-1", "exact"):
            table.add_column(col, justify="right")
        for w in summary["windows"]:
            table.add_row(w["version"], w["arm"], str(w["count"]), str(w["total"]), _fmt(w["kl_mean"]),
                          _fmt(w["kl_p95"]), _fmt(w["top1"], ".3f"), _fmt(w["exact_match"], ".3f"))
        out.print(table)
        if summary["drift"]:
            table = Table(title="last drift check per version")
            for col in ("version", "at", "window", "drift", "share", "drifted columns", "MLflow run"):
                table.add_column(col)
            for v, d in sorted(summary["drift"].items()):
                table.add_row(v, _ts(d["ts"]), str(d["window"]), str(d["drift"]), f"{d['share']:.2f}",
                              ", ".join(sorted(d["drifted"])) or "-", d.get("run_url") or "-")
            out.print(table)

    @monitor_app.command("run")
    def monitor_run(config: Optional[Path] = ConfigOpt):
        """Run a monitor in this process (outside Ray); waits for the lease while another is active."""
        from serving.cli.main import settings_or_exit
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
        out.print(f"fallback cleared: generation {state['generation']}")

    @fallback_app.command("set")
    def fallback_set(mode: str = typer.Argument(..., help="dense | lower"), url: Optional[str] = UrlOpt,
                     config: Optional[Path] = ConfigOpt):
        """Pull the lever by hand."""
        from serving.cli.main import fail

        if mode not in ("dense", "lower"):
            fail(f"fallback must be dense or lower, not {mode!r}")
        with admin_client(config, url) as client:
            state = call(client, "PUT", "/admin/state", json={"fallback": mode})["state"]
        out.print(f"fallback {mode}: generation {state['generation']}")

    @app.command("alerts")
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
                    out.print(f"{_ts(a['ts'])}  [bold]{a['kind']}[/] {a['severity']:8} "
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
