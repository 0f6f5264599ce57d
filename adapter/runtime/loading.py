"""Load a causal LM (embedded default, local directory or hub id) into the gated runtime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapter.config import RuntimeConfig
from adapter.embedded.recipe import resolve_model
from adapter.pipeline.traces import pin_fingerprint
from adapter.runtime.gated import GatedModel


class ModelLoadError(ValueError):
    pass


@dataclass(frozen=True)
class Loaded:
    name: str
    path: str
    runtime: GatedModel
    tokenizer: object


def load(name: str, config: RuntimeConfig | None = None) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapter.runtime.model_view import UnsupportedModel

    try:
        path = resolve_model(name)
    except FileNotFoundError as exc:
        raise ModelLoadError(str(exc)) from None
    local = Path(path)
    if local.exists() and not (local / "config.json").exists():
        raise ModelLoadError(f"{path} is not a saved model: no config.json (save it with save_pretrained)")
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise ModelLoadError(f"model path {path} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {exc}") from None
    # the model's identity is taken from the weights as loaded, before the runtime casts
    # them to the serving dtype and moves them: predictors match whatever the dtype/device
    pin_fingerprint(model)
    try:
        runtime = GatedModel(model, config)
    except UnsupportedModel as exc:
        raise ModelLoadError(str(exc)) from None
    return Loaded(name=name, path=path, runtime=runtime, tokenizer=tokenizer)
