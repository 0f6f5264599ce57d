"""Operator commands of the adaptation loop: `jobs list|run`, `status`, `approve`, `rollback`.

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
from rich.console import Console
from rich.table import Table

from serving.cli.monitor import ConfigOpt, JsonOpt, UrlOpt, _fmt, _ts, admin_client, call

out = Console()


def register(app) -> None:
    jobs_app = typer.Typer(no_args_is_help=True, help="The scheduled jobs (fine-tune, rollout controller).")
    app.add_typer(jobs_app, name="jobs")

    @jobs_app.command("list")
    def jobs_list(as_json: bool = JsonOpt, config: Optional[Path] = ConfigOpt):
        """Every job, its schedule and next run, the run in progress and its last result."""
        import redis

        from jobs.runner import JobRecords
        from monitor.redis_client import redis_client
        from serving.cli.main import fail, settings_or_exit

        settings = settings_or_exit(config)
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
            table.add_row(j["name"], j["schedule"] or "-", _ts(j["next_run"]) if j["next_run"] else "-",
                          "yes" if j["running"] else "-", _ts(last["started"]) if last else "-",
                          last.get("status", "-"), str(res.get("status") or res.get("phase") or last.get("error") or "-"))
        out.print(table)

    @jobs_app.command("run")
    def jobs_run(name: str = typer.Argument(..., help="finetune | rollout"), as_json: bool = JsonOpt,
                 config: Optional[Path] = ConfigOpt):
        """Run one job now, in this process (refused while it runs elsewhere)."""
        from jobs.runner import JOBS, JobBusy, run_job
        from serving.cli.main import fail, settings_or_exit

        if name not in JOBS:
            fail(f"no job {name!r}: the jobs are {', '.join(JOBS)}")
        logging.basicConfig(level=logging.WARNING)
        settings = settings_or_exit(config)
        try:
            record = run_job(settings, name, "manual")
        except JobBusy as exc:
            fail(str(exc), 1)
        if as_json:
            print(json.dumps(record))
        else:
            out.print(f"job {name}: {record['status']} in {record['duration_s']} s")
            out.print_json(json.dumps(record.get("result") or {"error": record.get("error")}))
        if record["status"] != "ok":
            raise typer.Exit(1)

    @app.command("status")
    def status_cmd(as_json: bool = JsonOpt, url: Optional[str] = UrlOpt, config: Optional[Path] = ConfigOpt):
        """Champion, challenger, canary share and its evidence so far, fallback, last decisions."""
        with admin_client(config, url) as client:
            data = call(client, "GET", "/admin/rollout")
        if as_json:
            print(json.dumps(data))
            return
        out.print(f"champion [bold]{data['champion']}[/]; challenger {data['challenger'] or '-'}; canary share "
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
                table.add_row(arm, str(e["count"]), _fmt(e["kl_mean"]), _fmt(e["top1"], ".3f"))
            out.print(table)
        table = Table(title="last decisions")
        for col in ("at (UTC)", "decision", "version", "by", "detail"):
            table.add_column(col)
        for d in data["decisions"][:10]:
            ev = d.get("evidence") or {}
            detail = ev.get("reason") or ", ".join(ev.get("reasons") or []) or ev.get("status") or ""
            table.add_row(_ts(d["ts"]), d["decision"], d["version"] or "-", d["by"], str(detail)[:80])
        out.print(table)

    @app.command("approve")
    def approve_cmd(version: str = typer.Argument(..., help="the registry version to roll out"),
                    url: Optional[str] = UrlOpt, config: Optional[Path] = ConfigOpt):
        """Approve a version (sets the alias `approved`, as a person does in the MLflow UI)."""
        from serving.cli.main import fail

        if not version.isdigit():
            fail(f"a version is a number, not {version!r}")
        with admin_client(config, url) as client:
            data = call(client, "POST", f"/admin/rollout/approve/{version}")
        out.print(f"version {data['version']} approved: the canary starts at the controller's next tick")

    @app.command("rollback")
    def rollback_cmd(reason: Optional[str] = typer.Option(None, "--reason", help="Recorded with the decision."),
                     url: Optional[str] = UrlOpt, config: Optional[Path] = ConfigOpt):
        """Roll back the challenger in canary now."""
        with admin_client(config, url) as client:
            data = call(client, "POST", "/admin/rollout/rollback", json={"reason": reason})
        d = data["decision"]
        if d["decision"] != "rolled_back":
            out.print(f"nothing rolled back: {d['evidence'].get('reason')}")
            raise typer.Exit(1)
        out.print(f"version {d['version']} rolled back: {d['evidence']['reason']}")

    scenario_app = typer.Typer(no_args_is_help=True, help="End-to-end scenarios against a running service.")
    app.add_typer(scenario_app, name="scenario")

    @scenario_app.command("adapt")
    def scenario_adapt(
        as_json: bool = JsonOpt, url: Optional[str] = UrlOpt, config: Optional[Path] = ConfigOpt,
        work: Path = typer.Option(Path("runs/scenario-adapt"), "--work", help="Folder for predictors and, with "
                                  "--private, the stack."),
        private: bool = typer.Option(False, "--private", help="Start a private stack (free ports, under --work) "
                                     "with scenario-sized settings instead of using the running service."),
        out_json: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON report here."),
        plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write the timeline plot (PNG) here."),
        per_family: int = typer.Option(100, "--per-family", min=10, help="Test prompts per family for accuracy."),
        phase_budget: float = typer.Option(900, "--phase-budget", min=60, help="Seconds a traffic switch may take to "
                                           "adapt (fine-tunes, canaries) before the scenario moves on."),
    ):
        """Drift, fine-tune, approval, canary, promotion and rollback, with a timeline."""
        import os
        import platform
        import time

        import httpx

        from serving.bench import adapt as scenario_adapt
        from serving.bench.monitor import Driver
        from serving.cli.main import settings_or_exit
        from serving.api.auth import client_keys

        logging.basicConfig(level=logging.WARNING)
        err = Console(stderr=True)
        t0 = time.time()

        def go(settings, base, api_key, admin_key):
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {api_key}"}, timeout=120) as c, \
                    httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=60) as a:
                return scenario_adapt.run(Driver(c, a, max_tokens=8), settings, work, progress=err.print,
                                          per_family=per_family, phase_budget_s=phase_budget)

        if private:
            from serving.ops.stack import private_stack

            overrides = {"serve": {"defaults": {"shadow_rate": 0.5}, "shadow_max_inflight": 2, "replica_cpus": 0.1,
                                   "reconcile_s": 1.0},
                         "monitor": {"lease_ttl_s": 3, "claim_idle_s": 3,
                                     "drift": {"window": 60, "every_requests": 30, "min_rows": 30}},
                         "jobs": {"rollout_every_s": 1.0},
                         "adapt": {"min_samples": 150, "drift_shadow_rate": 1.0, "lr": 1e-3, "epochs": 60,
                                   "patience": 12},
                         "canary": {"share": 0.5, "min_samples": 20, "shadow_rate": 1.0},
                         "runtime": {"threads": 1}}
            with private_stack(work / "stack", **overrides) as st:
                report = go(st.settings, st.base, st.api_key, st.admin_key)
                settings = st.settings
        else:
            settings = settings_or_exit(config)
            api_key, admin = client_keys(settings)
            if api_key is None or admin is None:
                from serving.cli.main import fail

                fail("the scenario needs an API key and the admin key (settings or the key files `up` writes)")
            report = go(settings, url or f"http://{settings.host}:{settings.port}", api_key, admin)
        report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                             "python": platform.python_version()}
        adapt = settings.adapt.model_dump(mode="json", exclude={"webhook_secret"})
        report["settings"] = {"sparsity_mode": settings.runtime.mode, "adapt": adapt,
                              "canary": settings.canary.model_dump(), "private_stack": private}
        report["wall_s"] = round(time.time() - t0, 1)
        if plot_path:
            scenario_adapt.plot(report, plot_path)
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
        out.print(table)
        out.print_json(json.dumps({k: report.get(k) for k in ("failed_requests", "requests", "fidelity",
                                                               "accuracy", "goals", "seconds")}))
        for ph in report.get("phases", []):
            out.print(f"{ph['phase']} {ph['families']}: promoted {ph['promoted']}, target met {ph['target_met']}, "
                      f"accuracy {ph.get('accuracy', {}).get('new_before')} -> {ph.get('accuracy', {}).get('new_after')}")
