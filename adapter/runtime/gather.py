"""Gathered weights: for a mask, the kept rows/columns of each layer copied into small
contiguous matrices so every sparse matmul really reads (1 - s) of the bytes.

q/k/v of the kept heads/groups are fused into one matrix (one matmul), the FFN's gate and
up rows into another. A full layer (every unit kept) uses the model's own tensors, unfused,
with no copy. Gathered copies live in a byte-bounded LRU keyed by mask content: the bound
is `budget_bytes` for the cache, plus the copies still referenced by in-flight sequences
(at most one per running sequence, (1 - s) of the gated layers' bytes each).

Shapes: D model dim, Dh head dim, Kh kept heads, Kg kept KV groups, K kept neurons.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from adapter.runtime.model_view import LayerRefs, Shape
from adapter.runtime.masks import LayerMask, Mask

Proj = tuple[torch.Tensor, torch.Tensor | None]  # (weight (out, D), bias (out,) or None)


@dataclass(frozen=True)
class AttnWeights:
    qkv: tuple[Proj, ...]  # one fused projection, or (q, k, v) for a full layer
    q_width: int  # Kh * Dh
    kv_width: int  # Kg * Dh
    wo: torch.Tensor  # (D, Kh*Dh)
    bo: torch.Tensor | None
    n_heads: int  # Kh
    n_groups: int  # Kg
    q2g: torch.Tensor | None  # (Kh,) kept-group slot of each kept head; None: uniform GQA


@dataclass(frozen=True)
class FfnWeights:
    inp: tuple[Proj, ...]  # gated: fused gate+up (2K, D) or (gate, up); mlp: (fc1,)
    w_down: torch.Tensor  # (D, K)
    b_down: torch.Tensor | None
    gated: bool
    width: int  # K


@dataclass(frozen=True)
class LayerWeights:
    attn: AttnWeights
    ffn: FfnWeights

    def nbytes(self) -> int:
        tensors = [w for w, _ in self.attn.qkv] + [self.attn.wo, self.ffn.w_down]
        tensors += [w for w, _ in self.ffn.inp]
        return sum(t.numel() * t.element_size() for t in tensors)


def head_rows(units: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Head indices (K,) -> the weight rows they own (K*Dh,)."""
    return (units[:, None] * head_dim + torch.arange(head_dim, device=units.device)).flatten()


def _cat_bias(biases: list[torch.Tensor | None], widths: list[int], like: torch.Tensor):
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else like.new_zeros(w) for b, w in zip(biases, widths)])


def dense_layer(ref: LayerRefs, shape: Shape) -> LayerWeights:
    attn = AttnWeights(
        qkv=((ref.wq, ref.bq), (ref.wk, ref.bk), (ref.wv, ref.bv)),
        q_width=shape.heads * shape.head_dim, kv_width=shape.kv_heads * shape.head_dim,
        wo=ref.wo, bo=ref.bo, n_heads=shape.heads, n_groups=shape.kv_heads, q2g=None,
    )
    gated = ref.w_up is not None
    inp = ((ref.w_in, ref.b_in), (ref.w_up, None)) if gated else ((ref.w_in, ref.b_in),)
    ffn = FfnWeights(inp=inp, w_down=ref.w_down, b_down=ref.b_down, gated=gated, width=shape.ffn)
    return LayerWeights(attn, ffn)


def gather_layer(ref: LayerRefs, lm: LayerMask, shape: Shape) -> LayerWeights:
    if lm.full:
        return dense_layer(ref, shape)
    dh = shape.head_dim
    device = ref.wq.device
    heads, groups, neurons = lm.heads.to(device), lm.groups.to(device), lm.neurons.to(device)
    rows_q, rows_kv = head_rows(heads, dh), head_rows(groups, dh)
    q_w, kv_w = rows_q.numel(), rows_kv.numel()
    wqkv = torch.cat([ref.wq[rows_q], ref.wk[rows_kv], ref.wv[rows_kv]])
    bqkv = _cat_bias(
        [None if b is None else b[r] for b, r in ((ref.bq, rows_q), (ref.bk, rows_kv), (ref.bv, rows_kv))],
        [q_w, kv_w, kv_w], wqkv)
    per_group = torch.bincount(heads // shape.group_size, minlength=shape.kv_heads)[groups]
    uniform = bool((per_group == per_group[0]).all())  # once per gather, not per token
    q2g = None if uniform else torch.searchsorted(groups, heads // shape.group_size)
    attn = AttnWeights(
        qkv=((wqkv, bqkv),), q_width=q_w, kv_width=kv_w, wo=ref.wo[:, rows_q].contiguous(),
        bo=ref.bo, n_heads=heads.numel(), n_groups=groups.numel(), q2g=q2g,
    )
    gated = ref.w_up is not None
    if gated:
        w_in = torch.cat([ref.w_in[neurons], ref.w_up[neurons]])
        b_in = None if ref.b_in is None else torch.cat([ref.b_in[neurons], ref.b_in.new_zeros(neurons.numel())])
    else:
        w_in = ref.w_in[neurons]
        b_in = None if ref.b_in is None else ref.b_in[neurons]
    ffn = FfnWeights(inp=((w_in, b_in),), w_down=ref.w_down[:, neurons].contiguous(),
                     b_down=ref.b_down, gated=gated, width=neurons.numel())
    return LayerWeights(attn, ffn)


class GatherCache:
    """Byte-bounded LRU of gathered weights, keyed by mask content; thread-safe."""

    def __init__(self, layers: list[LayerRefs], shape: Shape, budget_bytes: int):
        self.layers, self.shape, self.budget = layers, shape, budget_bytes
        self._dense = [dense_layer(ref, shape) for ref in layers]
        self._entries: OrderedDict[str, tuple[list[LayerWeights], int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = 0

    def dense(self) -> list[LayerWeights]:
        return self._dense

    def get(self, mask: Mask) -> list[LayerWeights]:
        if mask.dense:
            return self._dense
        with self._lock:
            entry = self._entries.get(mask.key)
            if entry is not None:
                self._entries.move_to_end(mask.key)
                self.hits += 1
                return entry[0]
        weights = [gather_layer(ref, lm, self.shape) for ref, lm in zip(self.layers, mask.layers)]
        size = sum(w.nbytes() for w, lm in zip(weights, mask.layers) if not lm.full)
        with self._lock:
            self.misses += 1
            if mask.key not in self._entries:
                self._entries[mask.key] = (weights, size)
                self.bytes += size
            self._evict()
        return weights

    def _evict(self) -> None:
        for key in list(self._entries):
            if self.bytes <= self.budget:
                break
            _, size = self._entries.pop(key)
            self.bytes -= size

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.bytes, "budget_bytes": self.budget,
                "hits": self.hits, "misses": self.misses}
