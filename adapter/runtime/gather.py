"""Gathered weights: for a mask, the kept rows/columns of each layer copied into small
contiguous matrices so every sparse matmul really reads (1 - s) of the bytes.

q/k/v of the kept heads/groups are fused into one matrix (one matmul), the FFN's gate and
up rows into another. A full layer (every unit kept) uses the model's own tensors, unfused,
with no copy. Gathered copies live in a byte-bounded LRU keyed by mask content: the bound
is `budget_bytes` for the cache, plus the copies still referenced by in-flight sequences
(at most one per running sequence, (1 - s) of the gated layers' bytes each).

Batches of distinct masks (`build_plan`): rows share a matmul only through a common weight
copy, so a batch of B distinct masks would run B products, each reading (1 - s) of the
weights: more bytes than dense once B > 1/(1 - s). Per layer, and separately for attention
and FFN, a byte model picks the cheapest of
  per_mask  one product per distinct layer mask, on the masks' own gathered copies;
  union     one product over the union of the batch's kept units (a gathered copy of the
            union; each row's own mask is applied to its result, so every row gets exactly
            what it would get alone, up to float reassociation);
  dense     one product over every unit (the model's own tensors, no copy), masks applied
            the same way.
per_mask reads sum_m bytes(m) >= bytes(union of m), so it wins only where the batch has one
layer mask, or where the union copy does not pay for itself: a union gather reads and writes
the union once, charged as GATHER_READS step-reads spread over UNION_HORIZON_STEPS steps.
A sequence's own copy is made lazily (a sequence admitted into a busy batch is prefilled on
the full weights with its mask applied, and never needs one while it shares products), so
per_mask is charged the same for each mask not gathered yet.
Attention stays per sequence whatever the plan: each row attends over its own cache, which
holds only its kept KV groups, with its own kept heads (per_mask, union, dense), or with
  batch     (optional, runtime.batch_heads / batch_neurons) the batch's own units: as many
            heads (neurons) as a row keeps on average (times runtime.batch_keep, at most the
            union), those most rows keep, gathered once
            per batch composition. Every row runs the batch's neurons, and attends with the
            batch's heads of the KV groups its cache holds (k/v are computed for the union of
            the rows' groups, so every cache stays complete). The shared products then read
            about (1 - s) of the bytes at any batch size, where the union nears dense (Polar
            Sparsity, NeurIPS 2025, selects heads per batch for this reason); the price is that
            a row's units depend on its batch, so it no longer equals the row alone. A
            sequence admitted into the batch is prefilled on the same kept copies
            (GatedModel._masked_layer), so its prompt too costs (1 - s) of the FLOPs.

Shapes: B batch rows, D model dim, Dh head dim, Kh kept heads, Kg kept KV groups, K kept
neurons; Hu/Gu/U the union's heads, groups and neurons.
"""

from __future__ import annotations

import math
import resource
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from adapter.runtime import masks
from adapter.runtime.model_view import LayerRefs, Shape
from adapter.runtime.masks import LayerMask, Mask

Proj = tuple[torch.Tensor, torch.Tensor | None]  # (weight (out, D), bias (out,) or None)


@dataclass(frozen=True)
class HeadSlots:
    """Kept heads spread unevenly over the kept KV groups (say 3, 2, 2 and 1 heads in 4
    groups). Attention pads the queries to `per_group` heads in every kept group, runs plain
    GQA over the cache as it is, and takes the real heads' outputs back: two selects of the
    few query rows, where selecting each head's keys and values out of the cache copied the
    cache in every layer and step (`shadowgate bench attention`, 8 of 16 heads in 4 groups:
    0.19 against 0.54 ms per layer at 512 cached tokens, 0.25 against 0.95 at 1024)."""

    pad: torch.Tensor  # (Kg*P,) the kept head in each padded slot; a group's spare slots repeat one of its heads
    real: torch.Tensor  # (Kh,) each kept head's padded slot
    per_group: int  # P: the most kept heads of any kept group

    def to(self, device) -> "HeadSlots":
        return HeadSlots(self.pad.to(device), self.real.to(device), self.per_group)


def head_slots(q2g: torch.Tensor, n_groups: int) -> HeadSlots:
    """q2g (Kh,): each kept head's kept-group slot -> the padded layout, on q2g's device
    (host work: once per mask and layer). A slot without heads (a batch row's cached group
    that none of the batch's heads reads) is padding alone."""
    slot = q2g.cpu().tolist()
    p = max(slot.count(g) for g in range(n_groups))
    count, real, pad = [0] * n_groups, [], [None] * (n_groups * p)
    for i, g in enumerate(slot):  # group g's heads fill its slots g*p, g*p + 1, ...
        real.append(g * p + count[g])
        pad[real[-1]] = i
        count[g] += 1
    # a group's spare slots repeat its first head (head 0 where it has none)
    pad = [i if i is not None else (pad[at - at % p] or 0) for at, i in enumerate(pad)]
    return HeadSlots(torch.tensor(pad, device=q2g.device), torch.tensor(real, device=q2g.device), p)


