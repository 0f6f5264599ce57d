"""Fixtures of the jobs tests: a private redis-server, a real MLflow server on a free port,
the embedded model, and shadow samples made the way ShadowDense makes them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import free_port, redis_url  # noqa: F401


def start_mlflow_server(folder: Path) -> tuple[str, subprocess.Popen]:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": "aGVsbG8taGVsbG8taGVsbG8taGVsbG8taGVsbG8tISE="}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                             "--artifacts-destination", str(folder / "artifacts")],
                            stdout=open(folder / "server.log", "ab"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                return uri, proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"the MLflow server did not come up: see {folder / 'server.log'}")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    uri, proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


@pytest.fixture(scope="session")
def loaded():
    from adapter.runtime.loading import load
    from adapter.config import RuntimeConfig

    return load("default", RuntimeConfig(dtype="float32"))


def shadow_records(loaded, families: list[str], n_per_family: int, split: str = "test", offset: int = 0):
    """Trace records of suite prompts of `families`, with the served prompt and continuation
    (the answer) in their meta, as a shadow run writes them."""
    from adapter.pipeline import criteria
    from adapter.evaluation import scoring as evaluate
    from adapter.embedded import suite as tasks
    from adapter.pipeline import traces

    rt, tok = loaded.runtime, loaded.tokenizer
    instances = [i for i in tasks.split(split, n_per_family + offset) if i.family in families]
    by_family: dict[str, list] = {}
    for inst in instances:
        by_family.setdefault(inst.family, []).append(inst)
    chosen = [i for f in families for i in by_family[f][offset:offset + n_per_family]]
    pairs = evaluate.encode_pairs(tok, chosen)
    fp = traces.model_fingerprint(rt.model)
    out = []
    for start in range(0, len(pairs), 32):
        chunk = pairs[start:start + 32]
        batch = criteria.make_batch([p for p, _ in chunk], [a for _, a in chunk], tok.pad_token_id or 0)
        scores = criteria.compute(rt.model, batch, rt.shape.heads, rt.shape.head_dim)
        metas = [{"family": None, "prompt_len": len(p), "request_id": f"req-{start + j}", "predictor_version": "1",
                  "arm": "champion", "sparsity": 0.5, "generation": 1, "key": "test", "prompt_ids": p,
                  "token_ids": a} for j, (p, a) in enumerate(chunk)]
        common = {"model_fingerprint": fp, "source": "shadow", "targets": "pseudo_labels",
                  "criteria": list(criteria.CRITERIA)}
        out += traces.records_from_scores(scores, common, metas)
    return out


def write_samples(client, prefix: str, records) -> list[str]:
    from monitor.samples import SampleStore

    store = SampleStore(client, prefix, 10_000)
    fid = {"kl_mean": 0.1, "kl_max": 0.2, "top1_agreement": 0.9, "exact_match": False, "positions": 1}
    return [store.add(r, fid, 3600) for r in records]
