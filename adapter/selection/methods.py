"""The one factory of selection methods: dense, shadowllm, dejavu, static.

`make_method` builds a method from its kind and its source (a predictor module, static
scores or a mask); every construction site (CLI, eval, engine, benchmarks, jobs) goes through
it, directly, through `LoadedPredictor.method` (adapter.selection.artifact) or through
`build_method` (adapter.selection.by_name, the by-name entry of the CLI).
"""

from __future__ import annotations

import torch

from adapter.runtime import masks
from adapter.runtime.model_view import Shape
from adapter.selection import predictors as P
from adapter.selection.base import SelectionMethod

METHODS = ("dense", "shadowllm", "dejavu", "static")
MODES = ("per_layer", "global")
HEAD_SELECTIONS = ("heads", "groups")


def make_method(name: str, sparsity: float, shape: Shape | None = None, source=None, *,
                mode: masks.Mode = "per_layer", head_selection: masks.HeadSelection = "heads",
                sparse_prompt: bool = True) -> SelectionMethod:
    """A selection method of kind `name` at `sparsity`.

    source: dense -> None; shadowllm -> a UnifiedPredictor; dejavu -> DejaVuPredictors;
    static -> (head_scores (L-1, H), neuron_scores (L-1, F)) with `shape`, or a Mask.
    mode and head_selection apply to the sequence-level methods (shadowllm, static);
    sparse_prompt to dejavu."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if mode not in MODES:
        raise ValueError(f"unknown pruning mode {mode!r}: use per_layer or global")
    if head_selection not in HEAD_SELECTIONS:
        raise ValueError(f"unknown head selection {head_selection!r}: use heads or groups")
    if name == "dense":
        return P.Dense()
    if name == "shadowllm":
        _expect(name, source, P.UnifiedPredictor)
        return P.ShadowLLM(source, sparsity, mode, head_selection)
    if name == "dejavu":
        _expect(name, source, P.DejaVuPredictors)
        return P.DejaVu(source, sparsity, sparse_prompt=sparse_prompt)
    if isinstance(source, masks.Mask):
        return P.Static(source, sparsity)
    if not (isinstance(source, tuple) and len(source) == 2 and all(isinstance(t, torch.Tensor) for t in source)):
        raise TypeError("a static method needs (head_scores, neuron_scores) tensors or a Mask, "
                        f"got {type(source).__name__}")
    if shape is None:
        raise ValueError("a static method built from scores needs the model's shape")
    return P.Static.from_scores(shape, source[0], source[1], sparsity, mode, head_selection)


def dense() -> SelectionMethod:
    return make_method("dense", 0.0)


def _expect(name: str, source, kind: type) -> None:
    if not isinstance(source, kind):
        raise TypeError(f"a {name} method needs a {kind.__name__}, got {type(source).__name__}")