@dataclass(frozen=True)
class AttnWeights:
    qkv: tuple[Proj, ...]  # one fused projection, or (q, k, v) for a full layer
    q_width: int  # Kh * Dh
    kv_width: int  # Kg * Dh
    wo: torch.Tensor  # (D, Kh*Dh)
    bo: torch.Tensor | None
    n_heads: int  # Kh
    n_groups: int  # Kg
    q2g: HeadSlots | None  # the kept heads' slots over the kept groups; None: uniform GQA


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


Take = Callable[[tuple[int, ...]], torch.Tensor]  # an empty tensor of that shape, from a copy's memory


@torch.no_grad()
def _rows_into(parts: list[tuple[torch.Tensor, torch.Tensor]], take: Take | None = None) -> torch.Tensor:
    """The rows idx of each matrix, stacked into one new matrix: index_select straight into
    its slice (no intermediate copies; about twice as fast as cat of W[idx])."""
    first = parts[0][0]
    shape = (sum(idx.numel() for _, idx in parts), first.shape[1])
    out = take(shape) if take is not None else first.new_empty(shape)
    at = 0
    for w, idx in parts:
        torch.index_select(w, 0, idx, out=out[at:at + idx.numel()])
        at += idx.numel()
    return out


@dataclass(frozen=True)
class AttnLayout:
    """A layer's kept heads as a row attends with them, whether or not its weights are
    gathered: what a shared (union or dense) projection needs to hand each row its own
    heads, and what a prefill on the full weights selects."""

    rows_q: torch.Tensor  # (Kh*Dh,) rows of wq (columns of wo) of the kept heads
    rows_kv: torch.Tensor  # (Kg*Dh,) rows of wk/wv of the kept groups
    n_heads: int  # Kh
    n_groups: int  # Kg
    q2g: HeadSlots | None  # the kept heads' slots over the kept groups; None: uniform GQA


