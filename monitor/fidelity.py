"""Sparse-vs-dense fidelity of one continuation, from teacher-forced logits.

Both logit tensors predict the same continuation tokens: row t predicts token t of the
continuation from the prompt plus continuation[:t]. Shapes: P continuation positions, V vocab.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Fidelity:
    kl: list[float]  # (P,) KL(dense || sparse) per position, nats
    top1: list[bool]  # (P,) argmax of dense == argmax of sparse
    exact_match: bool  # the dense model's greedy continuation equals the served one
    pseudo_labels: list[int]  # (P,) dense argmax tokens: the labels of the shadow targets

    @property
    def kl_mean(self) -> float:
        return sum(self.kl) / len(self.kl) if self.kl else 0.0

    @property
    def top1_agreement(self) -> float:
        return sum(self.top1) / len(self.top1) if self.top1 else 1.0

    def summary(self) -> dict:
        return {"kl_mean": self.kl_mean, "kl_max": max(self.kl, default=0.0),
                "top1_agreement": self.top1_agreement, "exact_match": self.exact_match,
                "positions": len(self.kl)}

    def as_dict(self) -> dict:
        return {**asdict(self), **self.summary()}


def compare(dense_logits: torch.Tensor, sparse_logits: torch.Tensor, continuation: list[int]) -> Fidelity:
    """dense_logits, sparse_logits (P, V) -> per-position fidelity of `continuation` (P,)."""
    if dense_logits.shape != sparse_logits.shape or dense_logits.shape[0] != len(continuation):
        raise ValueError(f"logit shapes {tuple(dense_logits.shape)} / {tuple(sparse_logits.shape)} "
                         f"do not match a continuation of {len(continuation)} tokens")
    log_d = torch.log_softmax(dense_logits.float(), dim=-1)
    log_s = torch.log_softmax(sparse_logits.float(), dim=-1)
    kl = (log_d.exp() * (log_d - log_s)).sum(-1).clamp_min(0.0)  # (P,)
    arg_d, arg_s = log_d.argmax(-1), log_s.argmax(-1)
    labels = arg_d.tolist()
    return Fidelity(kl=kl.tolist(), top1=(arg_d == arg_s).tolist(),
                    exact_match=labels == list(continuation), pseudo_labels=labels)
