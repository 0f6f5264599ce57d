"""ShadowDense: recomputes a sampled request densely and writes a shadow sample.

For a served (prompt, continuation) it runs, teacher-forced, the dense model and the same
sparse method the request used (same predictor version, sparsity and mode), giving per
position KL(dense || sparse), top-1 agreement and whether the dense model would have produced
the same continuation; then the importance targets of every criterion with pseudo-labels
(the dense argmax tokens at the continuation positions), in the trace-record format the
predictor is trained on. The sample goes to a capped Redis stream; the fidelity also goes
to the request's audit record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import torch
from ray import serve

from adapter.pipeline import criteria

from adapter.pipeline import traces
from adapter.selection.methods import dense as dense_method
from jobs.registry import PredictorRegistry
from monitor.fidelity import compare
from monitor.redis_client import redis_client
from monitor.samples import SampleStore
from serving.engine import Engine
from serving.settings import Settings

log = logging.getLogger(__name__)


@torch.no_grad()
def predictable_positions(model, prompt: list[int]) -> list[int]:
    """Prompt positions whose token the dense model predicts (top-1) from what precedes it:
    more targets per sample than the few continuation tokens, and the ones the model's
    units demonstrably serve (in a few-shot prompt: the answers of the later shots)."""
    if len(prompt) < 3:
        return []
    ids = torch.tensor([list(prompt)], device=next(model.parameters()).device)
    pred = model(input_ids=ids).logits[0, :-1].argmax(-1).cpu()
    return [t + 1 for t in range(1, len(prompt) - 1) if int(pred[t]) == int(prompt[t + 1])]


def shadow_run(engine: Engine, sample: dict) -> tuple[traces.TraceRecord, dict]:
    prompt, cont = sample["prompt_ids"], sample["token_ids"]
    rt = engine.runtime
    dense = rt.score(prompt, cont, dense_method())
    sparse = rt.score(prompt, cont, engine.method_for(sample["version"], sample["sparsity"]))
    fid = compare(dense, sparse, cont)
    batch = criteria.make_batch([list(prompt)], [fid.pseudo_labels], engine.tokenizer.pad_token_id or 0,
                                [predictable_positions(rt.model, prompt)])
    scores = criteria.compute(rt.model, batch, engine.shape.heads, engine.shape.head_dim)
    common = {"model_fingerprint": engine.fingerprint, "source": "shadow", "targets": "pseudo_labels",
              "prompt_targets": "predictable",
              "criteria": list(criteria.CRITERIA)}
    # the served prompt and continuation travel with the sample, so a job can rescore it later
    # with another criterion or predictor
    meta = {"family": None, "prompt_len": len(prompt), "request_id": sample["request_id"],
            "predictor_version": sample["version"], "arm": sample.get("arm"), "sparsity": sample["sparsity"],
            "generation": sample["generation"], "key": sample["key"],
            "prompt_ids": list(prompt), "token_ids": list(cont)}
    record = traces.records_from_scores(scores, common, [meta])[0]
    return record, fid.as_dict()


@serve.deployment(name="ShadowDense")
class ShadowDense:
    def __init__(self, settings: Settings):
        self.settings = settings
        registry = PredictorRegistry.from_settings(settings.mlflow)
        self.engine = Engine(settings, registry)
        self.r = redis_client(settings.redis)
        self.store = SampleStore(self.r, settings.redis.prefix, settings.serve.shadow_stream_maxlen)
        self.lock = threading.Lock()  # criteria hooks the model's modules: one run at a time
        self.last_sweep = 0.0

    def _run(self, sample: dict) -> dict:
        with self.lock:
            t0 = time.perf_counter()
            record, fid = shadow_run(self.engine, sample)
            entry = self.store.add(record, fid, sample["retention_s"])
            summary = {**{k: fid[k] for k in ("kl_mean", "kl_max", "top1_agreement", "exact_match",
                                               "positions")},
                       "version": sample["version"], "sample_id": entry,
                       "shadow_ms": round((time.perf_counter() - t0) * 1000, 1)}
            self.r.set(f"{self.settings.redis.prefix}:audit:{sample['request_id']}:shadow",
                       json.dumps(summary), ex=self.settings.serve.audit_retention_s)
            if time.time() - self.last_sweep > 60:
                self.store.sweep()
                self.last_sweep = time.time()
            return summary

    async def run(self, sample: dict) -> dict:
        return await asyncio.to_thread(self._run, sample)
