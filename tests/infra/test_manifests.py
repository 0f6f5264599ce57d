"""infra/: the KubeRay RayService, the Serve config, the container images and the compose file,
parsed and checked for what a deploy needs. The Serve configs' import path is imported and
called for real (it must give a Ray Serve Application); the settings in the ConfigMap and every
SHADOWGATE_* variable must be fields of serving.settings.Settings. Images are not built here
(their base images come from registries these tests cannot reach)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
APP_DEPLOYMENTS = {"Gateway", "GatedLLM", "ShadowDense", "Monitor"}


def load_all(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d is not None]


def by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    return load_all("rayservice.yaml")


@pytest.fixture(scope="module")
def rayservice(manifests) -> dict:
    return by_kind(manifests, "RayService")


@pytest.fixture(scope="module")
def configmap(manifests) -> dict:
    return by_kind(manifests, "ConfigMap")


def serve_schema(cfg: dict):
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.parse_obj(cfg)


def groups(rayservice) -> list[tuple[str, dict]]:
    spec = rayservice["spec"]["rayClusterConfig"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def containers(rayservice) -> list[tuple[str, dict]]:
    return [(name, c) for name, g in groups(rayservice) for c in g["template"]["spec"]["containers"]]


def settings_field(path: list[str]) -> bool:
    """Whether SHADOWGATE_A__B names the field a.b of Settings (env names are case-insensitive)."""
    from pydantic import BaseModel

    from serving.settings import Settings

    model = Settings
    for part in path:
        fields = {k.lower(): v for k, v in model.model_fields.items()}
        if part.lower() not in fields:
            return False
        ann = fields[part.lower()].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None and part is not path[-1]:
            return False
    return True


def check_env_names(names) -> None:
    for name in names:
        if name.startswith("SHADOWGATE_") and name != "SHADOWGATE_CONFIG":
            assert settings_field(name[len("SHADOWGATE_"):].split("__")), f"{name} is no settings field"


def build_app(import_path: str, args: dict, tmp_path: Path, settings_yaml: str | None):
    """Import the config's import_path and call it with its args, the settings file written
    to a temporary path (the container path does not exist here)."""
    from ray.serve import Application
    from ray.serve._private.utils import import_attr

    builder = import_attr(import_path)
    assert callable(builder)
    if settings_yaml is not None:
        path = tmp_path / PurePosixPath(args["config"]).name
        path.write_text(settings_yaml)
        args = {**args, "config": str(path)}
    else:
        args = {k: v for k, v in args.items() if k != "config"}
    app = builder(args)
    assert isinstance(app, Application)
    gateway = app._bound_deployment
    assert {gateway.name} | {a._bound_deployment.name for a in gateway.init_args[1:]} == APP_DEPLOYMENTS
    return app


# --- the RayService --------------------------------------------------------------------------

def test_rayservice_head_and_worker_groups(rayservice):
    import ray

    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    spec = rayservice["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == ray.__version__  # the version the project pins
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    workers = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(workers) == {"cpu", "gpu"}
    for g in workers.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    assert workers["cpu"]["replicas"] >= 2  # two GatedLLM replicas on two pods
    assert workers["gpu"]["rayStartParams"]["num-gpus"] == "1"
    gpu = workers["gpu"]["template"]["spec"]["containers"][0]
    assert gpu["image"].endswith("-cuda") and gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for name, c in containers(rayservice):
        if name != "gpu":
            assert c["image"].endswith("-cpu"), name


def test_rayservice_containers_env_resources_probes(rayservice, configmap):
    secret_keys, config_keys = set(), set()
    for name, c in containers(rayservice):
        env = {e["name"]: e for e in c["env"]}
        redis, mlflow = env["SHADOWGATE_REDIS__URL"], env["SHADOWGATE_MLFLOW__TRACKING_URI"]
        assert "value" not in redis and redis["valueFrom"]["secretKeyRef"]["name"] == "shadowgate-secrets"
        assert mlflow["valueFrom"]["configMapKeyRef"]["name"] == configmap["metadata"]["name"]
        for key in ("SHADOWGATE_API_KEYS", "SHADOWGATE_ADMIN_KEY"):  # secrets never as plain values
            assert "secretKeyRef" in env[key]["valueFrom"], (name, key)
        for e in c["env"]:
            ref = e.get("valueFrom", {})
            if "secretKeyRef" in ref:
                secret_keys.add(ref["secretKeyRef"]["key"])
            if "configMapKeyRef" in ref:
                config_keys.add(ref["configMapKeyRef"]["key"])
        check_env_names(env)
        res = c["resources"]
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res[part]), (name, part)
        assert res["requests"]["memory"] == res["limits"]["memory"]  # no overcommit of memory
        if name == "head":
            # KubeRay's own probes: a head waiting for the app would keep the workers out
            assert "readinessProbe" not in c and "livenessProbe" not in c
        else:
            ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
            assert (ready["path"], ready["port"]) == ("/readyz", 8000)
            assert (live["path"], live["port"]) == ("/healthz", 8000)
            assert c["livenessProbe"]["initialDelaySeconds"] >= 120  # a model load is not a dead pod
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts["/etc/shadowgate"] == "config"
    assert config_keys <= set(configmap["data"])
    assert secret_keys == {"redis-url", "api-keys", "admin-key"}  # the keys the header's kubectl creates
    header = (INFRA / "rayservice.yaml").read_text()
    for key in secret_keys:
        assert f"--from-literal={key}=" in header


def test_serve_config_v2_is_a_serve_config_whose_app_builds(rayservice, configmap, tmp_path):
    cfg = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    schema = serve_schema(cfg)
    (app,) = schema.applications
    assert app.import_path == "serving.app:app_builder" and app.route_prefix == "/"
    assert cfg["http_options"]["port"] == 8000
    names = {d["name"] for d in cfg["applications"][0]["deployments"]}
    assert names <= APP_DEPLOYMENTS
    llm = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "GatedLLM")
    assert llm["num_replicas"] >= 2
    # the args' settings file is the ConfigMap's, mounted where the containers mount it
    assert PurePosixPath(app.args["config"]).parent == PurePosixPath("/etc/shadowgate")
    settings_yaml = configmap["data"][PurePosixPath(app.args["config"]).name]
    built = build_app(app.import_path, app.args, tmp_path, settings_yaml)
    # built from the ConfigMap's settings: its replica count reaches the GatedLLM deployment
    llm_bound = next(a._bound_deployment for a in built._bound_deployment.init_args[1:]
                     if a._bound_deployment.name == "GatedLLM")
    assert llm_bound._deployment_config.num_replicas == llm["num_replicas"]

    from serving.settings import load_settings

    s = load_settings(tmp_path / "config.yaml")
    assert s.host == "0.0.0.0" and not s.redis.start_local and not s.mlflow.start_local
    assert s.serve.llm_replicas == llm["num_replicas"]


def test_network_policy_keeps_ray_ports_inside(manifests):
    pol = by_kind(manifests, "NetworkPolicy")
    assert pol["apiVersion"] == "networking.k8s.io/v1"
    rules = pol["spec"]["ingress"]
    open_to_all = [r for r in rules if "from" not in r]
    assert [p["port"] for r in open_to_all for p in r["ports"]] == [8000]
    metrics_rule = next(r for r in rules if any(p["port"] == 8080 for p in r.get("ports", [])))
    assert metrics_rule["from"][0]["namespaceSelector"]


# --- the Serve config for `serve deploy` -------------------------------------------------------

def test_serve_config_for_serve_deploy(tmp_path, rayservice):
    cfg = yaml.safe_load((INFRA / "serve_config.yaml").read_text())
    (app,) = serve_schema(cfg).applications
    v2 = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert app.import_path == v2["applications"][0]["import_path"]
    assert cfg["http_options"]["port"] == 8000
    build_app(app.import_path, app.args, tmp_path, "redis:\n  start_local: false\n")


# --- the container images ------------------------------------------------------------------

def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (INFRA / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("name,base,index", [
    ("Dockerfile", "python:3.11-", "https://download.pytorch.org/whl/cpu"),
    ("Dockerfile.cuda", "nvidia/cuda:", "https://download.pytorch.org/whl/cu"),
])
def test_dockerfiles(name, base, index):
    ins = dockerfile(name)
    assert ins[0][0] == "FROM" and ins[0][1].startswith(base)
    proj = pyproject()
    assert "torch==2.13.0" in proj["project"]["dependencies"]  # the pin the install relies on
    installs = [args for op, args in ins if op == "RUN" and "pip install" in args]
    assert any(index in a and "'.[postgres]'" in a for a in installs), installs
    assert "postgres" in proj["project"]["optional-dependencies"]
    copied = {shlex.split(args)[0] for op, args in ins if op == "COPY"}
    packages = {p.rstrip("*") for p in proj["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml"} <= copied
    entry = next(args for op, args in ins if op == "ENTRYPOINT")
    assert yaml.safe_load(entry) == ["shadowgate"] and "shadowgate" in proj["project"]["scripts"]
    assert yaml.safe_load(next(args for op, args in ins if op == "CMD")) == ["up"]
    assert ("USER", "ray") in ins  # not root; KubeRay's images use uid 1000 too
    if name == "Dockerfile.cuda":
        assert any("python3.11" in args for op, args in ins if op == "RUN")
    ignore = [ln.strip() for ln in (INFRA / f"{name}.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*" and {f"!{p}/" for p in packages} <= set(ignore)


# --- compose ---------------------------------------------------------------------------------

def test_compose_services(tmp_path):
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    svc = compose["services"]
    assert {"redis", "postgres", "mlflow", "shadowgate", "monitor"} <= set(svc)
    redis = svc["redis"]["command"]
    assert redis[0] == "redis-server" and redis[redis.index("--appendonly") + 1] == "yes"
    assert any(v.split(":")[1] == "/data" for v in svc["redis"]["volumes"])
    assert svc["postgres"]["image"].startswith("postgres:")
    assert any(v.endswith(":/var/lib/postgresql/data") for v in svc["postgres"]["volumes"])
    ml = svc["mlflow"]["command"]
    store = ml[ml.index("--backend-store-uri") + 1]
    assert store.startswith("postgresql+psycopg2://") and "@postgres:5432/" in store
    assert svc["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svc["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert svc["shadowgate"]["command"] == ["up"] and svc["monitor"]["command"] == ["monitor", "run"]
    for name in ("shadowgate", "monitor"):
        env = svc[name]["environment"]
        assert env["SHADOWGATE_REDIS__URL"].startswith("redis://") and "@redis:6379" in env["SHADOWGATE_REDIS__URL"]
        assert env["SHADOWGATE_MLFLOW__TRACKING_URI"] == "http://mlflow:5000"
        assert env["RAY_AUTH_MODE"] == "token"
        check_env_names(env)
        assert {"redis", "mlflow"} <= set(svc[name]["depends_on"])
    for name, s in svc.items():  # nothing published beyond the host's loopback
        for p in s.get("ports", []):
            assert p.startswith("127.0.0.1:"), (name, p)
    # every required variable has a line in the example env file
    required = set(re.findall(r"\$\{(\w+):\?", (INFRA / "compose.yaml").read_text()))
    example = {line.split("=")[0] for line in (INFRA / "compose.env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert required == example
    # the service's settings as compose sets them load (placeholders for the variables)
    from serving.settings import load_settings

    values = {k: v.replace("${REDIS_PASSWORD:?set REDIS_PASSWORD}", "pw") for k, v in
              svc["shadowgate"]["environment"].items() if k.startswith("SHADOWGATE_")}
    values = {k: re.sub(r"\$\{\w+:\?[^}]*\}", "x", v) for k, v in values.items()}
    mp = pytest.MonkeyPatch()
    try:
        for k, v in values.items():
            mp.setenv(k, v)
        s = load_settings(None)
        assert s.redis.url == "redis://:pw@redis:6379/0" and not s.redis.start_local
        assert s.mlflow.tracking_uri == "http://mlflow:5000" and s.host == "0.0.0.0"
    finally:
        mp.undo()
