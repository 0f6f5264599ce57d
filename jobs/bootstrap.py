"""First start on an empty registry: put a trained predictor in as version 1 'champion'.

The embedded model ships trained predictors beside its weights; those are registered when
their fingerprint matches the loaded model. Otherwise (a user's checkpoint, or the shipped
ones are missing or stale) one is trained here from the built-in task suite with the same
code as `shadowgate predictor build`, so a fresh `shadowgate up` serves a sparse model.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from adapter import traces
from adapter.collect import collect
from adapter.default_model import default_predictor_dir
from adapter.predictor_build import train_one
from adapter.training import PredictorMismatch, TrainConfig, load_predictor
from jobs.registry import CHAMPION, PredictorRegistry

log = logging.getLogger(__name__)
SERVED = "shadowllm-plainact"  # the paper's choice: a good and predictable criterion


def shipped_predictor(model_name: str, runtime) -> Path | None:
    folder = default_predictor_dir(model_name) / SERVED
    if not (folder / "predictor.json").exists():
        return None
    try:
        load_predictor(folder, runtime.shape, traces.model_fingerprint(runtime.model))
    except (PredictorMismatch, FileNotFoundError) as exc:
        log.warning("shipped predictor not usable, training one instead: %s", exc)
        return None
    return folder


def train_initial(runtime, tokenizer, work: Path, per_family: int, epochs: int) -> tuple[Path, dict]:
    data = collect(runtime.model, tokenizer, work / "traces",
                   {"train": per_family, "validation": max(4, per_family // 4)})
    out = work / SERVED
    metrics = train_one("shadowllm", "plainact", data, out, runtime, TrainConfig(epochs=epochs))
    return out, metrics


def ensure_champion(registry: PredictorRegistry, model_name: str, loaded, per_family: int = 60,
                    epochs: int = 30) -> str:
    """The champion version, registering and aliasing version 1 first when there is none."""
    version = registry.resolve(CHAMPION)
    if version is not None:
        return version
    folder = shipped_predictor(model_name, loaded.runtime)
    source, metrics = "shipped", {}
    with tempfile.TemporaryDirectory(prefix="shadowgate-bootstrap-") as tmp:
        if folder is None:
            log.info("no champion and no shipped predictor: training one from the task suite")
            folder, metrics = train_initial(loaded.runtime, loaded.tokenizer, Path(tmp), per_family, epochs)
            source = "bootstrap-trained"
        version = registry.register(folder, tags={"source": source, "model": model_name,
                                                  "model_fingerprint": traces.model_fingerprint(loaded.runtime.model)},
                                    metrics={k: v for k, v in metrics.items() if isinstance(v, float)})
    registry.set_alias(CHAMPION, version)
    log.info("registered predictor version %s (%s) as %s", version, source, CHAMPION)
    return version
