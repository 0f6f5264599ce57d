"""The oracle: the ceiling of a predictor of a criterion.

A shadowllm predictor guesses, from layer 0's attention output, the importance a criterion
would give every unit of the prompt. The oracle does not guess: it computes that importance
for each test prompt itself (the same target policy and code path as the collector,
adapter.pipeline.collect / targets, with the label's answer known) and keeps the top units
of it. Its accuracy is what a perfect predictor of that criterion would reach.

scale: how units of different layers compare in the global mode.
  layer  each layer min-max normalised to [0, 1], as the predictor's training targets are
         (what a perfect predictor outputs)
  raw    the criterion's own values: for plainact, the first-order loss change of dropping
         the unit, comparable across layers
The per-layer mode keeps the same ranking under either scale.

scorer: "runtime" scores through the gated runtime (real sparse execution, one prompt at a
time); "masked" scores batched with the plain model and the skipped units zeroed, which
gives the same logits (a gathered layer equals the masked dense layer) several times faster
on a CPU. tests/adapter/test_oracle.py holds the two equal.

Shapes: N prompts, L layers, H heads, F neurons, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from adapter.embedded import suite as tasks
from adapter.evaluation import scoring
from adapter.pipeline import criteria as unit_criteria
from adapter.pipeline import targets
from adapter.pipeline.collect import suite_specs
from adapter.pipeline.criteria import CRITERIA
from adapter.pipeline.targets import TargetPolicy
from adapter.pipeline.train import normalise
from adapter.runtime import masks
from adapter.selection import methods

SCALES = ("layer", "raw")
SCORERS = ("masked", "runtime")


@dataclass(frozen=True)
class Truth:
    """One prompt's own importance under every criterion, and the predictor's input."""

    predictor_input: torch.Tensor  # (D,)
    heads: dict[str, torch.Tensor]  # criterion -> (L, H), raw
    neurons: dict[str, torch.Tensor]  # criterion -> (L, F), raw


Truths = dict[tuple[int, ...], Truth]  # keyed by the prompt's token ids as scoring encodes them


def truths(model, tokenizer, shape, instances: Sequence[tasks.Instance], policy: TargetPolicy | None = None,
           batch_size: int = 32) -> Truths:
    """Every criterion's importance of every unit of each prompt, under `policy` (the
    collector's default when None)."""
    policy = policy or TargetPolicy()
    model = model.eval().requires_grad_(False)
    out: Truths = {}
    for start in tqdm(range(0, len(instances), batch_size), desc="oracle targets", unit="batch"):
        chunk = instances[start:start + batch_size]
        specs = suite_specs(model, tokenizer, chunk, False, policy)
        records = targets.score(model, tokenizer, shape, specs, policy, [{}] * len(specs), {}, batch_size)
        for spec, rec in zip(specs, records):
            t = rec.tensors
            out[tuple(spec.prompt_ids)] = Truth(t["predictor_input"], {c: t[f"heads.{c}"] for c in CRITERIA},
                                                {c: t[f"neurons.{c}"] for c in CRITERIA})
    return out


def oracle_mask(shape, heads: torch.Tensor, neurons: torch.Tensor, sparsity: float, mode: str,
                scale: str = "layer", head_selection: str = "heads") -> masks.Mask:
    """The mask of one prompt from its own importance (L, H) / (L, F): layers 1..L-1
    compete, layer 0 stays dense."""
    if scale not in SCALES:
        raise ValueError(f"unknown oracle scale {scale!r}: use {' or '.join(SCALES)}")
    h, n = heads[1:].float(), neurons[1:].float()
    if scale == "layer":
        h, n = normalise(h), normalise(n)
    return masks.select(shape, h, n, sparsity, mode, heads_by=head_selection)


