"""The rollout loop end to end on a private stack (redis-server, an MLflow server, Ray Serve,
the embedded model) under a steady client load: a version approved in the real MLflow UI
(headless Chromium) is canaried and promoted; a bad one (reversed scores) approved with
`shadowgate approve` is rolled back automatically and never served again; 0 failed requests."""

from __future__ import annotations

import json
import threading

import pytest
import redis

from jobs.mlflow_ui import set_alias_in_ui
from monitor.keys import Keys
from serving.bench.harness import Driver, suite_prompts
from serving.bench.monitor import reversed_predictor
from serving.ops.stack import private_stack
from tests.support import operator_cli, wait_until

pytestmark = pytest.mark.service


class Load:
    """A client sending completions one after another until stopped."""

    def __init__(self, driver: Driver, prompts: list[str]):
        self.d, self.prompts, self.stop = driver, prompts, threading.Event()
        self.versions: list[tuple[str, str]] = []  # (predictor_version, arm) of each answer
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        i = 0
        while not self.stop.is_set():
            out = self.d.complete(self.prompts[i % len(self.prompts)])
            if out:
                ext = out["shadowgate"]
                self.versions.append((ext["predictor_version"], ext["arm"]))
            i += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("adaptation")
    overrides = {"serve": {"defaults": {"shadow_rate": 1.0}, "shadow_max_inflight": 2, "replica_cpus": 0.1,
                           "reconcile_s": 1.0},
                 "monitor": {"slo": {"min_samples": 8, "window": 200}, "lease_ttl_s": 3, "claim_idle_s": 3},
                 "jobs": {"rollout_every_s": 1.0},
                 "canary": {"share": 0.5, "min_samples": 8, "timeout_s": 240, "margin": 0.1, "shadow_rate": None},
                 "mlflow": {"reference_per_family": 20}, "runtime": {"threads": 1}}
    with private_stack(work, **overrides) as st:
        with st.client() as c, st.client(admin=True) as a:
            yield {"stack": st, "driver": Driver(c, a), "work": work, "redis": redis.Redis.from_url(st.settings.redis.url)}


def rollout(d: Driver) -> dict:
    r = d.admin.get("/admin/rollout")
    r.raise_for_status()
    return r.json()


def decided(d: Driver, decision: str, version: str):
    return next((x for x in rollout(d)["decisions"] if x["decision"] == decision and x["version"] == version), None)


def test_ui_approval_canaries_and_promotes_then_a_bad_version_is_rolled_back(stack):
    st, d, r = stack["stack"], stack["driver"], stack["redis"]
    registry = st.registry()
    champion = st.champion
    good = registry.register(registry.download(champion), tags={"source": "test-copy"})
    bad = registry.register(reversed_predictor(registry.download(champion), stack["work"] / "reversed"),
                            tags={"source": "test-reversed"})
    cli = operator_cli(st.base, st.admin_key)

    with Load(Driver(d.client, d.admin), suite_prompts("test", None, 60)) as load:
        # a person approves in the MLflow UI; the canary starts
        set_alias_in_ui(st.settings.mlflow.tracking_uri, st.settings.mlflow.registered_model, good, timeout_s=120)
        wait_until(lambda: rollout(d)["challenger"] == good, 60, what="the canary", detail=lambda: rollout(d))
        wait_until(lambda: decided(d, "promoted", good), 240, what="the promotion", detail=lambda: rollout(d))
        assert registry.aliases()["champion"] == good
        assert "retired" in registry.version(champion).tags
        assert d.alerts("promotion")[0]["predictor_version"] == good
        # the signed registry webhook reached the service (polling would have worked too)
        assert int(r.get(Keys(st.settings.redis.prefix).rollout_webhook_deliveries) or 0) >= 1
        # a bad one, approved from the CLI: rolled back automatically
        assert f"version {bad} approved" in cli("approve", bad)
        wait_until(lambda: decided(d, "rolled_back", bad), 240, what="the rollback", detail=lambda: rollout(d))
        n_after = len(load.versions)
        # answers after the rollback, or the check below that none is the bad version's is empty
        wait_until(lambda: len(load.versions) >= n_after + 6, 60, what="six answers after the rollback")
    status = json.loads(cli("status", "--json"))
    assert status["champion"] == good and status["challenger"] is None and status["canary_share"] == 0.0
    assert status["fallback"] == "none"
    assert [x["decision"] for x in status["decisions"][:2]] == ["rolled_back", "canary_started"]
    assert "rolled_back" in registry.version(bad).tags
    assert d.alerts("rollback")[0]["predictor_version"] == bad
    assert all(v != bad for v, _ in load.versions[n_after:])  # a rolled-back version is not served
    assert {arm for v, arm in load.versions if v == good} >= {"challenger", "champion"}
    assert load.d.failed == 0, load.d.errors[:5]
    table = cli("status")
    assert "last decisions" in table and "rolled_back" in table
