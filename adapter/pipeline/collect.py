"""Trace collection over the task suite (`shadowgate predictor collect`)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from adapter.pipeline import criteria

from adapter.embedded import suite as tasks

from adapter.pipeline import traces
from adapter.runtime.model_view import ModelView


def _suite_batch(tokenizer, model, instances, pseudo_labels: bool):
    prompts, conts, extra = [], [], []
    for inst in instances:
        prompt = tokenizer.encode(f"<bos> {inst.prompt}", add_special_tokens=False)
        words = inst.prompt.split()
        # the shots' answers are targets too (more signal per prompt); positions map 1:1 to
        # words only for a word-level tokenizer, so they are used only when that holds
        shot = [p + 1 for p in tasks.shot_answer_word_positions(inst.prompt)] if len(prompt) == len(words) + 1 else []
        prompts.append(prompt)
        extra.append(shot)
        conts.append(tokenizer.encode(inst.answer, add_special_tokens=False))
    if pseudo_labels:
        conts = criteria.pseudo_continuations(model, prompts, max(len(c) for c in conts), tokenizer.eos_token_id)
    return prompts, conts, extra


def collect(model, tokenizer, out_root: Path, per_family: dict[str, int], batch_size: int = 32,
            pseudo_labels: bool = False, families: list[str] | None = None) -> Path:
    """Write a new dataset version under out_root; returns its folder. `families` limits the
    suite to some of its families (a predictor that has not seen the others)."""
    if families is not None and (unknown := set(families) - set(tasks.FAMILIES)):
        raise ValueError(f"unknown task families {sorted(unknown)}: use {', '.join(tasks.FAMILIES)}")
    view = ModelView(model)
    shape = view.shape
    model = model.eval().requires_grad_(False)
    fingerprint = traces.model_fingerprint(model)
    folder, version = traces.new_version_dir(out_root)
    counts = {}
    for split, n in per_family.items():
        instances = [i for i in tasks.split(split, n) if families is None or i.family in families]
        records = []
        bar = tqdm(range(0, len(instances), batch_size), desc=f"collect {split}", unit="batch")
        for start in bar:
            chunk = instances[start:start + batch_size]
            prompts, conts, extra = _suite_batch(tokenizer, model, chunk, pseudo_labels)
            batch = criteria.make_batch(prompts, conts, tokenizer.pad_token_id or 0, extra)
            scores = criteria.compute(model, batch, shape.heads, shape.head_dim)
            metas = [{"family": inst.family, "prompt_len": len(p)} for inst, p in zip(chunk, prompts)]
            common = {"model_fingerprint": fingerprint, "source": "suite",
                      "targets": "pseudo_labels" if pseudo_labels else "labels",
                      "criteria": list(criteria.CRITERIA)}
            records.extend(traces.records_from_scores(scores, common, metas))
        counts[split] = traces.write_split(folder, split, records)
    traces.write_manifest(folder, version, fingerprint, shape.as_dict(), list(criteria.CRITERIA), counts,
                          {"pseudo_labels": pseudo_labels, "per_family": per_family, "families": families})
    return folder
