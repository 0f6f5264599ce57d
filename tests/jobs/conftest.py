"""Fixtures of the jobs tests: the embedded model, a serving engine on it, and shadow samples
made by the real shadow path (served by the engine, recorded by
serving.replica.shadow.shadow_run). The redis-server and the MLflow server (`redis_url`,
`mlflow_uri`) are tests/conftest.py's."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def loaded():
    from adapter.runtime.loading import load
    from adapter.config import RuntimeConfig

    return load("default", RuntimeConfig(dtype="float32"))


@pytest.fixture(scope="session")
def engine():
    """A serving engine on the embedded model (float32), as a GatedLLM/ShadowDense replica holds."""
    from monitor.state import ControlState
    from serving.replica.engine import Engine
    from serving.settings import Settings

    eng = Engine(Settings(runtime={"dtype": "float32"}), None)
    eng.apply(ControlState())  # no registry: it serves dense (the dense model's own continuations)
    return eng


def served(engine, prompts: list[str], max_tokens: int = 8, stop: tuple[str, ...] = (";",)) -> list:
    """Each prompt served dense through the engine, as a client asking for a few-shot answer does."""
    from serving.replica.engine import GenRequest

    return [engine.complete(GenRequest(request_id=f"req-{k}", prompt=p, max_tokens=max_tokens, temperature=0.0,
                                       stop=stop)) for k, p in enumerate(prompts)]


def shadow_records(engine, families: list[str], n_per_family: int, split: str = "traffic", offset: int = 0,
                   policy=None, stop: tuple[str, ...] = (";",)):
    """Shadow records of suite prompts of `families` made by the real shadow path: each prompt
    served by the engine, then serving.replica.shadow.shadow_run (what ShadowDense writes)."""
    from adapter.embedded import suite as tasks
    from adapter.pipeline.targets import TargetPolicy
    from serving.replica.shadow import shadow_run

    instances = [i for i in tasks.split(split, n_per_family + offset) if i.family in families]
    by_family: dict[str, list] = {}
    for inst in instances:
        by_family.setdefault(inst.family, []).append(inst)
    chosen = [i for f in families for i in by_family[f][offset:offset + n_per_family]]
    out = []
    for res in served(engine, [i.prompt for i in chosen], stop=stop):
        sample = {"request_id": res.request_id, "prompt_ids": res.prompt_ids, "token_ids": res.token_ids,
                  "version": None, "arm": "champion", "sparsity": 0.5, "generation": 1, "key": "test",
                  "stop": list(res.stop)}
        record, _ = shadow_run(engine, sample, policy or TargetPolicy())
        out.append(record)
    return out


def write_samples(client, prefix: str, records) -> list[str]:
    from monitor.samples import SampleStore

    store = SampleStore(client, prefix, 10_000)
    fid = {"kl_mean": 0.1, "kl_max": 0.2, "top1_agreement": 0.9, "exact_match": False, "positions": 1}
    return [store.add(r, fid, 3600) for r in records]
