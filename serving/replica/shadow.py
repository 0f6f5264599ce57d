"""ShadowDense: recomputes a sampled request densely and writes a shadow sample.

For a served (prompt, continuation) it runs, teacher-forced, the dense model and the same
sparse method the request used (same predictor version, sparsity and mode), giving per
position KL(dense || sparse), top-1 agreement and whether the dense model would have produced
the same continuation; then the target spec of the sample under the target policy
(adapter.pipeline.targets, `adapt.targets`: the dense tokens up to the request's stop string,
predictable prompt positions), as token ids. No backward pass here: the fine-tune job scores
the specs in batches and can rescore the history under another policy. The sample goes to a
capped Redis stream; the fidelity also goes to the request's audit record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

from ray import serve

from adapter.pipeline import targets, traces
from adapter.pipeline.targets import TargetPolicy
from adapter.selection.methods import dense as dense_method
from jobs.registry import registry_for
from monitor.fidelity import compare
from monitor.keys import Keys
from monitor.redis_client import redis_client
from monitor.samples import SampleStore
from serving.replica.engine import Engine
from serving.settings import Settings

log = logging.getLogger(__name__)


def shadow_run(engine: Engine, sample: dict, policy: TargetPolicy) -> tuple[traces.TraceRecord, dict]:
    """The sample's fidelity, and its record: token ids only (the served prompt and
    continuation, the dense model's tokens at those positions and the target spec under
    `policy`); the fine-tune job computes the importance targets from them, batched."""
    prompt, cont = sample["prompt_ids"], sample["token_ids"]
    rt = engine.runtime
    dense = rt.score(prompt, cont, dense_method())
    sparse = rt.score(prompt, cont, engine.method_for(sample["version"], sample["sparsity"]))
    fid = compare(dense, sparse, cont)
    stops = list(sample.get("stop") or [])
    spec = targets.make_spec(rt.model, engine.tokenizer, prompt, fid.pseudo_labels, stops, policy)
    meta = {"schema": traces.SCHEMA, "model_fingerprint": engine.fingerprint, "source": "shadow",
            "targets": "pseudo_labels", "policy": policy.model_dump(), "family": None,
            "prompt_len": len(prompt), "request_id": sample["request_id"],
            "predictor_version": sample["version"], "arm": sample.get("arm"), "sparsity": sample["sparsity"],
            "generation": sample["generation"], "key": sample["key"], "stop": stops,
            "token_ids": list(cont), "pseudo_labels": list(fid.pseudo_labels), **spec.meta()}
    return traces.TraceRecord(meta=meta, tensors={}), fid.as_dict()


@serve.deployment(name="ShadowDense")
class ShadowDense:
    def __init__(self, settings: Settings):
        self.settings = settings
        registry = registry_for(settings)
        self.engine = Engine(settings, registry)
        self.r = redis_client(settings.redis)
        self.store = SampleStore(self.r, settings.redis.prefix, settings.serve.shadow_stream_maxlen)
        self.lock = threading.Lock()  # criteria hooks the model's modules: one run at a time
        self.last_sweep = 0.0

    def _run(self, sample: dict) -> dict:
        with self.lock:
            t0 = time.perf_counter()
            record, fid = shadow_run(self.engine, sample, self.settings.adapt.targets)
            entry = self.store.add(record, fid, sample["retention_s"])
            summary = {**{k: fid[k] for k in ("kl_mean", "kl_max", "top1_agreement", "exact_match",
                                               "positions")},
                       "version": sample["version"], "sample_id": entry,
                       "shadow_ms": round((time.perf_counter() - t0) * 1000, 1)}
            self.r.set(Keys(self.settings.redis.prefix).audit_shadow(sample["request_id"]),
                       json.dumps(summary), ex=self.settings.serve.audit_retention_s)
            if time.time() - self.last_sweep > 60:
                self.store.sweep()
                self.last_sweep = time.time()
            return summary

    async def run(self, sample: dict) -> dict:
        return await asyncio.to_thread(self._run, sample)
