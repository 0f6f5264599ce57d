"""The contract between the gated runtime and a selection method (dense, shadowllm, dejavu,
static). The runtime calls only what is declared here, never isinstance or getattr.

Per request the runtime calls, in order:
  placed(device, dtype)        once: the method with its predictor on the model's device
  choose(shape, u)             once: the sequence mask from layer 0's attention output u (D,)
  effective_sparsity(shape, m) once: the fraction of gateable weights not read
and, for per-token methods (per_token True) at every token of layers >= 1:
  counts(shape)                kept heads and neurons per token
  units(layer, h, kh, kf)      which heads, from the hidden state h (D,) entering the layer,
                               and which neurons, or None to choose them after attention
  ffn_units(layer, x, kf, n)   the neurons, once the attention block has run: x (D,) is the
                               hidden state entering the FFN block, n what units returned
sparse_prompt says whether a per-token method also gates the prompt (token by token).

Shapes: D model dim, Kh kept heads, K kept neurons.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from adapter.runtime import masks
from adapter.runtime.model_view import Shape


class SelectionMethod(ABC):
    """Base of every method. Subclasses are frozen dataclasses: a method is a value, shared
    by every request that uses it, and never changed by one."""

    name: ClassVar[str]
    sparsity: float
    per_token: ClassVar[bool] = False
    sparse_prompt: bool = False

    @abstractmethod
    def choose(self, shape: Shape, u: torch.Tensor) -> masks.Mask:
        """The sequence's mask from u (D,), layer 0's attention output at the selection position."""

    def placed(self, device: torch.device, dtype: torch.dtype) -> "SelectionMethod":
        """This method with its predictor on `device` (in `dtype` where that is safe)."""
        return self

    def effective_sparsity(self, shape: Shape, mask: masks.Mask) -> float:
        return masks.effective_sparsity(shape, mask)

    def counts(self, shape: Shape) -> tuple[int, int]:
        raise TypeError(f"{self.name} selects once per sequence: it has no per-token counts")

    def units(self, layer: int, h: torch.Tensor, kh: int, kf: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise TypeError(f"{self.name} selects once per sequence: it has no per-token units")

    def ffn_units(self, layer: int, x: torch.Tensor, kf: int, neurons: torch.Tensor | None) -> torch.Tensor:
        """The kept neurons (K,) of a per-token method, given x (D,), the hidden state after
        the attention block. By default the ones units chose from the layer's input."""
        if neurons is None:
            raise TypeError(f"{self.name}.units left the neurons to ffn_units, which does not choose them")
        return neurons
