"""Predictor modules and the selection methods the runtime applies per request.

- shadowllm: ONE predictor, run once per request on the output of layer 0's attention
  block at the last prompt token (D,), min-max normalised per example, scoring every head
  and FFN neuron of layers 1..L-1. Heads: Linear(D, Hp) -> ReLU -> Linear(Hp, n*H).
  Neurons: the same trunk shape, with a low-rank factored output when n*F is large
  (Linear(Hp, n*r) then one (r, F) factor per layer) so it stays small next to the model.
- dejavu: one small predictor per layer, run at EVERY decode step, scoring that layer's
  heads and neurons for the current token. Heads are scored from the hidden state entering
  the layer; neurons from the same state ("layer_input", what shipped artifacts are) or from
  the FFN input, the hidden state after the layer's attention block ("ffn_input", as DejaVu
  does: it sees what attention just added).
- static: one fixed mask for every input, no predictor.

Shapes: D model dim, n gated layers (L-1), H heads, F FFN neurons, Hp predictor width.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from adapter.runtime import masks
from adapter.runtime.model_view import Shape
from adapter.selection.base import SelectionMethod


def minmax(u: torch.Tensor) -> torch.Tensor:
    """Per-example min-max normalisation of the predictor input (ShadowLLM), (B, D)."""
    lo = u.amin(-1, keepdim=True)
    hi = u.amax(-1, keepdim=True)
    return (u - lo) / (hi - lo).clamp_min(1e-6)


class UnifiedPredictor(nn.Module):
    def __init__(self, shape: Shape, hidden: int = 2048, neuron_rank: int = 0):
        super().__init__()
        self.shape = shape
        self.n = shape.layers - 1
        self.hidden, self.neuron_rank = hidden, neuron_rank
        d = shape.hidden
        self.heads = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, self.n * shape.heads))
        if neuron_rank:
            self.neurons = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, self.n * neuron_rank))
            self.neuron_factors = nn.Parameter(torch.randn(self.n, neuron_rank, shape.ffn) / neuron_rank**0.5)
        else:
            self.neurons = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, self.n * shape.ffn))
            self.neuron_factors = None

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u: (B, D) raw layer-0 attention outputs -> heads (B, n, H), neurons (B, n, F)."""
        x = minmax(u)
        heads = self.heads(x).view(-1, self.n, self.shape.heads)
        z = self.neurons(x)
        if self.neuron_factors is None:
            neurons = z.view(-1, self.n, self.shape.ffn)
        else:
            neurons = torch.einsum("bnr,nrf->bnf", z.view(-1, self.n, self.neuron_rank), self.neuron_factors)
        return heads, neurons


class LayerPredictor(nn.Module):
    """DejaVu-style predictor of one layer: Linear(D, 2r) -> ReLU -> (heads H, neurons F)."""

    def __init__(self, shape: Shape, rank: int = 128):
        super().__init__()
        self.rank = rank
        self.trunk = nn.Linear(shape.hidden, 2 * rank)
        self.heads = nn.Linear(rank, shape.heads)
        self.neurons = nn.Linear(rank, shape.ffn)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: (N, D) hidden entering the layer -> heads (N, H), neurons (N, F)."""
        a, b = torch.relu(self.trunk(h)).split(self.rank, dim=-1)
        return self.heads(a), self.neurons(b)

    def head_scores(self, h: torch.Tensor) -> torch.Tensor:
        """(N, D) -> heads (N, H), through the trunk's first r rows only."""
        r = self.rank
        return self.heads(torch.relu(F.linear(h, self.trunk.weight[:r], self.trunk.bias[:r])))

    def neuron_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> neurons (N, F), through the trunk's last r rows only (the neuron branch
        of an ffn_input predictor reads another hidden state than its head branch)."""
        r = self.rank
        return self.neurons(torch.relu(F.linear(x, self.trunk.weight[r:], self.trunk.bias[r:])))


NEURON_INPUTS = ("layer_input", "ffn_input")


class DejaVuPredictors(nn.Module):
    """One LayerPredictor per gated layer. neuron_input says which hidden state the neuron
    branch reads: "layer_input" (the state entering the layer, like the heads) or
    "ffn_input" (the state after the layer's attention block, the FFN block's input). The
    weights have the same shapes either way, so the width budget does not change."""

    def __init__(self, shape: Shape, rank: int = 128, neuron_input: str = "layer_input"):
        super().__init__()
        if neuron_input not in NEURON_INPUTS:
            raise ValueError(f"unknown dejavu neuron input {neuron_input!r}: use {' or '.join(NEURON_INPUTS)}")
        self.shape = shape
        self.neuron_input = neuron_input
        self.layers = nn.ModuleList(LayerPredictor(shape, rank) for _ in range(shape.layers - 1))



# ---- selection methods (the contract is adapter/selection/base.py) -----------------------

_COPIES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def placed_module(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`module` on `device` in `dtype`: itself when it is there already, else one copy per
    (device, dtype), made on first use and kept as long as the original lives. The original
    is never moved: CPU-side users (drift features, training) keep reading it."""
    p = next(module.parameters())
    if p.device == device and p.dtype == dtype:
        return module
    copies = _COPIES.setdefault(module, {})
    key = (str(device), dtype)
    if key not in copies:
        # made outside inference mode (prefill runs in it): the copy is an ordinary module
        with torch.inference_mode(False):
            copies[key] = copy.deepcopy(module).to(device=device, dtype=dtype)
    return copies[key]


