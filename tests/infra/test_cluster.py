"""A real two-node Ray cluster on one machine, started the way an operator starts one:
`ray start --head` and a second `ray start --address` node with resources of its own, token
authentication on (a token file named by RAY_AUTH_TOKEN_PATH), the app deployed from
infra/serve_config.yaml with `serve deploy`. GatedLLM replicas land one on each node (each node
offers one `llm_slot`); stopping the second node leaves the service answering.

Only what one machine forces is changed in the Serve config: the HTTP proxy runs on the head
alone (both nodes share one host, hence one port), it binds to 127.0.0.1 on a free port, the
settings file is this test's, and the deployments get placement options.

Figures (deploy time, replicas per node, requests before / during / after the stop) are
printed as one JSON line: `pytest -m cluster tests/infra/test_cluster.py -s`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.support import free_port, save_tiny_model, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.service]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SLOT = "llm_slot"  # one per node: with two GatedLLM replicas, one lands on each node


def node_ports(head: bool) -> dict[str, int]:
    names = ["node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port"]
    if head:
        names += ["port", "dashboard-port", "ray-client-server-port"]
    return {n: free_port() for n in names}


def ray_start(env: dict, ports: dict[str, int], resources: dict, head_address: str | None, temp_dir: Path,
              workers: tuple[int, int]) -> None:
    # no --node-ip-address: Ray 2.60 rewrites 127.0.0.1 to the routable address anyway (OPERATIONS.md)
    cmd = [str(BIN / "ray"), "start", "--num-cpus", "1",
           "--resources", json.dumps(resources), "--object-store-memory", str(100 << 20),
           "--min-worker-port", str(workers[0]), "--max-worker-port", str(workers[1]), "--disable-usage-stats"]
    cmd += [f"--{name}={port}" for name, port in ports.items()]
    if head_address is None:
        cmd += ["--head", "--temp-dir", str(temp_dir), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1"]
    else:
        cmd += ["--address", head_address]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


def free_port_range(n: int = 40) -> tuple[int, int]:
    """n consecutive free ports for one node's workers (nodes must not share worker ports)."""
    import socket

    for _ in range(200):
        start = free_port()
        if start + n >= 65535:
            continue
        try:
            socks = []
            for p in range(start, start + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", p))
            return start, start + n - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def cluster_processes(temp_dir: Path, gcs_port: int) -> list[psutil.Process]:
    """Every process of this cluster: its system processes name the temp dir or the GCS
    address; workers are their descendants."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if str(temp_dir) in cmd or f":{gcs_port}" in cmd:
            roots.append(proc)
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def node_processes(node_manager_port: int) -> list[psutil.Process]:
    """The raylet of one node (by its node-manager port) and everything it started."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if any(a == f"--node_manager_port={node_manager_port}" for a in cmd):
            return [proc] + proc.children(recursive=True)
    raise AssertionError(f"no raylet with node manager port {node_manager_port}")


def terminate(procs: list[psutil.Process], timeout: float = 15) -> None:
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def listeners(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of the TCP listening sockets of these processes."""
    out = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.NoSuchProcess:
                continue
            out.append((conn.laddr.ip, conn.laddr.port, name))
    return sorted(set(out))


class Load(threading.Thread):
    """One client sending completions back to back; every outcome is kept with its time."""

    def __init__(self, base: str, key: str):
        super().__init__(daemon=True)
        self.base, self.key, self.stop, self.results = base, key, threading.Event(), []

    def run(self):
        with httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.key}"}, timeout=30) as c:
            i = 0
            while not self.stop.is_set():
                i += 1
                t0 = time.time()
                try:
                    r = c.post("/v1/completions", json={"prompt": "3 + 4 = 7 ; 2 + 2 =", "max_tokens": 3,
                                                        "temperature": 0},
                               headers={"X-Request-ID": f"load-{i}"})
                    ok, detail = r.status_code == 200, r.status_code
                except httpx.HTTPError as exc:
                    ok, detail = False, type(exc).__name__
                self.results.append((t0, time.time(), ok, detail))

    def between(self, start: float, end: float) -> tuple[int, int]:
        sel = [r for r in self.results if start <= r[0] < end]
        return sum(1 for r in sel if r[2]), sum(1 for r in sel if not r[2])


def gated_replicas(dashboard: str, nodes: dict[str, str]) -> dict[str, int]:
    """Alive GatedLLM replica actors per node name."""
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
    count: dict[str, int] = {}
    for a in actors:
        if a.class_name == "ServeReplica:shadowgate:GatedLLM":
            name = nodes.get(a.node_id, a.node_id)
            count[name] = count.get(name, 0) + 1
    return count


@pytest.fixture(scope="module")
def cluster(redis_url, mlflow_uri, tmp_path_factory):
    """Token file, two Ray nodes, a lean MLflow server with a champion; yields what the test needs."""
    # a short folder of its own: Ray's socket paths must stay under the kernel's 107 characters
    temp_dir = Path(tempfile.mkdtemp(prefix="sgc-"))
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})

    work = tmp_path_factory.mktemp("cluster")
    head_ports, worker_ports = node_ports(head=True), node_ports(head=False)
    gcs = f"127.0.0.1:{head_ports['port']}"
    api_key, admin_key = "sg-" + secrets.token_urlsafe(16), "sg-admin-" + secrets.token_urlsafe(16)
    serve_port = free_port()
    settings_file = work / "settings.yaml"
    settings_file.write_text(yaml.safe_dump({
        "model": {"name": str(save_tiny_model(work / "model"))},
        "runtime": {"threads": 1},
        "host": "127.0.0.1", "port": serve_port,
        "api_keys": [{"key": api_key, "name": "cluster"}], "admin_key": admin_key,
        "state_dir": str(work / "state"),
        "redis": {"url": redis_url, "start_local": False, "prefix": f"sgcluster-{secrets.token_hex(4)}"},
        "mlflow": {"tracking_uri": mlflow_uri, "start_local": False, "bootstrap_per_family": 4,
                   "bootstrap_epochs": 2, "reference_per_family": 20},
        "serve": {"llm_replicas": 2, "defaults": {"shadow_rate": 0.0}},
    }))
    try:
        from serving.ops.launcher import bootstrap_registry
        from serving.settings import load_settings

        champion = bootstrap_registry(load_settings(settings_file))
        t0 = time.time()
        ray_start(env, head_ports, {"head": 1, SLOT: 1}, None, temp_dir, free_port_range())
        ray_start(env, worker_ports, {"worker": 1, SLOT: 1}, gcs, temp_dir, free_port_range())
        t_nodes = time.time() - t0
        yield {"env": env, "temp_dir": temp_dir, "gcs": gcs, "head_ports": head_ports, "worker_ports": worker_ports,
               "dashboard": f"http://127.0.0.1:{head_ports['dashboard-port']}", "settings_file": settings_file,
               "base": f"http://127.0.0.1:{serve_port}", "serve_port": serve_port, "api_key": api_key,
               "champion": champion, "nodes_s": t_nodes, "work": work}
    finally:
        terminate(cluster_processes(temp_dir, head_ports["port"]))
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(temp_dir, ignore_errors=True)


def serve_config(cluster) -> Path:
    """infra/serve_config.yaml with what one machine and this test change (see the module doc)."""
    cfg = yaml.safe_load((ROOT / "infra" / "serve_config.yaml").read_text())
    cfg["proxy_location"] = "HeadOnly"
    cfg["http_options"] = {**cfg.get("http_options", {}), "host": "127.0.0.1", "port": cluster["serve_port"]}
    (app,) = cfg["applications"]
    assert app["import_path"] == "serving.app:app_builder"
    app["args"] = {"config": str(cluster["settings_file"])}
    on_head = {"num_cpus": 0, "resources": {"head": 0.01}}
    app["deployments"] = [
        {"name": "GatedLLM", "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25, "resources": {SLOT: 1}}},
        {"name": "Gateway", "ray_actor_options": on_head},
        {"name": "ShadowDense", "ray_actor_options": on_head},
        {"name": "Monitor", "ray_actor_options": on_head},
    ]
    path = cluster["work"] / "serve_config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_two_nodes_serve_deploy_and_a_node_stopped(cluster):
    env, base = cluster["env"], cluster["base"]
    import ray

    nodes = {}
    ray.init(address=cluster["gcs"], log_to_driver=False)
    try:
        alive = [n for n in ray.nodes() if n["Alive"]]
        assert len(alive) == 2
        for n in alive:
            nodes[n["NodeID"]] = "head" if "head" in n["Resources"] else "worker"
        assert sorted(nodes.values()) == ["head", "worker"]
    finally:
        ray.shutdown()

    # token auth is on: a client without the token is refused
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN_PATH",)}
    no_token["HOME"] = str(cluster["work"])  # no ~/.ray/auth_token either
    out = subprocess.run([str(BIN / "ray"), "status", "--address", cluster["gcs"]], env=no_token,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "token" in (out.stdout + out.stderr).lower()

    t0 = time.time()
    out = subprocess.run([str(BIN / "serve"), "deploy", str(serve_config(cluster)), "-a", cluster["dashboard"]],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    def ready():
        try:
            return httpx.get(base + "/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 420, interval=1, what="/readyz")
    placed = wait_until(lambda: (c := gated_replicas(cluster["dashboard"], nodes)) == {"head": 1, "worker": 1} and c,
                        240, interval=1, what="one GatedLLM replica per node")
    deploy_s = time.time() - t0

    # every listener of the cluster's processes, by address (recorded in docs/OPERATIONS.md)
    pids = {p.pid for p in cluster_processes(cluster["temp_dir"], cluster["head_ports"]["port"])}
    ports = listeners(pids)
    assert ("127.0.0.1", cluster["serve_port"]) in {(ip.removeprefix("::ffff:"), port) for ip, port, _ in ports}
    # Ray's node metrics answer on every interface without the token (why the NetworkPolicy exists)
    metrics = cluster["head_ports"]["metrics-export-port"]
    assert ("0.0.0.0", metrics) in {(ip, port) for ip, port, _ in ports}
    assert httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).status_code == 200

    load = Load(base, cluster["api_key"])
    load.start()
    wait_until(lambda: sum(1 for r in load.results if r[2]) >= 20, 120, interval=0.5, what="20 answered requests")
    t_stop = time.time()
    terminate(node_processes(cluster["worker_ports"]["node-manager-port"]))
    t_stopped = time.time()
    ray.init(address=cluster["gcs"], log_to_driver=False)
    try:
        wait_until(lambda: sum(n["Alive"] for n in ray.nodes()) == 1, 120, interval=0.5,
                   what="the worker node marked dead")
    finally:
        ray.shutdown()
    t_dead = time.time()
    after = wait_until(lambda: (c := gated_replicas(cluster["dashboard"], nodes)) == {"head": 1} and c,
                       120, interval=1, what="GatedLLM on the head alone")
    t_settled = time.time()
    n_settled = len(load.results)
    wait_until(lambda: sum(1 for r in load.results[n_settled:] if r[2]) >= 20, 120, interval=0.5,
               what="20 requests after the stop")
    load.stop.set()
    load.join(60)

    before_ok, before_fail = load.between(0, t_stop)
    during_ok, during_fail = load.between(t_stop, t_settled)
    after_ok, after_fail = load.between(t_settled, float("inf"))
    figures = {
        "nodes_start_s": round(cluster["nodes_s"], 1), "deploy_to_ready_s": round(deploy_s, 1),
        "gated_llm_replicas_per_node": placed, "after_stop": after,
        "node_stop_s": round(t_stopped - t_stop, 1), "node_marked_dead_s": round(t_dead - t_stop, 1),
        "requests_before_stop": {"ok": before_ok, "failed": before_fail},
        "requests_during_stop": {"ok": during_ok, "failed": during_fail,
                                 "failures": sorted({str(r[3]) for r in load.results if not r[2]})},
        "requests_after_stop": {"ok": after_ok, "failed": after_fail},
        "listeners": [f"{ip}:{port} {name}" for ip, port, name in ports],
    }
    print("CLUSTER_FIGURES " + json.dumps(figures))
    assert before_fail == 0 and before_ok >= 20
    assert after_fail == 0 and after_ok >= 20
    # the head's replica answered while the node went away; what failed is in the figures
    assert during_ok >= 1
    # the API answers still: readiness, and a completion through the head's replica
    assert ready()
