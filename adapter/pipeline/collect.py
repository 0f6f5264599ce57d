"""Trace collection over the task suite (`shadowgate predictor collect`)."""

from __future__ import annotations

from contextlib import contextmanager
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


@contextmanager
def ffn_input_capture(view: ModelView):
    """Within the block, `captured[i]` is the hidden state entering layer i's FFN block in
    the model's last forward, (B, T, D): the residual stream after the attention block,
    exactly what the gated runtime hands its FFN block. For a pre-norm layer that is the FFN
    norm's input; for a post-norm one (OPT-350m style) the attention norm's output."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for i, ref in enumerate(view.layers):
        if ref.pre_norm:
            handles.append(ref.ffn_norm.register_forward_pre_hook(
                lambda m, args, i=i: captured.__setitem__(i, args[0].detach())))
        else:
            handles.append(ref.attn_norm.register_forward_hook(
                lambda m, args, out, i=i: captured.__setitem__(i, out.detach())))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def _per_token(captured: dict[int, torch.Tensor], batch: criteria.Batch,
               positions: list[torch.Tensor]) -> list[torch.Tensor]:
    """Captured (B, T, D) per layer (OPT flattens to (B*T, D)) -> per example (P_b, L, D)."""
    b, t = batch.ids.shape
    stacked = torch.stack([captured[i].reshape(b, t, -1) for i in range(len(captured))], 2).float()
    return [stacked[j, pos] for j, pos in enumerate(positions)]


def _averaged_scores(model, view, tokenizer, prompts, conts, extra, continuations: int,
                     temperature: float, generator: torch.Generator) -> tuple[criteria.Scores, list[torch.Tensor]]:
    """Criteria of a batch, with the head and neuron importance averaged over `continuations`
    query answers: the given one plus continuations-1 sampled from the dense model at
    `temperature`. The shots' answers are targets in every pass. Everything else (predictor
    input, loss, the per-token DejaVu fields, the FFN inputs returned beside the scores)
    comes from the first pass, the given answer."""
    pad, shape = tokenizer.pad_token_id or 0, view.shape
    batch = criteria.make_batch(prompts, conts, pad, extra)
    with ffn_input_capture(view) as captured:
        first = criteria.compute(model, batch, shape.heads, shape.head_dim)
    ffn_inputs = _per_token(captured, batch, first.token_positions)
    if continuations == 1:
        return first, ffn_inputs
    heads = {c: v.clone() for c, v in first.heads.items()}
    neurons = {c: v.clone() for c, v in first.neurons.items()}
    for _ in range(continuations - 1):
        sampled = criteria.sampled_continuations(model, prompts, [len(c) for c in conts], temperature, generator)
        s = criteria.compute(model, criteria.make_batch(prompts, sampled, pad, extra), shape.heads, shape.head_dim)
        for c in heads:
            heads[c] += s.heads[c]
            neurons[c] += s.neurons[c]
    first.heads = {c: v / continuations for c, v in heads.items()}
    first.neurons = {c: v / continuations for c, v in neurons.items()}
    return first, ffn_inputs


def collect(model, tokenizer, out_root: Path, per_family: dict[str, int], batch_size: int = 32,
            pseudo_labels: bool = False, families: list[str] | None = None,
            continuations: int = 1, temperature: float = 1.0, seed: int = 0) -> Path:
    """Write a new dataset version under out_root; returns its folder. `families` limits the
    suite to some of its families (a predictor that has not seen the others).

    continuations > 1 averages the importance targets over that many query answers (the
    label, or the pseudo-label, and continuations-1 samples of the dense model at
    `temperature`, seeded by `seed`; each as long as the label): one answer of a confident model gives tiny, noisy
    gradients, and an average over plausible answers is a steadier per-prompt target."""
    if continuations < 1:
        raise ValueError(f"continuations must be >= 1, got {continuations}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if families is not None and (unknown := set(families) - set(tasks.FAMILIES)):
        raise ValueError(f"unknown task families {sorted(unknown)}: use {', '.join(tasks.FAMILIES)}")
    view = ModelView(model)
    shape = view.shape
    model = model.eval().requires_grad_(False)
    fingerprint = traces.model_fingerprint(model)
    folder, version = traces.new_version_dir(out_root)
    counts = {}
    generator = torch.Generator().manual_seed(seed)
    for split, n in per_family.items():
        instances = [i for i in tasks.split(split, n) if families is None or i.family in families]
        records = []
        bar = tqdm(range(0, len(instances), batch_size), desc=f"collect {split}", unit="batch")
        for start in bar:
            chunk = instances[start:start + batch_size]
            prompts, conts, extra = _suite_batch(tokenizer, model, chunk, pseudo_labels)
            scores, ffn_inputs = _averaged_scores(model, view, tokenizer, prompts, conts, extra,
                                                  continuations, temperature, generator)
            metas = [{"family": inst.family, "prompt_len": len(p)} for inst, p in zip(chunk, prompts)]
            common = {"model_fingerprint": fingerprint, "source": "suite",
                      "targets": "pseudo_labels" if pseudo_labels else "labels",
                      "criteria": list(criteria.CRITERIA)}
            records.extend(traces.records_from_scores(scores, common, metas, ffn_inputs))
        counts[split] = traces.write_split(folder, split, records)
    traces.write_manifest(folder, version, fingerprint, shape.as_dict(), list(criteria.CRITERIA), counts,
                          {"pseudo_labels": pseudo_labels, "per_family": per_family, "families": families,
                           "continuations": continuations, "temperature": temperature, "seed": seed,
                           "token_fields": list(traces.TOKEN_FIELDS)})
    return folder
