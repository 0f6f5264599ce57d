"""Trace collection over the task suite (`shadowgate predictor collect`)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from adapter.embedded import suite as tasks
from adapter.pipeline import criteria, targets, traces
from adapter.pipeline.targets import TargetPolicy
from adapter.runtime.model_view import ModelView


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


SUITE_STOPS = (";",)  # a suite shot ends with " ;": what an evaluation client sends as its stop


def suite_specs(model, tokenizer, instances, pseudo_labels: bool, policy: TargetPolicy,
                stops=SUITE_STOPS) -> list[targets.Spec]:
    """The target specs of suite instances under `policy`, as the shadow path makes them of
    the same prompts served: the continuation is the label (the answer, then the stop string
    a shot ends with) or, with pseudo_labels, the dense model's greedy continuation of
    policy.max_tokens tokens; either cut by the policy."""
    prompts = [tokenizer.encode(f"<bos> {inst.prompt}", add_special_tokens=False) for inst in instances]
    if pseudo_labels:
        conts = criteria.pseudo_continuations(model, prompts, policy.max_tokens, tokenizer.eos_token_id)
    else:
        end = tokenizer.encode(f" {stops[0]}", add_special_tokens=False) if stops else []
        conts = [tokenizer.encode(inst.answer, add_special_tokens=False) + end for inst in instances]
    return [targets.make_spec(model, tokenizer, p, c, stops, policy) for p, c in zip(prompts, conts)]


def collect(model, tokenizer, out_root: Path, per_family: dict[str, int], batch_size: int = 32,
            pseudo_labels: bool = False, families: list[str] | None = None,
            continuations: int | None = None, temperature: float | None = None,
            policy: TargetPolicy | None = None) -> Path:
    """Write a new dataset version under out_root; returns its folder. `families` limits the
    suite to some of its families (a predictor that has not seen the others).

    The targets follow `policy` (adapter.pipeline.targets; the default policy when None),
    the same one the shadow path applies to served traffic. continuations / temperature,
    when given, override the policy's: continuations > 1 averages the importance targets
    over that many answers (the label, or the pseudo-label, and continuations-1 samples of
    the dense model at `temperature`, seeded by the prompt): one answer of a confident model
    gives tiny, noisy gradients, and an average over plausible answers is a steadier target."""
    policy = policy or TargetPolicy()
    override = {k: v for k, v in (("continuations", continuations), ("temperature", temperature)) if v is not None}
    if override.get("continuations", 1) < 1:
        raise ValueError(f"continuations must be >= 1, got {continuations}")
    if override.get("temperature", 1.0) <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    policy = policy.model_copy(update=override)
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
            specs = suite_specs(model, tokenizer, chunk, pseudo_labels, policy)
            metas = [{"family": inst.family, "prompt_len": len(s.prompt_ids)} for inst, s in zip(chunk, specs)]
            common = {"model_fingerprint": fingerprint, "source": "suite",
                      "targets": "pseudo_labels" if pseudo_labels else "labels"}
            records += targets.score(model, tokenizer, shape, specs, policy, metas, common, batch_size,
                                     ffn_capture=lambda: ffn_input_capture(view))
        counts[split] = traces.write_split(folder, split, records)
    traces.write_manifest(folder, version, fingerprint, shape.as_dict(), list(criteria.CRITERIA), counts,
                          {"pseudo_labels": pseudo_labels, "per_family": per_family, "families": families,
                           "policy": policy.model_dump(), "continuations": policy.continuations,
                           "temperature": policy.temperature, "token_fields": list(traces.TOKEN_FIELDS)})
    return folder
