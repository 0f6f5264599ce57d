"""Where a decode step's time goes: dense vs shadowllm on the `bench speed` model, one batch
composition, under torch.profiler; `shadowgate bench step-profile`.

The byte model's ideal speedup (dense weight bytes over the plan's) holds only for the part
of a step that reads weights: the matmuls. Per step this reports the matmuls' time, the
other operators' time (attention over the cache, norms, rotary embeddings, index selects,
element-wise work) and the wall time outside the profiler, for dense and sparse, so the
shortfall of `bench speed` against its ideal can be read off: a matmul speedup at the ideal
with fixed other work is Amdahl's law, not a slow kernel.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from adapter.benchmarks.decode_speed import PROMPT_TOKENS, VOCAB, bench_model, plan_step_bytes
from adapter.config import RuntimeConfig
from adapter.runtime.gated import GatedModel
from adapter.runtime.gather import BATCH_UNITS
from adapter.selection import predictors as P
from adapter.selection.methods import make_method

TOP_OTHER = 12
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def _matmul_ms(prof) -> float:
    """Self time of the matmul kernels (the leaves: linear and matmul only dispatch to them)."""
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMULS) / 1000.0


def _profile(gm: GatedModel, method, prompts: list[list[int]], steps: int) -> dict:
    seqs = [gm.prefill(p, method, 2 * steps + 8)[0] for p in prompts]
    toks = torch.tensor([p[-1] for p in prompts])
    plan = gm.batch_plan(seqs, horizon=2 * steps)
    for _ in range(3):  # warm: allocator, kernels
        gm.decode(seqs, toks, plan)
    wall = []
    for _ in range(steps):
        start = time.perf_counter()
        gm.decode(seqs, toks, plan)
        wall.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            gm.decode(seqs, toks, plan)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1000.0
    matmul = _matmul_ms(prof)
    others = sorted((e for e in events if e.key not in MATMULS and e.self_cpu_time_total > 0),
                    key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"wall_ms": round(1000 * statistics.median(wall), 2),
            "profiled_ms": round(total / steps, 2), "matmul_ms": round(matmul / steps, 2),
            "other_ms": round((total - matmul) / steps, 2), "bytes": plan_step_bytes(gm, plan),
            "calls": round(sum(e.count for e in events) / steps),
            # the other operators that take the most time: per step, their self ms and calls
            "top_other": [{"op": e.key, "ms": round(e.self_cpu_time_total / 1000.0 / steps, 3),
                           "calls": round(e.count / steps)} for e in others[:TOP_OTHER]]}


def run(runtime: RuntimeConfig, arch: str = "llama-gqa", batch: int = 1, sparsity: float = 0.5,
        units: str = "per_request", steps: int = 20, quick: bool = False) -> dict:
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    if units not in BATCH_UNITS:
        raise ValueError(f"unknown units {units!r}: use {', '.join(BATCH_UNITS)}")
    runtime.apply_threads()
    model, spec = bench_model(arch, quick)
    gm = GatedModel(model, runtime.model_copy(update={"gather_cache_mb": 4096}))
    gm.batch_parts = BATCH_UNITS[units]
    rng = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (PROMPT_TOKENS,), generator=rng).tolist() for _ in range(batch)]
    unified = P.random_unified(gm.shape, 64, 32)
    sparse = make_method("shadowllm", sparsity, gm.shape, unified, mode=runtime.mode,
                         head_selection=runtime.head_selection)
    with torch.inference_mode():
        rows = {"dense": _profile(gm, make_method("dense", 0.0), prompts, steps),
                "shadowllm": _profile(gm, sparse, prompts, steps)}
    d, s = rows["dense"], rows["shadowllm"]

    def ratio(a: float, b: float) -> float:
        return round(a / b, 3) if b else 0.0

    return {"arch": arch, "model": spec, "batch": batch, "sparsity": sparsity, "units": units, "steps": steps,
            "threads": torch.get_num_threads(), "dense": d, "shadowllm": s,
            "ideal_speedup": ratio(d["bytes"], s["bytes"]),
            "matmul_speedup": ratio(d["matmul_ms"], s["matmul_ms"]),
            "profiled_speedup": ratio(d["profiled_ms"], s["profiled_ms"]),
            "wall_speedup": ratio(d["wall_ms"], s["wall_ms"]),
            "other_share_sparse": ratio(s["other_ms"], s["profiled_ms"])}
