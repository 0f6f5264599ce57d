"""Operator commands of the adaptation loop: `jobs list|run` and the root commands `status`,
`approve`, `rollback` (serving/cli/main.py registers them on the app).

`jobs` works on the configured Redis (and, for `jobs run`, runs the job in this process
under the same lock the scheduler takes); `status`, `approve` and `rollback` talk to the
running service's admin API.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from serving.cli.common import (ConfigOpt, JsonOpt, UrlOpt, admin_client, call, console, fail, fmt,
                                service_settings, utc)

jobs_app = typer.Typer(no_args_is_help=True, help="The scheduled jobs (fine-tune, rollout controller).")


@jobs_app.command("list")
def jobs_list(as_json: bool = JsonOpt, config: Optional[Path] = ConfigOpt):
    """Every job, its schedule and next run, the run in progress and its last result."""
    import redis

    from jobs.runner import JobRecords
    from monitor.redis_client import redis_client

    settings = service_settings(config)
    try:
        rows = JobRecords(redis_client(settings.redis), settings.redis.prefix).listing()
    except redis.RedisError as exc:
        fail(f"cannot read the job records from Redis: {exc}", 1)
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(title="jobs")
    for col in ("job", "schedule", "next run (UTC)", "running", "last run", "status", "result"):
        table.add_column(col)
    for j in rows:
        last = j["last"] or {}
        res = last.get("result") or {}
        table.add_row(j["name"], j["schedule"] or "-", utc(j["next_run"]) if j["next_run"] else "-",
                      "yes" if j["running"] else "-", utc(last["started"]) if last else "-",
                      last.get("status", "-"), str(res.get("status") or res.get("phase") or last.get("error") or "-"))
    console.print(table)


@jobs_app.command("run")
def jobs_run(name: str = typer.Argument(..., help="finetune | rollout"), as_json: bool = JsonOpt,
             config: Optional[Path] = ConfigOpt):
    """Run one job now, in this process (refused while it runs elsewhere)."""
    from jobs.runner import JOBS, JobBusy, run_job

    if name not in JOBS:
        fail(f"no job {name!r}: the jobs are {', '.join(JOBS)}")
    logging.basicConfig(level=logging.WARNING)
    settings = service_settings(config)
    try:
        record = run_job(settings, name, "manual")
    except JobBusy as exc:
        fail(str(exc), 1)
    if as_json:
        print(json.dumps(record))
    else:
        console.print(f"job {name}: {record['status']} in {record['duration_s']} s")
        console.print_json(json.dumps(record.get("result") or {"error": record.get("error")}))
    if record["status"] != "ok":
        raise typer.Exit(1)


def status(as_json: bool = JsonOpt, url: Optional[str] = UrlOpt, config: Optional[Path] = ConfigOpt):
    """Champion, challenger, canary share and its evidence so far, fallback, last decisions."""
    with admin_client(config, url) as client:
        data = call(client, "GET", "/admin/rollout")
    if as_json:
        print(json.dumps(data))
        return
    console.print(f"champion [bold]{data['champion']}[/]; challenger {data['challenger'] or '-'}; canary share "
              f"{data['canary_share']}; fallback {data['fallback']}; aliases "
              f"{', '.join(f'{a}={v}' for a, v in sorted(data['aliases'].items())) or '-'}")
    if data.get("canary"):
        c = data["canary"]
        table = Table(title=f"canary of {c['version']} against {c['champion']} "
                            f"({c['evidence']['elapsed_s']} s so far)")
        for col in ("arm", "samples", "mean KL", "top-1"):
            table.add_column(col, justify="right")
        for arm in ("challenger", "champion"):
            e = c["evidence"][arm]
            table.add_row(arm, str(e["count"]), fmt(e["kl_mean"]), fmt(e["top1"], ".3f"))
        console.print(table)
    table = Table(title="last decisions")
    for col in ("at (UTC)", "decision", "version", "by", "detail"):
        table.add_column(col)
    for d in data["decisions"][:10]:
        ev = d.get("evidence") or {}
        detail = ev.get("reason") or ", ".join(ev.get("reasons") or []) or ev.get("status") or ""
        table.add_row(utc(d["ts"]), d["decision"], d["version"] or "-", d["by"], str(detail)[:80])
    console.print(table)


def approve(version: str = typer.Argument(..., help="the registry version to roll out"),
            url: Optional[str] = UrlOpt, config: Optional[Path] = ConfigOpt):
    """Approve a version (sets the alias `approved`, as a person does in the MLflow UI)."""
    if not version.isdigit():
        fail(f"a version is a number, not {version!r}")
    with admin_client(config, url) as client:
        data = call(client, "POST", f"/admin/rollout/approve/{version}")
    console.print(f"version {data['version']} approved: the canary starts at the controller's next tick")


def rollback(reason: Optional[str] = typer.Option(None, "--reason", help="Recorded with the decision."),
             url: Optional[str] = UrlOpt, config: Optional[Path] = ConfigOpt):
    """Roll back the challenger in canary now."""
    with admin_client(config, url) as client:
        data = call(client, "POST", "/admin/rollout/rollback", json={"reason": reason})
    d = data["decision"]
    if d["decision"] != "rolled_back":
        console.print(f"nothing rolled back: {d['evidence'].get('reason')}")
        raise typer.Exit(1)
    console.print(f"version {d['version']} rolled back: {d['evidence']['reason']}")
