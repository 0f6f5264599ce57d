"""The one factory of selection methods: dense, shadowllm, dejavu, static.

`make_method` builds a method from its kind and its source (a predictor module, static
scores or a mask); every construction site (CLI, eval, engine, benchmarks, jobs) goes through
it, directly or through `LoadedPredictor.method`. `build_method` is the by-name entry of the
CLI: trained predictors from a predictor directory when one is given; otherwise
random-initialised (seeded) ones for speed work, and the result says so ("random-init").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from adapter.config import PredictorConfig
from adapter.pipeline import train as training
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


@dataclass(frozen=True)
class BuiltMethod:
    method: SelectionMethod
    predictor: str  # "none" | "random-init" | a version / path description


TRAINED = {"shadowllm": "shadowllm-plainact", "dejavu": "dejavu-l2norm", "static": "static-plainact"}


def build_method(shape: Shape, name: str, sparsity: float, config: PredictorConfig = PredictorConfig(),
                 mode: str = "per_layer", seed: int = 0, predictor_dir: Path | None = None,
                 fingerprint: str | None = None, head_selection: str = "heads") -> BuiltMethod:
    """A method by name; trained predictors from `predictor_dir` (validated against the
    model's fingerprint) when present there, else random-initialised ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    if name == "dense":
        return BuiltMethod(make_method("dense", sparsity), "none")
    if predictor_dir is not None and (Path(predictor_dir) / TRAINED[name] / "predictor.json").exists():
        folder = Path(predictor_dir) / TRAINED[name]
        loaded = training.load_predictor(folder, shape, fingerprint)
        return BuiltMethod(loaded.method(sparsity, mode, shape, head_selection), str(folder))
    if name == "shadowllm":
        source = P.random_unified(shape, config.hidden, config.rank_for(shape.layers, shape.ffn), seed)
    elif name == "dejavu":
        source = P.random_dejavu(shape, config.dejavu_rank, seed)
    else:
        source = P.random_static_scores(shape, seed)
    return BuiltMethod(make_method(name, sparsity, shape, source, mode=mode, head_selection=head_selection),
                       "random-init")
