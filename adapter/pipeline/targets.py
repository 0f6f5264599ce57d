"""The target policy: which tokens of one (prompt, continuation) the importance criteria
are computed on. One policy, one code path for the offline collector
(adapter.pipeline.collect) and the shadow path (serving.replica.shadow -> jobs.finetune), so a
predictor fine-tuned on live traffic learns what offline training learns.

A target spec is pure token ids, so a stored sample can be rescored later (another
criterion, another policy) without the replica that served it:

  prompt_ids   the prompt as served
  labels       the continuation targets: the dense model's own tokens (pseudo-labels; in
               production there are no labels), cut by the policy
  positions    prompt positions that are targets too (index t: token t predicted from t-1)

Policy (general for live traffic; nothing here knows the task suite):

  continuation "stop"   the continuation up to the request's first stop string or EOS,
                        the token that ends it included (what the client asked for: for a
                        few-shot prompt, the answer span and its terminator), at most
                        `max_tokens` tokens
               "tokens" the first `max_tokens` continuation tokens, whatever follows
  prompt       "none" | "predictable" (positions the dense model predicts top-1 from what
                        precedes them) | "all" (every position after the first)
  continuations > 1     head and neuron importance averaged over that many continuations:
                        the labels plus continuations-1 sampled from the dense model at
                        `temperature`, seeded by the prompt (the same spec gives the same
                        targets in any batch, in any process)
  equalize              every target token weighs the same in the gradient criteria (its NLL
                        divided by 1 - p): without it a confidently predicted terminator adds
                        nothing, its units look unimportant, and the sparse model does not
                        stop where the dense one does
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from adapter.pipeline import criteria, traces


class TargetPolicy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    continuation: Literal["stop", "tokens"] = Field(
        "stop", description="stop: the continuation up to the request's stop string or EOS; "
                            "tokens: its first max_tokens tokens")
    max_tokens: int = Field(8, ge=1, le=256, description="continuation targets at most")
    prompt: Literal["none", "predictable", "all"] = Field(
        "none", description="prompt positions that are targets too")
    continuations: int = Field(1, ge=1, le=16, description="continuations the importance is averaged over")
    equalize: bool = Field(True, description="every target token weighs the same in the gradient criteria "
                           "(its NLL divided by 1 - p): a confidently predicted token still counts")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the extra continuations")

    def name(self) -> str:
        cont = "stop" if self.continuation == "stop" else f"{self.max_tokens}tok"
        return f"{cont}/{self.prompt}/k{self.continuations}" + ("/eq" if self.equalize else "")


@dataclass(frozen=True)
class Spec:
    """What one example's targets are, in token ids."""

    prompt_ids: list[int]
    labels: list[int]
    positions: list[int] = field(default_factory=list)

    def meta(self) -> dict:
        return {"prompt_ids": list(self.prompt_ids), "label_ids": list(self.labels),
                "target_positions": list(self.positions)}

    @classmethod
    def from_meta(cls, meta: dict) -> "Spec":
        return cls(list(meta["prompt_ids"]), list(meta["label_ids"]), list(meta.get("target_positions") or []))

    def key(self) -> str:
        """The prompt's identity: dedup and the hold-out split hash it."""
        return prompt_key(self.prompt_ids)


def prompt_key(prompt_ids: Sequence[int]) -> str:
    return hashlib.sha1(",".join(map(str, prompt_ids)).encode()).hexdigest()[:16]


def cut_continuation(tokenizer, tokens: Sequence[int], stops: Sequence[str], policy: TargetPolicy) -> list[int]:
    """The continuation targets of `tokens` under the policy."""
    tokens = list(tokens)
    if policy.continuation == "stop":
        eos = tokenizer.eos_token_id
        end = len(tokens)
        for t, tok in enumerate(tokens):
            # the token that ends the continuation (EOS, or the one completing a stop string) is
            # a target too: a sparse model that misses it does not stop where the dense one does
            if tok == eos or (stops and any(s in tokenizer.decode(tokens[: t + 1]) for s in stops)):
                end = t + 1
                break
        tokens = tokens[:end]
    return tokens[: policy.max_tokens]


