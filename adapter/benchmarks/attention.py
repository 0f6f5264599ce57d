"""Decode attention over a cache whose kept heads are spread unevenly over its KV groups:
the runtime's padded queries (gather.HeadSlots) against selecting each kept head's keys and
values out of the cache (the way before, still DejaVu's for its per-token heads), and dense
GQA over every head, per cache length. One layer, one query token, the runtime's own
`_attend`, in process; medians.

Shapes: Kh kept heads, Kg kept KV groups, Dh head dim, T cached tokens.
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence as Seq

import torch

from adapter.runtime.gated import GatedModel, Sequence
from adapter.runtime.gather import attn_layout
from adapter.benchmarks.decode_speed import ARCHS, bench_model

CACHE_TOKENS = (128, 256, 384, 512, 1024)
SPREAD = (3, 2, 2, 1)  # kept heads per kept KV group: 8 of 16 heads over 4 groups


def _ms(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def run(cache_tokens: Seq[int] = CACHE_TOKENS, spread: Seq[int] = SPREAD, repeats: int = 300) -> dict:
    """Per cache length: ms of one layer's decode attention with padded queries, with the
    cache's rows selected, and dense; and the largest difference between the first two."""
    if not cache_tokens or min(cache_tokens) < 1:
        raise ValueError(f"cache lengths must be >= 1, got {list(cache_tokens)}")
    arch = ARCHS["llama-gqa"]
    group_size = arch["heads"] // arch["kv_heads"]
    if not spread or len(spread) > arch["kv_heads"] or not all(1 <= c <= group_size for c in spread):
        raise ValueError(f"spread: at most {arch['kv_heads']} groups of 1-{group_size} kept heads each, "
                         f"got {list(spread)}")
    model, spec = bench_model("llama-gqa", quick=True)
    gm = GatedModel(model)
    shape = gm.shape
    heads = torch.tensor([g * shape.group_size + i for g, c in enumerate(spread) for i in range(c)])
    groups = torch.arange(len(spread))
    slots = attn_layout(heads, groups, shape).q2g  # None where the spread is even
    select = torch.searchsorted(groups, heads // shape.group_size)
    kh, kg, dh = heads.numel(), groups.numel(), shape.head_dim
    gen = torch.Generator().manual_seed(0)
    rows = []
    for t in cache_tokens:
        def seq(n_groups: int) -> Sequence:
            k = [torch.randn(n_groups, t + 1, dh, generator=gen)]
            v = [torch.randn(n_groups, t + 1, dh, generator=gen)]
            return Sequence(method=None, mask=None, k=k, v=v, length=t, predictor_input=None,
                            effective_sparsity=0.0)

        kept, dense = seq(kg), seq(shape.kv_heads)
        q, k, v = (torch.randn(1, n * dh, generator=gen) for n in (kh, kg, kg))
        qd, kd, vd = (torch.randn(1, n * dh, generator=gen) for n in (shape.heads, shape.kv_heads, shape.kv_heads))
        paths = {"padded": lambda: gm._attend(kept, 0, q, k, v, kh, kg, slots, None, t),
                 "select": lambda: gm._attend(kept, 0, q, k, v, kh, kg, select, None, t),
                 "dense": lambda: gm._attend(dense, 0, qd, kd, vd, shape.heads, shape.kv_heads, None, None, t)}
        with torch.inference_mode():
            diff = float((paths["padded"]() - paths["select"]()).abs().max())
            rows.append({"cache_tokens": t, **{f"{name}_ms": round(_ms(fn, repeats), 4) for name, fn in paths.items()},
                         "max_abs_diff": diff})
    return {"model": spec, "spread": list(spread), "kept_heads": kh, "kept_groups": kg,
            "padded_per_group": None if slots is None else slots.per_group, "repeats": repeats,
            "threads": torch.get_num_threads(), "results": rows}
