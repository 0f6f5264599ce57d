"""The saved predictor: writing it, reading it back, and refusing one built for another model.

A saved predictor is a folder: predictor.safetensors (weights, plus "stats.*" tensors: the
predictor-input statistics that a drift monitor compares against) and predictor.json (kind,
criterion, model fingerprint, shape, sizes, normalisation, metrics, dataset). Loading
checks fingerprint and shape and refuses a predictor built for another model.

Training (adapter.pipeline.train) produces what is saved here; the method factory
(adapter.selection.methods) turns what is loaded into a selection method. This module sits
between the two, so that neither imports the other.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import load_file, save_file

from adapter.pipeline.traces import TraceSet
from adapter.runtime.model_view import Shape
from adapter.selection import methods
from adapter.selection import predictors as P

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

KINDS = ("shadowllm", "dejavu", "static")
NORMALISATION = {"input": "minmax_per_example", "targets": "minmax_per_example_per_layer"}


class PredictorMismatch(ValueError):
    """The predictor was built for another model or shape."""


def save_predictor(folder: Path, kind: str, criterion: str, module_or_scores, shape: Shape,
                   fingerprint: str, metrics: dict, train: TraceSet, cfg: DataclassInstance) -> Path:
    """Write the folder; `train` is the split it was trained on (its input statistics and
    dataset version are recorded), `cfg` the TrainConfig it was trained with."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "static":
        tensors = {"heads": module_or_scores[0], "neurons": module_or_scores[1]}
        sizes = {}
    else:
        tensors = dict(module_or_scores.state_dict())
        sizes = ({"hidden": module_or_scores.hidden, "neuron_rank": module_or_scores.neuron_rank}
                 if kind == "shadowllm" else {"rank": module_or_scores.layers[0].rank})
    # which hidden state a dejavu predictor's neuron branch reads; an artifact without the
    # field (all written before it existed) reads the layer's input
    inputs = {"neuron_input": module_or_scores.neuron_input} if kind == "dejavu" else {}
    x = P.minmax(train.tensors["predictor_input"])
    tensors["stats.input_mean"], tensors["stats.input_std"] = x.mean(0), x.std(0)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "predictor.safetensors"))
    config = {
        "kind": kind, "criterion": criterion, "model_fingerprint": fingerprint, "shape": shape.as_dict(),
        "sizes": sizes, **inputs, "normalisation": NORMALISATION, "metrics": metrics,
        "input_stats": {"n": int(x.shape[0]), "mean_of_mean": float(x.mean()), "mean_of_std": float(x.std(0).mean())},
        "dataset": {"version": train.manifest["version"], "records": len(train)},
        "train_config": asdict(cfg), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / "predictor.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


@dataclass(frozen=True)
class LoadedPredictor:
    kind: str
    criterion: str
    config: dict
    module: object  # UnifiedPredictor | DejaVuPredictors | (head_scores, neuron_scores)

    def method(self, sparsity: float, mode: str = "per_layer", shape: Shape | None = None,
               head_selection: str = "heads"):
        """This predictor's selection method at `sparsity` (through the one factory)."""
        return methods.make_method(self.kind, sparsity, shape or self.module_shape, self.module,
                                   mode=mode, head_selection=head_selection)

    @property
    def module_shape(self) -> Shape:
        return Shape(**self.config["shape"])


def load_predictor(folder: Path, shape: Shape, fingerprint: str) -> LoadedPredictor:
    folder = Path(folder)
    cfg_path = folder / "predictor.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder} holds no predictor (predictor.json missing)")
    config = json.loads(cfg_path.read_text())
    if config.get("kind") not in KINDS:
        raise PredictorMismatch(f"{folder}: unknown predictor kind {config.get('kind')!r}")
    if config["shape"] != shape.as_dict():
        raise PredictorMismatch(
            f"predictor {folder} was built for a model of shape {config['shape']}, "
            f"but the loaded model has shape {shape.as_dict()}")
    if config["model_fingerprint"] != fingerprint:
        raise PredictorMismatch(
            f"predictor {folder} was built for model {config['model_fingerprint']}, "
            f"not for the loaded model {fingerprint}")
    tensors = load_file(str(folder / "predictor.safetensors"))
    state = {k: v for k, v in tensors.items() if not k.startswith("stats.")}
    if config["kind"] == "static":
        return LoadedPredictor("static", config["criterion"], config, (state["heads"], state["neurons"]))
    if config["kind"] == "shadowllm":
        module = P.UnifiedPredictor(shape, config["sizes"]["hidden"], config["sizes"]["neuron_rank"])
    else:
        module = P.DejaVuPredictors(shape, config["sizes"]["rank"], config.get("neuron_input", "layer_input"))
    module.load_state_dict(state)
    return LoadedPredictor(config["kind"], config["criterion"], config, module.eval().requires_grad_(False))