@dataclass(frozen=True)
class Dense(SelectionMethod):
    name: ClassVar[str] = "dense"
    sparsity: float = 0.0

    def choose(self, shape: Shape, u: torch.Tensor) -> masks.Mask:
        return masks.full_mask(shape)


@dataclass(frozen=True)
class ShadowLLM(SelectionMethod):
    """One mask per sequence from the unified predictor. The predictor runs on the model's
    device in float32 whatever the model's dtype: it runs once per request, and bfloat16
    scores would tie in the top-k and min-max normalise coarsely."""

    predictor: UnifiedPredictor
    sparsity: float
    mode: masks.Mode = "per_layer"
    head_selection: masks.HeadSelection = "heads"
    name: ClassVar[str] = "shadowllm"

    def choose(self, shape: Shape, u: torch.Tensor) -> masks.Mask:
        if self.sparsity == 0.0:
            return masks.full_mask(shape)
        heads, neurons = self.predictor(u[None].float())
        return masks.select(shape, heads[0].cpu(), neurons[0].cpu(), self.sparsity, self.mode,
                            heads_by=self.head_selection)

    def placed(self, device: torch.device, dtype: torch.dtype) -> "ShadowLLM":
        module = placed_module(self.predictor, device, torch.float32)
        return self if module is self.predictor else replace(self, predictor=module)


@dataclass(frozen=True)
class Static(SelectionMethod):
    mask: masks.Mask
    sparsity: float
    name: ClassVar[str] = "static"

    @classmethod
    def from_scores(cls, shape: Shape, head_scores: torch.Tensor, neuron_scores: torch.Tensor,
                    sparsity: float, mode: masks.Mode = "per_layer",
                    head_selection: masks.HeadSelection = "heads") -> "Static":
        return cls(masks.select(shape, head_scores, neuron_scores, sparsity, mode, heads_by=head_selection),
                   sparsity)

    def choose(self, shape: Shape, u: torch.Tensor) -> masks.Mask:
        return self.mask


@dataclass(frozen=True)
class DejaVu(SelectionMethod):
    """Per-token selection at every layer >= 1. With sparse_prompt (the default) prompt
    tokens are gated too, one token at a time, so quality comparisons against sequence-level
    methods are fair; without it the prompt runs densely and only decode is sparse.

    Every KV group is computed (the cache stays complete for later tokens), so group-aware
    head selection does not apply. The per-layer predictors run on the model's device in its
    dtype: they run at every token of every layer, and only rank one token's units."""

    predictors: DejaVuPredictors
    sparsity: float
    sparse_prompt: bool = True
    name: ClassVar[str] = "dejavu"
    per_token: ClassVar[bool] = True

    def choose(self, shape: Shape, u: torch.Tensor) -> masks.Mask:
        return masks.full_mask(shape)

    def placed(self, device: torch.device, dtype: torch.dtype) -> "DejaVu":
        module = placed_module(self.predictors, device, dtype)
        return self if module is self.predictors else replace(self, predictors=module)

    def effective_sparsity(self, shape: Shape, mask: masks.Mask) -> float:
        kh, kf = self.counts(shape)
        return masks.effective_sparsity_counts(shape, kh, shape.kv_heads, kf)

    def counts(self, shape: Shape) -> tuple[int, int]:
        return masks.keep_count(shape.heads, self.sparsity), masks.keep_count(shape.ffn, self.sparsity)

    def units(self, layer: int, h: torch.Tensor, kh: int,
              kf: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Kept heads (Kh,) of `layer` (>= 1) for one token h (D,), the hidden state entering
        the layer, and its kept neurons (K,) when they are scored from h too (a layer_input
        predictor: one trunk product for both); None when ffn_units scores them."""
        predictor = self.predictors.layers[layer - 1]
        if self.predictors.neuron_input == "ffn_input":
            return predictor.head_scores(h[None])[0].topk(kh).indices.sort().values, None
        heads, neurons = predictor(h[None])
        return heads[0].topk(kh).indices.sort().values, neurons[0].topk(kf).indices.sort().values

    def ffn_units(self, layer: int, x: torch.Tensor, kf: int,
                  neurons: torch.Tensor | None) -> torch.Tensor:
        """Kept neurons (K,) of `layer`: those units chose, or, for an ffn_input predictor,
        the top kf scored from x (D,), the hidden state after the layer's attention block."""
        if neurons is not None:
            return neurons
        return self.predictors.layers[layer - 1].neuron_scores(x[None])[0].topk(kf).indices.sort().values


def random_unified(shape: Shape, hidden: int, neuron_rank: int = 0, seed: int = 0) -> UnifiedPredictor:
    torch.manual_seed(seed)
    return UnifiedPredictor(shape, hidden, neuron_rank).eval().requires_grad_(False)


def random_dejavu(shape: Shape, rank: int = 128, seed: int = 0,
                  neuron_input: str = "layer_input") -> DejaVuPredictors:
    torch.manual_seed(seed)
    return DejaVuPredictors(shape, rank, neuron_input).eval().requires_grad_(False)


def random_static_scores(shape: Shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random unit scores (L-1, H) and (L-1, F): a static method's source for speed work."""
    g = torch.Generator().manual_seed(seed)
    n = shape.layers - 1
    return torch.rand(n, shape.heads, generator=g), torch.rand(n, shape.ffn, generator=g)


def random_static(shape: Shape, sparsity: float, seed: int = 0) -> Static:
    return Static.from_scores(shape, *random_static_scores(shape, seed), sparsity)
