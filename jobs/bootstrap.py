"""First start on an empty registry: put a trained predictor in as version 1 'champion'.

The embedded model ships trained predictors beside its weights; those are registered when
their fingerprint matches the loaded model. Otherwise (a user's checkpoint, or the shipped
ones are missing or stale) one is trained here from the built-in task suite with the same
code as `shadowgate predictor build`, so a fresh `shadowgate up` serves a sparse model.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from adapter.pipeline import traces
from adapter.pipeline.collect import collect
from adapter.embedded.recipe import default_predictor_dir
from adapter.pipeline.build import train_one
from adapter.pipeline.train import TrainConfig
from adapter.selection.artifact import PredictorMismatch, load_predictor
from jobs.registry import CHAMPION, PredictorRegistry
from monitor import drift

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


def with_reference(folder: Path, loaded, work: Path, families: list[str] | None = None,
                   per_family: int = 200) -> Path:
    """A copy of a predictor folder that holds its drift reference: the feature rows of the
    suite prompts it was trained on (all six families by default, 200 each: 1,200 rows) and the
    projection basis. Whatever registers a version calls this; a folder that already holds a
    reference is copied as it is."""
    out = work / "with-reference"
    shutil.rmtree(out, ignore_errors=True)  # a work folder used before
    shutil.copytree(folder, out)
    if not (out / drift.REFERENCE_DIR / "features.parquet").exists():
        predictor = load_predictor(out, loaded.runtime.shape, traces.model_fingerprint(loaded.runtime.model))
        basis, rows = drift.build_reference(loaded.runtime, loaded.tokenizer, predictor,
                                            drift.reference_prompts(families, per_family))
        drift.write_reference(out, basis, rows)
    return out


def ensure_champion(registry: PredictorRegistry, model_name: str, loaded, per_family: int = 60,
                    epochs: int = 30, reference_per_family: int = 200) -> str:
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
        folder = with_reference(folder, loaded, Path(tmp), per_family=reference_per_family)
        version = registry.register(folder, tags={"source": source, "model": model_name,
                                                  "model_fingerprint": traces.model_fingerprint(loaded.runtime.model)},
                                    metrics={k: v for k, v in metrics.items() if isinstance(v, float)})
    registry.set_alias(CHAMPION, version)
    log.info("registered predictor version %s (%s) as %s", version, source, CHAMPION)
    return version
