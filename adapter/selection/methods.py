"""Build a selection method by name: dense, shadowllm, dejavu, static.

Predictors come from a trained predictor directory when one is given; otherwise they are
random-initialised (seeded) for speed work and the result says so ("predictor": "random-init").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapter.selection import predictors as P
from adapter.runtime.model_view import Shape
from adapter.config import PredictorConfig
from adapter.pipeline.train import load_predictor

METHODS = ("dense", "shadowllm", "dejavu", "static")


@dataclass(frozen=True)
class BuiltMethod:
    method: object
    predictor: str  # "none" | "random-init" | a version / path description


TRAINED = {"shadowllm": "shadowllm-plainact", "dejavu": "dejavu-l2norm", "static": "static-plainact"}


def build_method(shape: Shape, name: str, sparsity: float, config: PredictorConfig = PredictorConfig(),
                 mode: str = "per_layer", seed: int = 0, predictor_dir: Path | None = None,
                 fingerprint: str | None = None) -> BuiltMethod:
    """A method by name; trained predictors from `predictor_dir` (validated against the
    model's fingerprint) when present there, else random-initialised ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if name == "dense":
        return BuiltMethod(P.Dense(), "none")
    if predictor_dir is not None and (Path(predictor_dir) / TRAINED[name] / "predictor.json").exists():
        folder = Path(predictor_dir) / TRAINED[name]
        loaded = load_predictor(folder, shape, fingerprint)
        return BuiltMethod(loaded.method(sparsity, mode, shape), str(folder))
    if name == "shadowllm":
        pred = P.random_unified(shape, config.hidden, config.rank_for(shape.layers, shape.ffn), seed)
        return BuiltMethod(P.ShadowLLM(pred, sparsity, mode), "random-init")
    if name == "dejavu":
        return BuiltMethod(P.DejaVu(P.random_dejavu(shape, config.dejavu_rank, seed), sparsity), "random-init")
    return BuiltMethod(P.random_static(shape, sparsity, seed), "random-init")