def attn_layout(heads: torch.Tensor, groups: torch.Tensor, shape: Shape) -> AttnLayout:
    """Kept heads (Kh,) and groups (Kg,), on the model's device -> their layout (one host
    sync, for the uniform check: once per mask and layer, never per token)."""
    per_group = torch.bincount(heads // shape.group_size, minlength=shape.kv_heads)[groups]
    uniform = bool((per_group == per_group[0]).all())
    q2g = None if uniform else head_slots(torch.searchsorted(groups, heads // shape.group_size), groups.numel())
    return AttnLayout(rows_q=head_rows(heads, shape.head_dim), rows_kv=head_rows(groups, shape.head_dim),
                      n_heads=heads.numel(), n_groups=groups.numel(), q2g=q2g)


def mask_layouts(layers: list[LayerRefs], mask: Mask, shape: Shape) -> list[AttnLayout | None]:
    """Per layer, the mask's attention layout; None for a full layer (the model's own tensors)."""
    return [None if lm.full else attn_layout(lm.heads.to(ref.wq.device), lm.groups.to(ref.wq.device), shape)
            for ref, lm in zip(layers, mask.layers)]


def _cols(w: torch.Tensor, idx: torch.Tensor, take: Take | None) -> torch.Tensor:
    """The columns idx of w, as a new (rows, len(idx)) matrix (from `take` when given). By
    torch.gather over the index broadcast to every row: 40-55% less time than index_select
    along dim 1 (1.5 against 3.4 ms for half the columns of a 1024 x 4096 down projection),
    the larger part of a mask's copy (docs/SERVING.md)."""
    out = take((w.shape[0], idx.numel())) if take is not None else w.new_empty((w.shape[0], idx.numel()))
    return torch.gather(w, 1, idx.expand(w.shape[0], -1), out=out)


def gather_attn(ref: LayerRefs, heads: torch.Tensor, groups: torch.Tensor, shape: Shape,
                take: Take | None = None) -> AttnWeights:
    """q/k/v rows and o columns of the kept heads (Kh,) and groups (Kg,), fused into one copy."""
    lay = attn_layout(heads, groups, shape)
    rows_q, rows_kv = lay.rows_q, lay.rows_kv
    q_w, kv_w = rows_q.numel(), rows_kv.numel()
    wqkv = _rows_into([(ref.wq, rows_q), (ref.wk, rows_kv), (ref.wv, rows_kv)], take)
    bqkv = _cat_bias(
        [None if b is None else b[r] for b, r in ((ref.bq, rows_q), (ref.bk, rows_kv), (ref.bv, rows_kv))],
        [q_w, kv_w, kv_w], wqkv)
    return AttnWeights(
        qkv=((wqkv, bqkv),), q_width=q_w, kv_width=kv_w, wo=_cols(ref.wo, rows_q, take),
        bo=ref.bo, n_heads=lay.n_heads, n_groups=lay.n_groups, q2g=lay.q2g,
    )


def gather_ffn(ref: LayerRefs, neurons: torch.Tensor, take: Take | None = None) -> FfnWeights:
    """gate+up (or fc1) rows and down (fc2) columns of the kept neurons (K,), one copy each."""
    gated = ref.w_up is not None
    if gated:
        w_in = _rows_into([(ref.w_in, neurons), (ref.w_up, neurons)], take)
        b_in = None if ref.b_in is None else torch.cat([ref.b_in[neurons], ref.b_in.new_zeros(neurons.numel())])
    else:
        w_in = _rows_into([(ref.w_in, neurons)], take)
        b_in = None if ref.b_in is None else ref.b_in[neurons]
    return FfnWeights(inp=((w_in, b_in),), w_down=_cols(ref.w_down, neurons, take),
                      b_down=ref.b_down, gated=gated, width=neurons.numel())


def gather_layer(ref: LayerRefs, lm: LayerMask, shape: Shape, take: Take | None = None) -> LayerWeights:
    if lm.full:
        return dense_layer(ref, shape)
    device = ref.wq.device
    heads, groups, neurons = lm.heads.to(device), lm.groups.to(device), lm.neurons.to(device)
    return LayerWeights(gather_attn(ref, heads, groups, shape, take), gather_ffn(ref, neurons, take))


def copy_numel(layers: list[LayerRefs], mask: Mask, shape: Shape) -> int:
    """Elements of a mask's gathered weight matrices (biases not counted): what gather_layer
    takes over all layers."""
    d, dh = shape.hidden, shape.head_dim
    total = 0
    for ref, lm in zip(layers, mask.layers):
        if lm.full:
            continue
        q_w, kv_w, k = lm.heads.numel() * dh, lm.groups.numel() * dh, lm.neurons.numel()
        total += (2 * q_w + 2 * kv_w) * d + (3 if ref.w_up is not None else 2) * k * d
    return total


def _use_count(t: torch.Tensor) -> int | None:
    """How many tensors share t's memory (views included), or None where torch does not say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(t.untyped_storage()._cdata)


_ALONE = _use_count(torch.empty(1))  # the count of a tensor nothing else views


class _Memory:
    """One flat block copies are carved from (`take`), front to back; past its end, fresh
    memory (a plan's union copies may need more than a mask's copy did)."""

    def __init__(self, block: torch.Tensor):
        self.block, self.at = block, 0

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        if self.at + n > self.block.numel():
            return self.block.new_empty(shape)
        out = self.block[self.at:self.at + n].view(shape)
        self.at += n
        return out


SPARE_BLOCKS = 2  # evicted copies whose memory the cache keeps for the next copies
UNION_BLOCKS = 2  # blocks for decode plans' union copies: the live plan's and the next one's
BLOCK_HEADROOM = 1.1  # a copy's block holds this much more than it needs


class GatherCache:
    """Byte-bounded LRU of gathered weights, keyed by mask content; thread-safe. With
    `recycle` (runtime.gather_recycle), an evicted copy's memory is kept (SPARE_BLOCKS, beyond
    the budget) and the next copy is made into it once no sequence or plan reads it any more;
    the spare blocks are made, their pages touched, with the first copy."""

    def __init__(self, layers: list[LayerRefs], shape: Shape, budget_bytes: int, recycle: bool = False):
        # recycling needs torch to say when nothing reads a block any more
        self.layers, self.shape, self.budget = layers, shape, budget_bytes
        self.recycle = recycle and _ALONE is not None
        self._dense = [dense_layer(ref, shape) for ref in layers]
        self._entries: OrderedDict[str, tuple[list[LayerWeights], int, torch.Tensor | None]] = OrderedDict()
        self._spare: list[torch.Tensor] = []  # evicted copies' memory, newest first
        self._blocks = 0  # blocks made and not dropped: in entries, in _spare or being filled
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.recycled = self.faults = 0
        self.plan_recycled = 0  # decode plans whose union copies went into a union block made before
        self._union: list[torch.Tensor] = []  # memory for decode plans' union copies (scratch)
        self._all_numel = sum(t.numel() for ref in layers for t in (ref.wq, ref.wk, ref.wv, ref.wo, ref.w_in,
                                                                      ref.w_down, ref.w_up) if t is not None)

    def dense(self) -> list[LayerWeights]:
        return self._dense

    def has(self, mask: Mask) -> bool:
        """Whether `mask`'s weights are gathered already (a dense mask needs no copy)."""
        with self._lock:
            return mask.dense or mask.key in self._entries

    def get(self, mask: Mask) -> list[LayerWeights]:
        if mask.dense:
            return self._dense
        with self._lock:
            entry = self._entries.get(mask.key)
            if entry is not None:
                self._entries.move_to_end(mask.key)
                self.hits += 1
                return entry[0]
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = self._block(mask)
        take = None if block is None else _Memory(block).take
        weights = [gather_layer(ref, lm, self.shape, take) for ref, lm in zip(self.layers, mask.layers)]
        size = sum(w.nbytes() for w, lm in zip(weights, mask.layers) if not lm.full)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        with self._lock:
            self.misses += 1
            self.faults += faults  # the process's, while copying: fresh memory the copies touched
            if mask.key not in self._entries:
                self._entries[mask.key] = (weights, size, block)
                self.bytes += size
            elif block is not None:  # another thread made it meanwhile: ours is spare memory
                self._spare.insert(0, block)
            self._evict()
        return weights

    def _block(self, mask: Mask) -> torch.Tensor | None:
        """Memory for the mask's copy (copy_numel elements): an evicted copy's block that no sequence or
        plan reads any more (its pages touched already: a fresh block costs a page fault per
        4 KiB page, measured at 70 ms per copy of the 309 M checkpoint); else a new block while
        fewer than SPARE_BLOCKS + 1 exist (the first one made with its spares), or in place of a
        free block too small for it; else None (the copy's matrices are allocated one by one,
        as the allocator likes: one large fresh block would fault on every page)."""
        if not self.recycle:
            return None
        numel, ref = copy_numel(self.layers, mask, self.shape), self.layers[0].wq
        with self._lock:
            for i, block in enumerate(self._spare):
                if block.numel() >= numel and _use_count(block) == _ALONE:
                    self.recycled += 1
                    return self._spare.pop(i)
            if self._blocks >= SPARE_BLOCKS + 1:
                # all blocks made: a free one too small for this mask (a lower sparsity than the
                # blocks were made for) gives way to a larger one, so blocks only ever grow
                small = next((i for i, b in enumerate(self._spare) if _use_count(b) == _ALONE), None)
                if small is None:
                    return None
                self._spare.pop(small)
                reserve = 0
            else:
                reserve = SPARE_BLOCKS if self._blocks == 0 else 0
                self._blocks += 1 + reserve
        # with headroom: the next masks' copies differ in size by a few percent (global mode)
        size = int(numel * BLOCK_HEADROOM)
        if reserve:
            # the first copy makes the spare blocks too, their pages touched now: a block's first
            # use otherwise faults on every page (114,693 faults, 223 ms per copy, in a round at
            # concurrency 4 on the 309 M checkpoint), and the first copy is the replica's warm-up
            spares = [torch.zeros(size, dtype=ref.dtype, device=ref.device) for _ in range(reserve)]
            with self._lock:  # first in line: touched and read by no one
                self._spare[:0] = spares
        return torch.empty(size, dtype=ref.dtype, device=ref.device)

    def scratch(self) -> Take | None:
        """Memory for a decode plan's union copies, taken on its first `take`: one of
        UNION_BLOCKS blocks of their own that no live plan reads (made when fewer exist; as
        large as every layer's weights, so any union fits, and only the pages used are ever
        touched), else fresh memory. Without it, a union copy's FFN matrices (past glibc's
        32 MiB reuse threshold) come from fresh pages every time: 253 ms per plan at
        concurrency 4 on the 309 M checkpoint, against 18 ms on touched memory. Separate from
        the mask copies' spare blocks: a live plan holding one of those left the joiners'
        prompt copies fresh pages (docs/SERVING.md)."""
        if not self.recycle:
            return None
        memory: _Memory | None = None

        def take(shape: tuple[int, ...]) -> torch.Tensor:
            nonlocal memory
            if memory is not None:
                return memory.take(shape)
            with self._lock:  # chosen and first carved at once: then its count says it is in use
                block = next((b for b in self._union if _use_count(b) == _ALONE), None)
                if block is not None:
                    self.plan_recycled += 1
                elif len(self._union) < UNION_BLOCKS:
                    block = self.layers[0].wq.new_empty(self._all_numel)
                    self._union.append(block)
                memory = _Memory(block if block is not None else self.layers[0].wq.new_empty(0))
                return memory.take(shape)

        return take

    def _evict(self) -> None:
        for key in list(self._entries):
            if self.bytes <= self.budget:
                break
            _, size, block = self._entries.pop(key)
            self.bytes -= size
            if block is not None:  # its memory stays for a next copy, reused once nothing reads it
                self._spare.insert(0, block)
        while len(self._spare) > SPARE_BLOCKS:  # the oldest goes (freed when no one reads it)
            self._spare.pop()
            self._blocks -= 1

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.bytes, "budget_bytes": self.budget,
                "hits": self.hits, "misses": self.misses, "recycled": self.recycled, "faults": self.faults,
                "plan_recycled": self.plan_recycled,
                "spare_bytes": sum(b.numel() * b.element_size() for b in self._spare)}


# ---- batch plans: one decode step over rows with distinct masks -----------------------------

PlanKind = Literal["per_mask", "union", "dense", "batch"]
# tie order: no copy first, and the exact kinds before "batch" (which changes rows' units)
PLAN_KINDS: tuple[PlanKind, ...] = ("per_mask", "dense", "union", "batch")
PLAN_LAYER_KEYS = tuple(f"{part}_{kind}" for part in ("attn", "ffn") for kind in PLAN_KINDS)
# the batch units a decode step may run on, by name: the parts that may take kind "batch"
BATCH_UNITS = {"per_request": frozenset(), "heads": frozenset({"attn"}), "heads_neurons": frozenset({"attn", "ffn"})}
UNION_HORIZON_STEPS = 32  # decode steps a batch composition is expected to last
GATHER_READS = 2  # a union gather reads and writes each byte of the union once


@dataclass(frozen=True)
class MaskGroup:
    """Rows of a layer's plan that share one layer mask: one product on the mask's own
    gathered weights, which the rows' sequences hold (a plan never keeps them alive)."""

    rows: torch.Tensor | None  # (n,) positions among the plan's rows; None: all, in order
    members: tuple[int, ...]  # the same positions, on the host


@dataclass(frozen=True)
class AttnPlan:
    kind: PlanKind
    groups: tuple[MaskGroup, ...]  # per_mask
    weights: AttnWeights | None  # union / dense: the projection over the layout's heads
    q_idx: torch.Tensor | None  # (sum_b Kh_b*Dh,) each row's own heads in the flat q (B*Hu*Dh,)
    kv_idx: torch.Tensor | None  # (sum_b Kg_b*Dh,) each row's own groups in the flat k/v (B*Gu*Dh,)
    q_split: tuple[int, ...] = ()  # Kh_b*Dh per row
    kv_split: tuple[int, ...] = ()  # Kg_b*Dh per row
    # batch: per row, the heads it attends with (n_heads, q2g over its cached groups);
    # () for union / dense, where each row attends with its own mask's heads
    row_heads: tuple[tuple[int, torch.Tensor | None], ...] = ()


@dataclass(frozen=True)
class FfnPlan:
    kind: PlanKind
    groups: tuple[MaskGroup, ...]  # per_mask
    weights: FfnWeights | None  # union / dense
    keep: torch.Tensor | None  # (B, U) 1 where the layout's unit is in the row's own mask, else 0


@dataclass(frozen=True)
class LayerPlan:
    rows: torch.Tensor | None  # (n,) batch rows this layer runs on the plan; None: all, in order
    members: tuple[int, ...]  # the same rows, on the host
    attn: AttnPlan
    ffn: FfnPlan
    bytes: dict  # weight bytes per step of each candidate: {"attn": {kind: n}, "ffn": {kind: n}}
    density: dict  # the union's share of the layer's heads, kv_groups and neurons

    @property
    def step_bytes(self) -> int:
        return self.bytes["attn"][self.attn.kind] + self.bytes["ffn"][self.ffn.kind]


@dataclass(frozen=True)
class BatchPlan:
    layers: tuple[LayerPlan, ...]
    token_rows: tuple[int, ...]  # per-token (DejaVu) rows: their own path at layers >= 1
    gathered_bytes: int  # bytes of the union copies this plan holds

    def step_bytes(self) -> int:
        """Weight bytes of the decoder layers one step reads for the plan's rows (per-token
        rows, the embedding and the lm_head not counted)."""
        return sum(lp.step_bytes for lp in self.layers)

    def summary(self) -> list[dict]:
        return [{"layer": i, "attn": lp.attn.kind, "ffn": lp.ffn.kind, **lp.density,
                 "mask_groups": len(lp.ffn.groups) if lp.ffn.kind == "per_mask" else None,
                 "bytes": lp.step_bytes}
                for i, lp in enumerate(self.layers)]


def unit_bytes(ref: LayerRefs, shape: Shape) -> tuple[int, int, int]:
    """Weight bytes read per kept query head, KV group and neuron of one layer."""
    elt = ref.wq.element_size()
    return tuple(n * elt for n in masks.unit_params(shape))


def _choose(costs: dict[str, float], force: PlanKind | None) -> PlanKind:
    if force is not None and (force != "batch" or "batch" in costs):
        return force
    return min((k for k in PLAN_KINDS if k in costs), key=lambda k: costs[k])  # min keeps the first of ties


def _covered(size: int, parts: list[torch.Tensor]) -> torch.Tensor:
    """The sorted distinct indices (< size) found in any of `parts`."""
    flags = torch.zeros(size, dtype=torch.bool)
    for idx in parts:
        flags[idx] = True
    return flags.nonzero().squeeze(1)


def _slots(size: int, layout: torch.Tensor):
    """Index -> its position in `layout` (sorted indices < size): identity for a full layout,
    else one lookup table for every row of the plan (no search per row)."""
    if layout.numel() == size:
        return lambda idx: idx
    table = torch.full((size,), -1, dtype=torch.long)
    table[layout] = torch.arange(layout.numel())
    return lambda idx: table[idx]


def _votes(size: int, parts: list[torch.Tensor]) -> torch.Tensor:
    """(size,) how many of the rows' kept indices `parts` hold each index."""
    votes = torch.zeros(size, dtype=torch.long)
    for idx in parts:
        votes[idx] += 1
    return votes


def _most_kept(size: int, parts: list[torch.Tensor], k: int, tie: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's own units: the k indices (< size) that most rows keep (each row's kept
    indices in `parts`), ties to the higher `tie` score, then to the lower index; sorted."""
    score = _votes(size, parts) * (len(parts) + 1) + (tie if tie is not None else 0)
    order = torch.sort(score, descending=True, stable=True).indices
    return torch.sort(order[:k]).values


STICKY_VOTES = 0.95  # kept batch units stay while they hold this share of the best set's votes


@dataclass(frozen=True)
class KeptUnits:
    """The batch units a runtime last gathered for one part of one layer, with their copy."""

    units: torch.Tensor  # heads or neurons, sorted
    groups: torch.Tensor | None  # attention: the KV groups its k/v rows cover
    weights: AttnWeights | FfnWeights


def _keeps(old: torch.Tensor, best: torch.Tensor, parts: list[torch.Tensor], size: int) -> bool:
    """Whether the kept units `old` hold nearly the rows' votes for the best set `best`
    (no fewer units, at least STICKY_VOTES of its votes)."""
    votes = _votes(size, parts)
    return old.numel() >= best.numel() and int(votes[old].sum()) >= STICKY_VOTES * int(votes[best].sum())


def in_groups(heads: torch.Tensor, groups: torch.Tensor, shape: Shape) -> torch.Tensor:
    """(len(heads),) whether each query head belongs to one of the KV groups `groups`."""
    return torch.isin(heads // shape.group_size, groups)


def _batch_count(parts: list[torch.Tensor], union: int, keep: float) -> int:
    """How many units the batch keeps: `keep` times what its rows keep on average, at least
    one, at most the union of the rows' units."""
    return max(1, min(union, round(keep * sum(p.numel() for p in parts) / len(parts))))


def _batch_heads(shape: Shape, lms: list[LayerMask], keep: float = 1.0,
                 union: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Batch-invariant heads for one layer: `keep` times as many heads as the rows keep on
    average (at most `union`, the rows' distinct heads), those most rows keep (ties to those
    more rows hold the KV group of), and per row the batch heads it can attend with: those
    of the KV groups its cache holds (a row's cache has only its own mask's groups). A row
    left without any gets its most-kept own head added to the batch's. Returns (the batch's
    heads, per row its heads)."""
    k = _batch_count([lm.heads for lm in lms], shape.heads if union is None else union, keep)
    holds = torch.zeros(shape.heads, dtype=torch.long)
    for lm in lms:
        holds += in_groups(torch.arange(shape.heads), lm.groups, shape).long()
    votes = _votes(shape.heads, [lm.heads for lm in lms])
    chosen = _most_kept(shape.heads, [lm.heads for lm in lms], k, holds)
    flags = torch.zeros(shape.heads, dtype=torch.bool)
    flags[chosen] = True
    for lm in lms:
        if not in_groups(chosen, lm.groups, shape).any():
            flags[lm.heads[votes[lm.heads].argmax()]] = True
    chosen = flags.nonzero().squeeze(1)
    return chosen, [chosen[in_groups(chosen, lm.groups, shape)] for lm in lms]


def _layer_key(lm: LayerMask) -> bytes:
    return lm.heads.cpu().numpy().tobytes() + b"|" + lm.neurons.cpu().numpy().tobytes()


def build_plan(layers: list[LayerRefs], shape: Shape, row_masks: list[Mask], per_token: list[bool],
               horizon: int = UNION_HORIZON_STEPS, force: PlanKind | None = None,
               has_copy: list[bool] | None = None, batch: frozenset[str] = frozenset(),
               kept: dict | None = None, batch_keep: float = 1.0, take: Take | None = None) -> BatchPlan:
    """The plan of one decode step for rows with these masks.

    Host work (coverage flags, slot tables, copies of the unions): run it when the batch's
    composition changes, not per token. `force` makes every layer take one kind (tests).
    `has_copy`: per row, whether its mask's own copy exists (default: all do). `batch`: the
    parts ("attn", "ffn") that may run on the batch's own units (kind "batch") when the
    byte model says so; rows then get the batch's units instead of their own, `batch_keep`
    times as many as a row keeps on average (at most the union). `kept`: the
    caller's last batch units per (part, layer) with their copies (read and updated): a new
    composition keeps them, copy and all, while they hold nearly the votes of the best set
    (STICKY_VOTES), so batch units pay even where compositions change every step. `take`:
    memory for the union copies (GatherCache.scratch)."""
    has_copy = has_copy if has_copy is not None else [True] * len(row_masks)
    b = len(row_masks)
    token_rows = tuple(i for i in range(b) if per_token[i])
    planned = [i for i in range(b) if not per_token[i]]
    out, gathered = [], 0
    for layer, ref in enumerate(layers):
        # layer 0 is dense for every method, per-token ones included
        members = list(range(b)) if layer == 0 else planned
        lp, nbytes = _plan_layer(ref, shape, [row_masks[i].layers[layer] for i in members], horizon, force,
                                 [has_copy[i] for i in members], batch if layer > 0 else frozenset(),
                                 kept, layer, batch_keep, take)
        device = ref.wq.device
        rows = None if members == list(range(b)) else torch.tensor(members, dtype=torch.long, device=device)
        out.append(LayerPlan(rows=rows, members=tuple(members), **lp))
        gathered += nbytes
    return BatchPlan(layers=tuple(out), token_rows=token_rows, gathered_bytes=gathered)


def _plan_layer(ref: LayerRefs, shape: Shape, lms: list[LayerMask], horizon: int,
                force: PlanKind | None, has_copy: list[bool], batch: frozenset[str] = frozenset(),
                kept: dict | None = None, layer: int = 0, batch_keep: float = 1.0,
                take: Take | None = None) -> tuple[dict, int]:
    device, dh = ref.wq.device, shape.head_dim
    per_head, per_group, per_neuron = unit_bytes(ref, shape)
    if not lms:  # every row is per-token at this layer
        empty_a = AttnPlan("per_mask", (), None, None, None)
        empty_f = FfnPlan("per_mask", (), None, None)
        return dict(attn=empty_a, ffn=empty_f, bytes={"attn": {"per_mask": 0}, "ffn": {"per_mask": 0}},
                    density={"heads": 0.0, "kv_groups": 0.0, "neurons": 0.0}), 0
    by_key: dict[bytes, list[int]] = {}
    for j, lm in enumerate(lms):
        by_key.setdefault(_layer_key(lm), []).append(j)
    firsts = [idx[0] for idx in by_key.values()]
    n = len(lms)
    groups = tuple(
        MaskGroup(rows=None if len(by_key) == 1 else torch.tensor(idx, dtype=torch.long, device=device),
                  members=tuple(idx))
        for idx in by_key.values())
    # the union by coverage flags (cheaper than unique over the rows' indices)
    heads_u = _covered(shape.heads, [lms[j].heads for j in firsts])
    groups_u = _covered(shape.kv_heads, [heads_u // shape.group_size])
    neurons_u = _covered(shape.ffn, [lms[j].neurons for j in firsts])
    full_attn = heads_u.numel() == shape.heads and groups_u.numel() == shape.kv_heads
    full_ffn = neurons_u.numel() == shape.ffn
    # a mask group's own copy exists when any of its rows holds it
    fresh = [j for j, idx in zip(firsts, by_key.values())
             if not lms[j].full and not any(has_copy[i] for i in idx)]

    def attn_of(j: int) -> int:
        return lms[j].heads.numel() * per_head + lms[j].groups.numel() * per_group

    def ffn_of(j: int) -> int:
        return lms[j].neurons.numel() * per_neuron

    attn_bytes = {"per_mask": sum(attn_of(j) for j in firsts),
                  "dense": shape.heads * per_head + shape.kv_heads * per_group}
    ffn_bytes = {"per_mask": sum(ffn_of(j) for j in firsts), "dense": shape.ffn * per_neuron}
    copies = {"attn": sum(attn_of(j) for j in fresh), "ffn": sum(ffn_of(j) for j in fresh)}
    if not full_attn:
        attn_bytes["union"] = heads_u.numel() * per_head + groups_u.numel() * per_group
    if not full_ffn:
        ffn_bytes["union"] = neurons_u.numel() * per_neuron
    # batch-invariant units, where rows differ: the batch's own heads (and KV groups every
    # row's cache needs) / neurons, batch_keep times as many as a row keeps on average
    distinct = len(by_key) > 1 and not any(lms[j].full for j in firsts)
    kept = kept if kept is not None else {}
    reuse = {}  # part -> the kept batch units' copy, where this composition keeps them
    if "attn" in batch and distinct:
        heads_b, row_heads = _batch_heads(shape, lms, batch_keep, heads_u.numel())
        groups_b = groups_u
        old = kept.get(("attn", layer))
        if old is not None and _keeps(old.units, heads_b, [lm.heads for lm in lms], shape.heads) \
                and bool(torch.isin(groups_u, old.groups).all()):
            usable = [old.units[in_groups(old.units, lm.groups, shape)] for lm in lms]
            if all(u.numel() for u in usable):
                heads_b, row_heads, groups_b, reuse["attn"] = old.units, usable, old.groups, old.weights
        attn_bytes["batch"] = heads_b.numel() * per_head + groups_b.numel() * per_group
    if "ffn" in batch and distinct:
        parts_n = [lm.neurons for lm in lms]
        neurons_b = _most_kept(shape.ffn, parts_n, _batch_count(parts_n, neurons_u.numel(), batch_keep))
        old = kept.get(("ffn", layer))
        if old is not None and _keeps(old.units, neurons_b, parts_n, shape.ffn):
            neurons_b, reuse["ffn"] = old.units, old.weights
        ffn_bytes["batch"] = neurons_b.numel() * per_neuron

    def costs(nbytes: dict, part: str) -> dict:
        # a copy (the union's, or the masks' own not made yet) is made once per batch
        # composition: charge it over the horizon
        out = {k: v * (1 + GATHER_READS / horizon) if k == "union" or (k == "batch" and part not in reuse) else v
               for k, v in nbytes.items()}
        out["per_mask"] += copies[part] * GATHER_READS / horizon
        return out

    attn_kind = _choose(costs(attn_bytes, "attn"), force)
    ffn_kind = _choose(costs(ffn_bytes, "ffn"), force)
    if force == "union":  # a forced union that covers every unit is the dense layout
        attn_bytes.setdefault("union", attn_bytes["dense"])
        ffn_bytes.setdefault("union", ffn_bytes["dense"])
    gathered = 0
    if attn_kind == "per_mask":
        attn = AttnPlan("per_mask", groups, None, None, None)
    elif attn_kind == "batch":
        w = reuse.get("attn")
        if w is None:
            w = gather_attn(ref, heads_b.to(device), groups_b.to(device), shape)
            gathered += sum(t.numel() * t.element_size() for t in (w.qkv[0][0], w.wo))
            kept[("attn", layer)] = KeptUnits(heads_b, groups_b, w)
        at_h, at_g = _slots(shape.heads, heads_b), _slots(shape.kv_heads, groups_b)
        wq, wkv = heads_b.numel() * dh, groups_b.numel() * dh
        q_idx = torch.cat([j * wq + head_rows(at_h(hs), dh) for j, hs in enumerate(row_heads)])
        kv_idx = torch.cat([j * wkv + head_rows(at_g(lm.groups), dh) for j, lm in enumerate(lms)])
        layouts = [attn_layout(hs, lm.groups, shape) for hs, lm in zip(row_heads, lms)]
        attn = AttnPlan("batch", (), w, q_idx.to(device), kv_idx.to(device),
                        q_split=tuple(hs.numel() * dh for hs in row_heads),
                        kv_split=tuple(lm.groups.numel() * dh for lm in lms),
                        row_heads=tuple((lay.n_heads, None if lay.q2g is None else lay.q2g.to(device))
                                        for lay in layouts))
    else:
        if attn_kind == "union" and not full_attn:
            w = gather_attn(ref, heads_u.to(device), groups_u.to(device), shape, take)
            gathered += sum(t.numel() * t.element_size() for t in (w.qkv[0][0], w.wo))
            lay_h, lay_g = heads_u, groups_u
        else:
            w = dense_layer(ref, shape).attn
            lay_h, lay_g = torch.arange(shape.heads), torch.arange(shape.kv_heads)
        wq, wkv = lay_h.numel() * dh, lay_g.numel() * dh
        at_h, at_g = _slots(shape.heads, lay_h), _slots(shape.kv_heads, lay_g)
        q_idx = torch.cat([j * wq + head_rows(at_h(lm.heads), dh) for j, lm in enumerate(lms)])
        kv_idx = torch.cat([j * wkv + head_rows(at_g(lm.groups), dh) for j, lm in enumerate(lms)])
        attn = AttnPlan(attn_kind, (), w, q_idx.to(device), kv_idx.to(device),
                        q_split=tuple(lm.heads.numel() * dh for lm in lms),
                        kv_split=tuple(lm.groups.numel() * dh for lm in lms))
    if ffn_kind == "per_mask":
        ffn = FfnPlan("per_mask", groups, None, None)
    elif ffn_kind == "batch":  # every row runs the batch's neurons: no per-row mask
        w = reuse.get("ffn")
        if w is None:
            w = gather_ffn(ref, neurons_b.to(device))
            gathered += sum(t.numel() * t.element_size() for t in (w.inp[0][0], w.w_down))
            kept[("ffn", layer)] = KeptUnits(neurons_b, None, w)
        ffn = FfnPlan("batch", (), w, None)
    else:
        if ffn_kind == "union" and not full_ffn:
            w = gather_ffn(ref, neurons_u.to(device), take)
            gathered += sum(t.numel() * t.element_size() for t in (w.inp[0][0], w.w_down))
            lay_n = neurons_u
        else:
            w = dense_layer(ref, shape).ffn
            lay_n = torch.arange(shape.ffn)
        keep = torch.zeros(n, lay_n.numel(), dtype=ref.w_down.dtype)
        at_n = _slots(shape.ffn, lay_n)
        for j, lm in enumerate(lms):
            keep[j, at_n(lm.neurons)] = 1
        ffn = FfnPlan(ffn_kind, (), w, keep.to(device))
    density = {"heads": round(heads_u.numel() / shape.heads, 4),
               "kv_groups": round(groups_u.numel() / shape.kv_heads, 4),
               "neurons": round(neurons_u.numel() / shape.ffn, 4)}
    return dict(attn=attn, ffn=ffn, bytes={"attn": attn_bytes, "ffn": ffn_bytes}, density=density), gathered


class PlanCache:
    """Batch plans keyed by the batch's composition (each row's mask key, in row order):
    a plan is built when the composition changes and reused by every step after. Bounded
    by `budget_bytes` of union copies and `max_entries`; the newest plan always stays (the
    running batch must not rebuild its plan every step), and a new plan with copies of its
    own drops the older ones that have copies. Thread-safe."""

    def __init__(self, budget_bytes: int, max_entries: int = 64):
        self.budget, self.max_entries = budget_bytes, max_entries
        self._entries: OrderedDict[tuple, BatchPlan] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = 0
        self.build_ms = 0.0  # spent building plans (their union copies included)
        # over the gated layers of every plan built: how many ran each part as each kind
        self.layers = dict.fromkeys(PLAN_LAYER_KEYS, 0)

    def get(self, key: tuple, build) -> BatchPlan:
        with self._lock:
            plan = self._entries.get(key)
            if plan is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return plan
        t0 = time.perf_counter()
        plan = build()
        ms = (time.perf_counter() - t0) * 1000
        with self._lock:
            self.misses += 1
            self.build_ms += ms
            for lp in plan.layers[1:]:
                self.layers[f"attn_{lp.attn.kind}"] += 1
                self.layers[f"ffn_{lp.ffn.kind}"] += 1
            if key not in self._entries:
                if plan.gathered_bytes:  # a composition that moved on rarely comes back: the
                    # older plans' union copies go, and their memory to the next plans (scratch)
                    for old in [k for k, p in self._entries.items() if p.gathered_bytes]:
                        self.bytes -= self._entries.pop(old).gathered_bytes
                self._entries[key] = plan
                self.bytes += plan.gathered_bytes
            self._evict()
            return self._entries.get(key, plan)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def _evict(self) -> None:
        while len(self._entries) > 1 and (self.bytes > self.budget or len(self._entries) > self.max_entries):
            _, plan = self._entries.popitem(last=False)
            self.bytes -= plan.gathered_bytes

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.bytes, "budget_bytes": self.budget,
                "hits": self.hits, "misses": self.misses, "build_ms": round(self.build_ms, 3), **self.layers}
