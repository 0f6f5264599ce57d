"""Per-sequence masks: which heads and FFN neurons of each layer are kept.

A Mask is chosen once per sequence (from the prompt) and is immutable. Layer 0 always stays
dense. With grouped-query attention a KV head (group) is computed when any of its query
heads is kept, so the work saved is counted from the kept groups ("effective sparsity").

Shapes: L layers, H query heads, G KV groups, F FFN neurons.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch

from adapter.runtime.model_view import Shape

Mode = Literal["per_layer", "global"]


@dataclass(frozen=True)
class LayerMask:
    heads: torch.Tensor  # (Kh,) sorted kept query-head indices
    groups: torch.Tensor  # (Kg,) sorted kept KV-group indices
    neurons: torch.Tensor  # (Kf,) sorted kept neuron indices
    full: bool  # every unit kept: the runtime reads the original weights, no gather


@dataclass(frozen=True)
class Mask:
    layers: tuple[LayerMask, ...]  # one per decoder layer, layer 0 included (always full)
    key: str  # content hash: equal masks share gathered weights

    @property
    def dense(self) -> bool:
        return all(lm.full for lm in self.layers)

    def summary(self) -> list[dict]:
        """Kept units per layer, for audit records (host lists; call after the request)."""
        return [{"layer": i, "heads": lm.heads.tolist(), "kv_groups": lm.groups.tolist(),
                 "neurons_kept": int(lm.neurons.numel())} for i, lm in enumerate(self.layers)]


def _layer_mask(shape: Shape, heads: torch.Tensor, neurons: torch.Tensor) -> LayerMask:
    heads = torch.sort(heads).values
    neurons = torch.sort(neurons).values
    groups = torch.unique(heads // shape.group_size)
    full = heads.numel() == shape.heads and neurons.numel() == shape.ffn
    return LayerMask(heads=heads, groups=groups, neurons=neurons, full=full)


def _make(shape: Shape, layers: list[LayerMask]) -> Mask:
    digest = hashlib.blake2b(digest_size=16)
    for lm in layers:
        digest.update(lm.heads.numpy().tobytes())
        digest.update(b"|")
        digest.update(lm.neurons.numpy().tobytes())
        digest.update(b"#")
    return Mask(layers=tuple(layers), key=digest.hexdigest())


def full_mask(shape: Shape) -> Mask:
    heads, neurons = torch.arange(shape.heads), torch.arange(shape.ffn)
    return _make(shape, [_layer_mask(shape, heads, neurons) for _ in range(shape.layers)])


def from_indices(shape: Shape, heads: list, neurons: list) -> Mask:
    """Build a mask from explicit per-layer index lists for layers 1..L-1 (layer 0 dense)."""
    if len(heads) != shape.layers - 1 or len(neurons) != shape.layers - 1:
        raise ValueError(f"expected index lists for {shape.layers - 1} layers (1..L-1)")
    layers = [_layer_mask(shape, torch.arange(shape.heads), torch.arange(shape.ffn))]
    for h, n in zip(heads, neurons):
        h, n = torch.as_tensor(h, dtype=torch.long), torch.as_tensor(n, dtype=torch.long)
        if h.numel() == 0:
            raise ValueError("every layer must keep at least one head")
        if n.numel() == 0:
            raise ValueError("every layer must keep at least one neuron")
        layers.append(_layer_mask(shape, h, n))
    return _make(shape, layers)


def keep_count(total: int, sparsity: float, floor: int = 1) -> int:
    return max(floor, min(total, int(round((1.0 - sparsity) * total))))


def select(shape: Shape, head_scores: torch.Tensor, neuron_scores: torch.Tensor, sparsity: float,
           mode: Mode = "per_layer", neuron_floor: float = 0.02) -> Mask:
    """Top-(1-s) units from importance scores for layers 1..L-1.

    head_scores: (L-1, H); neuron_scores: (L-1, F). per_layer keeps the same count in every
    layer; global ranks all layers together, keeping at least one head and
    ceil(neuron_floor * F) neurons per layer."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    n = shape.layers - 1
    if head_scores.shape != (n, shape.heads) or neuron_scores.shape != (n, shape.ffn):
        raise ValueError(
            f"scores of shape {tuple(head_scores.shape)} / {tuple(neuron_scores.shape)} do not "
            f"match the model: expected ({n}, {shape.heads}) / ({n}, {shape.ffn})")
    head_scores = head_scores.float()
    neuron_scores = neuron_scores.float()
    if mode == "per_layer":
        kh = keep_count(shape.heads, sparsity)
        kf = keep_count(shape.ffn, sparsity)
        heads = head_scores.topk(kh, dim=1).indices
        neurons = neuron_scores.topk(kf, dim=1).indices
        return from_indices(shape, list(heads), list(neurons))
    if mode != "global":
        raise ValueError(f"unknown pruning mode {mode!r}: use per_layer or global")
    heads = _global_topk(head_scores, keep_count(n * shape.heads, sparsity, floor=n), floor=1)
    floor = max(1, math.ceil(neuron_floor * shape.ffn))
    neurons = _global_topk(neuron_scores, keep_count(n * shape.ffn, sparsity, floor=n * floor),
                           floor=floor)
    return from_indices(shape, heads, neurons)


def _global_topk(scores: torch.Tensor, total: int, floor: int) -> list[torch.Tensor]:
    """Keep `total` units over all rows of `scores` (R, U), at least `floor` per row."""
    rows, units = scores.shape
    forced = torch.zeros_like(scores, dtype=torch.bool)
    forced.scatter_(1, scores.topk(floor, dim=1).indices, True)
    rest = total - rows * floor
    ranked = scores.masked_fill(forced, float("-inf")).flatten()
    chosen = forced.flatten().clone()
    if rest > 0:
        chosen[ranked.topk(rest).indices] = True
    chosen = chosen.view(rows, units)
    return [row.nonzero().flatten() for row in chosen]


def unit_params(shape: Shape) -> tuple[int, int, int]:
    """Weights read per kept query head (q and o rows), per kept KV group (k and v rows) and
    per kept neuron (gate/up/down or fc1/fc2) in one layer."""
    d, dh = shape.hidden, shape.head_dim
    return 2 * d * dh, 2 * d * dh, (3 if shape.family == "llama" else 2) * d


def layer_params(shape: Shape, heads: int, groups: int, neurons: int) -> int:
    per_head, per_group, per_neuron = unit_params(shape)
    return heads * per_head + groups * per_group + neurons * per_neuron


def effective_sparsity(shape: Shape, mask: Mask) -> float:
    """Fraction of the gateable weights of layers 1..L-1 (q/k/v/o and FFN) not read.

    q and o cost 2*D*Dh per kept head, k and v 2*D*Dh per kept KV group, a neuron
    (2 or 3)*D; layer 0 is dense by design and not counted."""
    dense = (shape.layers - 1) * layer_params(shape, shape.heads, shape.kv_heads, shape.ffn)
    kept = sum(layer_params(shape, lm.heads.numel(), lm.groups.numel(), lm.neurons.numel())
               for lm in mask.layers[1:])
    return 1.0 - kept / dense


def effective_sparsity_counts(shape: Shape, kept_heads: int, kept_groups: int, kept_neurons: int) -> float:
    """Effective sparsity of a uniform per-layer selection (used by per-token methods)."""
    dense = layer_params(shape, shape.heads, shape.kv_heads, shape.ffn)
    return 1.0 - layer_params(shape, kept_heads, kept_groups, kept_neurons) / dense
