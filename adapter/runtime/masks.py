"""Per-sequence masks: which heads and FFN neurons of each layer are kept.

A Mask is chosen once per sequence (from the prompt) and is immutable. Layer 0 always stays
dense. With grouped-query attention a KV head (group) is computed when any of its query
heads is kept, so the work saved is counted from the kept groups ("effective sparsity").

Head selection under GQA (`heads_by`):
  heads   top-k over query heads; a group is kept when any of its heads is. At sparsity 0.5
          with 4 heads per group nearly every group keeps one head, so the KV cache and the
          k/v projections save little (effective sparsity below the nominal).
  groups  score each KV group (sum of its heads' scores), keep the top (1-s) of groups, then
          the best heads inside the kept groups only (at least one per kept group): the kept
          share of groups, and so the KV-cache saving, is the nominal sparsity.

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
HeadSelection = Literal["heads", "groups"]


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
           mode: Mode = "per_layer", neuron_floor: float = 0.02, heads_by: HeadSelection = "heads") -> Mask:
    """Top-(1-s) units from importance scores for layers 1..L-1.

    head_scores: (L-1, H); neuron_scores: (L-1, F). per_layer keeps the same count in every
    layer; global ranks all layers together, keeping at least one head and
    ceil(neuron_floor * F) neurons per layer. heads_by: see the module docstring."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if mode not in ("per_layer", "global"):
        raise ValueError(f"unknown pruning mode {mode!r}: use per_layer or global")
    if heads_by not in ("heads", "groups"):
        raise ValueError(f"unknown head selection {heads_by!r}: use heads or groups")
    n = shape.layers - 1
    if head_scores.shape != (n, shape.heads) or neuron_scores.shape != (n, shape.ffn):
        raise ValueError(
            f"scores of shape {tuple(head_scores.shape)} / {tuple(neuron_scores.shape)} do not "
            f"match the model: expected ({n}, {shape.heads}) / ({n}, {shape.ffn})")
    head_scores = head_scores.float()
    neuron_scores = neuron_scores.float()
    if heads_by == "groups":
        heads = _group_heads(shape, head_scores, sparsity, mode)
    elif mode == "per_layer":
        heads = list(head_scores.topk(keep_count(shape.heads, sparsity), dim=1).indices)
    else:
        heads = _global_topk(head_scores, keep_count(n * shape.heads, sparsity, floor=n), floor=1)
    if mode == "per_layer":
        neurons = list(neuron_scores.topk(keep_count(shape.ffn, sparsity), dim=1).indices)
    else:
        floor = max(1, math.ceil(neuron_floor * shape.ffn))
        neurons = _global_topk(neuron_scores, keep_count(n * shape.ffn, sparsity, floor=n * floor),
                               floor=floor)
    return from_indices(shape, heads, neurons)


def _group_heads(shape: Shape, head_scores: torch.Tensor, sparsity: float, mode: Mode) -> list[torch.Tensor]:
    """Group-aware head choice: kept heads (Kh,) per layer, all inside the top KV groups.

    head_scores (n, H) -> group scores (n, G) = sum over each group's heads. per_layer keeps
    keep_count(G) groups and keep_count(H) heads per layer; global ranks over all layers
    (at least one group per layer). The head count is clipped to [kept groups, kept groups *
    group size]: every kept group keeps at least one head, and no head outside one is kept."""
    n, gs = head_scores.shape[0], shape.group_size
    group_scores = head_scores.view(n, shape.kv_heads, gs).sum(-1)
    if mode == "per_layer":
        kg = keep_count(shape.kv_heads, sparsity)
        groups = torch.zeros(n, shape.kv_heads, dtype=torch.bool)
        groups.scatter_(1, group_scores.topk(kg, dim=1).indices, True)
    else:
        kept = _global_topk(group_scores, keep_count(n * shape.kv_heads, sparsity, floor=n), floor=1)
        groups = torch.zeros(n, shape.kv_heads, dtype=torch.bool)
        for row, g in enumerate(kept):
            groups[row, g] = True
    inside = groups.repeat_interleave(gs, dim=1)  # (n, H): head lies in a kept group
    # at least one head per kept group: its best one
    best = head_scores.view(n, shape.kv_heads, gs).argmax(-1) + torch.arange(shape.kv_heads) * gs
    forced = torch.zeros_like(inside)
    forced.scatter_(1, best, groups)
    ranked = head_scores.masked_fill(~inside | forced, float("-inf"))
    if mode == "per_layer":
        chosen = []
        for row in range(n):
            kg = int(groups[row].sum())
            kh = min(max(keep_count(shape.heads, sparsity), kg), kg * gs)
            extra = ranked[row].topk(kh - kg).indices
            chosen.append(torch.cat([forced[row].nonzero().flatten(), extra]))
        return chosen
    total_groups = int(groups.sum())
    kh = min(max(keep_count(n * shape.heads, sparsity, floor=n), total_groups), total_groups * gs)
    flat = forced.flatten().clone()
    if kh > total_groups:
        flat[ranked.flatten().topk(kh - total_groups).indices] = True
    return [row.nonzero().flatten() for row in flat.view(n, shape.heads)]


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
