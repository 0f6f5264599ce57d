"""Collect traces and train every predictor kind: what `shadowgate predictor build` runs."""

from __future__ import annotations

from pathlib import Path

from adapter.pipeline import traces

from adapter.pipeline import train as training
from adapter.pipeline.collect import collect
from adapter.pipeline.criteria import CRITERIA
from adapter.selection import artifact
from adapter.selection.predictors import NEURON_INPUTS


def train_one(kind: str, criterion: str, data: Path, out: Path, runtime, cfg: training.TrainConfig) -> dict:
    """Train one predictor from a dataset version and save it to `out`; returns its metrics."""
    if kind not in artifact.KINDS:
        raise ValueError(f"unknown kind {kind!r}: use one of {', '.join(artifact.KINDS)}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}: use one of {', '.join(CRITERIA)}")
    if kind == "dejavu" and criterion != "l2norm":
        raise ValueError("dejavu predictors learn magnitude targets: use --criterion l2norm")
    if cfg.dejavu_neuron_input not in NEURON_INPUTS:
        raise ValueError(f"unknown dejavu neuron input {cfg.dejavu_neuron_input!r}: use {' or '.join(NEURON_INPUTS)}")
    if kind != "dejavu" and cfg.dejavu_neuron_input != "layer_input":
        raise ValueError(f"the neuron input {cfg.dejavu_neuron_input!r} applies to dejavu predictors only")
    train, val = traces.load_split(data, "train"), traces.load_split(data, "validation")
    fingerprint = traces.model_fingerprint(runtime.model)
    if train.manifest["model_fingerprint"] != fingerprint:
        raise artifact.PredictorMismatch(
            f"traces in {data} were collected on model {train.manifest['model_fingerprint']}, "
            f"not on the loaded model {fingerprint}")
    shape = runtime.shape
    if kind == "shadowllm":
        module, metrics = training.train_shadowllm(train, val, shape, criterion, cfg)
    elif kind == "dejavu":
        module, metrics = training.train_dejavu(train, val, shape, cfg)
    else:
        module = training.static_scores(train, criterion)
        metrics = training.static_metrics(val, criterion, module)
    artifact.save_predictor(out, kind, criterion, module, shape, fingerprint, metrics, train, cfg)
    return metrics


def build_all(runtime, tokenizer, data_root: Path, out_dir: Path, per_family: dict[str, int],
              cfg: training.TrainConfig) -> dict:
    folder = collect(runtime.model, tokenizer, data_root, per_family)
    report = {"dataset": str(folder), "predictors": {}}
    jobs = [("shadowllm", c) for c in CRITERIA] + [("dejavu", "l2norm"), ("static", "plainact")]
    for kind, criterion in jobs:
        name = f"{kind}-{criterion}"
        report["predictors"][name] = train_one(kind, criterion, folder, out_dir / name, runtime, cfg)
    return report
