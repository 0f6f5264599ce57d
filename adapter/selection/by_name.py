"""A selection method by name: the entry of the CLI (`shadowgate generate --method ...`).

Trained predictors come from a predictor directory when one is given and holds the method's
folder (TRAINED); otherwise random-initialised (seeded) ones serve for speed work, and the
result says so ("random-init"). Built on the saved-predictor format (adapter.selection.artifact)
and the method factory (adapter.selection.methods), so that the factory needs neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapter.config import PredictorConfig
from adapter.runtime.model_view import Shape
from adapter.selection import predictors as P
from adapter.selection.artifact import load_predictor
from adapter.selection.base import SelectionMethod
from adapter.selection.methods import METHODS, make_method


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
        loaded = load_predictor(folder, shape, fingerprint)
        return BuiltMethod(loaded.method(sparsity, mode, shape, head_selection), str(folder))
    if name == "shadowllm":
        source = P.random_unified(shape, config.hidden, config.rank_for(shape.layers, shape.ffn), seed)
    elif name == "dejavu":
        source = P.random_dejavu(shape, config.dejavu_rank, seed)
    else:
        source = P.random_static_scores(shape, seed)
    return BuiltMethod(make_method(name, sparsity, shape, source, mode=mode, head_selection=head_selection),
                       "random-init")