def masked_score_fn(model, shape, mask_of: Callable[[list[int]], masks.Mask]) -> scoring.ScoreFn:
    """Score with the plain model, batched, each example with only its mask's units: a skipped
    head's output (its slice of the o_proj input) and a skipped neuron's activation (the
    down_proj input) are zeroed. mask_of(prompt_ids) -> Mask."""
    _, o_projs, downs, _ = unit_criteria._modules(model)

    @torch.no_grad()
    def score(pairs):
        b = len(pairs)
        head_keep = torch.zeros(b, shape.layers, shape.heads)
        neuron_keep = torch.zeros(b, shape.layers, shape.ffn)
        for j, (prompt, _) in enumerate(pairs):
            for i, lm in enumerate(mask_of(prompt).layers):
                head_keep[j, i, lm.heads] = 1
                neuron_keep[j, i, lm.neurons] = 1
        head_keep = head_keep.repeat_interleave(shape.head_dim, -1)  # (B, L, H*Dh)

        def scaled(keep):  # keep (B, U): the hook scales the module's input (B, T, U)
            return lambda module, args: (args[0] * keep[:, None].to(args[0].dtype),)

        handles = [o.register_forward_pre_hook(scaled(head_keep[:, i])) for i, o in enumerate(o_projs)]
        handles += [d.register_forward_pre_hook(scaled(neuron_keep[:, i])) for i, d in enumerate(downs)]
        try:
            return scoring.hf_score_fn(model)(pairs)
        finally:
            for h in handles:
                h.remove()

    return score


def mask_score_fn(runtime, mask_of: Callable[[list[int]], masks.Mask], scorer: str = "masked") -> scoring.ScoreFn:
    """A ScoreFn that runs each prompt under mask_of(prompt), by `scorer`."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}: use {' or '.join(SCORERS)}")
    if scorer == "masked":
        return masked_score_fn(runtime.model, runtime.shape, mask_of)

    def score(pairs):
        return [runtime.score(p, c, methods.make_method("static", 0.0, runtime.shape, mask_of(p)))
                for p, c in pairs]

    return score


def run_oracle(runtime, tokenizer, per_family: int = 100, sparsities=(0.5, 0.7),
               modes=("per_layer", "global"), criteria=("plainact",), scales=("layer",),
               policy: TargetPolicy | None = None, scorer: str = "masked") -> dict:
    """Accuracy of the oracle masks on `per_family` test prompts per family, with dense
    beside it; rows as `shadowgate eval`'s (method "oracle", plus scale)."""
    instances = tasks.split("test", per_family)
    truth = truths(runtime.model, tokenizer, runtime.shape, instances, policy)
    dense = scoring.accuracy(mask_score_fn(runtime, lambda p: masks.full_mask(runtime.shape), scorer),
                             tokenizer, instances)
    configs = [(c, m, s, sc) for c in criteria for m in modes for s in sparsities
               for sc in (scales if m == "global" else ("layer",))]
    rows = []
    for criterion, mode, s, scale in tqdm(configs, desc="oracle eval", unit="config"):
        def mask_of(prompt, criterion=criterion, mode=mode, s=s, scale=scale):
            t = truth[tuple(prompt)]
            return oracle_mask(runtime.shape, t.heads[criterion], t.neurons[criterion], s, mode, scale,
                               runtime.config.head_selection)

        acc = scoring.accuracy(mask_score_fn(runtime, mask_of, scorer), tokenizer, instances)
        rows.append({"method": "oracle", "criterion": criterion, "mode": mode, "scale": scale, "sparsity": s,
                     "accuracy": round(acc["mean"], 4),
                     "families": {f: round(v, 4) for f, v in acc["families"].items()}})
    return {"n_test": len(instances), "policy": (policy or TargetPolicy()).model_dump(), "scorer": scorer,
            "head_selection": runtime.config.head_selection,
            "dense": {"accuracy": round(dense["mean"], 4),
                      "families": {f: round(v, 4) for f, v in dense["families"].items()}},
            "results": rows}
