"""What batch-invariant units cost in quality: test prompts generated in batches of distinct
prompts, each row on its own mask (per_request), on the batch's heads (heads) or on the
batch's heads and neurons (heads_neurons); `shadowgate bench batch-quality`.

Every batch's decode steps are forced onto the batch's units wherever the rows' masks differ
(`force="batch"`), so the figures are what a row gets whenever the byte model picks them in
serving; per_request runs the runtime's exact plan. In a batch of more than one, every row
is prefilled as a request joining a busy batch is in serving (no copy of its own): with
batch units on, the layers the runtime holds batch units for (those the previous batch left,
as the rows decoding when a request arrives would) run on them, so the batch's units act
from the first token on; a batch of one is prefilled on its own mask.

Per configuration: task accuracy (the greedy continuation starts with the answer, as a served
completion would be judged) and agreement with dense (the share of the first `tokens` greedy
tokens equal to the dense model's).
"""

from __future__ import annotations

import random
import time

import torch
from tqdm import tqdm

from adapter.embedded import suite as tasks
from adapter.evaluation.scoring import encode_pairs
from adapter.runtime.gated import GatedModel, SamplingParams, pick_tokens
from adapter.runtime.gather import BATCH_UNITS


def _generate(runtime: GatedModel, prompts: list[list[int]], method, steps: int, parts: frozenset) -> list[list[int]]:
    """Greedy tokens of one batch: a prefill per row (on the batch units the runtime holds,
    where `parts` has them, in a batch of more than one), then batched decode steps."""
    runtime.batch_parts = parts
    states, last = [], []
    for ids in prompts:
        st, logits = runtime.prefill(ids, method, steps, gather=len(prompts) == 1)
        states.append(st)
        last.append(logits[0])
    logits = torch.stack(last)
    out: list[list[int]] = [[] for _ in prompts]
    plan = runtime.batch_plan(states, force="batch" if parts else None)
    greedy = [SamplingParams()] * len(prompts)
    for step in range(steps):
        toks, _ = pick_tokens(logits, greedy, [None] * len(prompts))
        for row, tok in zip(out, toks.tolist()):
            row.append(tok)
        if step + 1 < steps:
            logits = runtime.decode(states, toks, plan)
    return out


def run(runtime: GatedModel, tokenizer, predictor, sparsities=(0.5, 0.7), batches=(1, 4, 8),
        per_family: int = 50, tokens: int = 16, mode: str = "global", seed: int = 0,
        keeps=(1.0,)) -> dict:
    """The report: per sparsity, batch size and unit mode (and, for batch units, each
    `keeps`: units per a row's kept units, runtime.batch_keep), accuracy and agreement with
    dense."""
    instances = tasks.split("test", per_family)
    random.Random(seed).shuffle(instances)  # batches mix families, as traffic does
    pairs = encode_pairs(tokenizer, instances)
    saved = runtime.batch_parts, runtime.batch_keep
    started = time.time()
    try:
        from adapter.selection.predictors import Dense

        dense = [row for i in range(0, len(pairs), 8)
                 for row in _generate(runtime, [p for p, _ in pairs[i:i + 8]], Dense(), tokens, frozenset())]

        def score(outs: list[list[int]]) -> dict:
            acc = [out[:len(ans)] == ans for out, (_, ans) in zip(outs, pairs)]
            agree = [sum(a == b for a, b in zip(out, ref)) / tokens for out, ref in zip(outs, dense)]
            return {"accuracy": round(sum(acc) / len(acc), 4), "agreement": round(sum(agree) / len(agree), 4)}

        results = [{"sparsity": 0.0, "batch": 8, "units": "dense", **score(dense)}]
        configs = [(s, b, m, k) for s in sparsities for b in batches for m in BATCH_UNITS
                   for k in ((None,) if m == "per_request" else keeps) if b > 1 or m == "per_request"]
        for s, b, m, k in tqdm(configs, desc="batch quality", unit="config"):
            runtime.batch_kept.clear()  # each configuration starts without batch units
            runtime.batch_keep = k or 1.0
            method = predictor.method(s, mode)
            outs = [row for i in range(0, len(pairs), b)
                    for row in _generate(runtime, [p for p, _ in pairs[i:i + b]], method, tokens, BATCH_UNITS[m])]
            results.append({"sparsity": s, "batch": b, "units": m, "batch_keep": k, **score(outs)})
    finally:
        runtime.batch_parts, runtime.batch_keep = saved
        runtime.plans.clear()
        runtime.batch_kept.clear()
    dense_acc = results[0]["accuracy"]
    for r in results:
        r["accuracy_vs_dense"] = round(r["accuracy"] / dense_acc, 4) if dense_acc else None
    return {"prompts": len(pairs), "tokens": tokens, "mode": mode, "predictor": predictor.kind,
            "criterion": predictor.criterion, "seconds": round(time.time() - started, 1), "results": results}