@torch.no_grad()
def predictable_positions(model, prompt: Sequence[int]) -> list[int]:
    """Prompt positions whose token the dense model predicts (top-1) from what precedes it:
    the ones the model's units demonstrably serve (in a few-shot prompt: the later shots'
    answers and the template)."""
    if len(prompt) < 3:
        return []
    ids = torch.tensor([list(prompt)], device=next(model.parameters()).device)
    pred = model(input_ids=ids).logits[0, :-1].argmax(-1).cpu()
    return [t + 1 for t in range(1, len(prompt) - 1) if int(pred[t]) == int(prompt[t + 1])]


def make_spec(model, tokenizer, prompt_ids: Sequence[int], pseudo_labels: Sequence[int], stops: Sequence[str],
              policy: TargetPolicy) -> Spec:
    """The spec of one served request: `pseudo_labels` are the dense model's tokens at the
    continuation's positions (its greedy continuation, or its argmax teacher-forced on what
    was served)."""
    labels = cut_continuation(tokenizer, pseudo_labels, stops, policy)
    if policy.prompt == "predictable":
        positions = predictable_positions(model, prompt_ids)
    elif policy.prompt == "all":
        positions = list(range(1, len(prompt_ids)))
    else:
        positions = []
    return Spec(list(prompt_ids), labels, positions)


def _seed(spec: Spec) -> int:
    return int(spec.key()[:8], 16)


def _sampled(model, spec: Spec, n: int, temperature: float) -> list[list[int]]:
    gen = torch.Generator().manual_seed(_seed(spec))
    return [criteria.sampled_continuations(model, [spec.prompt_ids], [len(spec.labels)], temperature, gen)[0]
            for _ in range(n)]


def score(model, tokenizer, shape, specs: list[Spec], policy: TargetPolicy, metas: list[dict], common: dict,
          batch_size: int = 32, ffn_capture=None) -> list[traces.TraceRecord]:
    """Trace records (every criterion) of `specs`; each record's meta carries its spec, the
    policy and `metas[i]`. `ffn_capture()`: a context manager yielding the captured FFN
    inputs (the collector's DejaVu field), or None. Records keep the first (given)
    continuation's predictor input, loss and per-token fields; only the head and neuron
    importance is averaged."""
    pad = tokenizer.pad_token_id or 0
    out = []
    common = {**common, "criteria": list(criteria.CRITERIA), "policy": policy.model_dump()}
    for start in range(0, len(specs), batch_size):
        chunk, meta_chunk = specs[start:start + batch_size], metas[start:start + batch_size]
        batch = criteria.make_batch([s.prompt_ids for s in chunk], [s.labels for s in chunk], pad,
                                    [s.positions for s in chunk])
        ffn_inputs = None
        if ffn_capture is not None:
            with ffn_capture() as captured:
                first = criteria.compute(model, batch, shape.heads, shape.head_dim, policy.equalize)
            ffn_inputs = _per_token(captured, batch, first.token_positions)
        else:
            first = criteria.compute(model, batch, shape.heads, shape.head_dim, policy.equalize)
        if policy.continuations > 1:
            extra = [_sampled(model, s, policy.continuations - 1, policy.temperature) for s in chunk]
            heads = {c: v.clone() for c, v in first.heads.items()}
            neurons = {c: v.clone() for c, v in first.neurons.items()}
            for k in range(policy.continuations - 1):
                b = criteria.make_batch([s.prompt_ids for s in chunk], [e[k] for e in extra], pad,
                                        [s.positions for s in chunk])
                s = criteria.compute(model, b, shape.heads, shape.head_dim, policy.equalize)
                for c in heads:
                    heads[c] += s.heads[c]
                    neurons[c] += s.neurons[c]
            first.heads = {c: v / policy.continuations for c, v in heads.items()}
            first.neurons = {c: v / policy.continuations for c, v in neurons.items()}
        full = [{**m, **s.meta()} for s, m in zip(chunk, meta_chunk)]
        out += traces.records_from_scores(first, common, full, ffn_inputs)
    return out


def _per_token(captured: dict[int, torch.Tensor], batch: criteria.Batch,
               positions: list[torch.Tensor]) -> list[torch.Tensor]:
    """Captured (B, T, D) per layer (OPT flattens to (B*T, D)) -> per example (P_b, L, D)."""
    b, t = batch.ids.shape
    stacked = torch.stack([captured[i].reshape(b, t, -1) for i in range(len(captured))], 2).float()
    return [stacked[j, pos] for j, pos in enumerate(positions)]
