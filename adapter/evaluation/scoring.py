"""Exact-match accuracy and perplexity on the task suite.

Exact match is scored teacher-forced: the greedy answer equals the reference exactly when
the argmax at every answer position (given the reference prefix) is the reference token, so
one forward pass over prompt+answer scores a greedy generation of len(answer) tokens.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Sequence

import torch

from adapter.embedded import suite as tasks

# score_fn(list of (prompt_ids, continuation_ids)) -> list of logits tensors (len(cont), V),
# the logits that predict each continuation token.
ScoreFn = Callable[[Sequence[tuple[list[int], list[int]]]], list[torch.Tensor]]


def encode_pairs(tokenizer, instances: Sequence[tasks.Instance]) -> list[tuple[list[int], list[int]]]:
    pairs = []
    for inst in instances:
        prompt = tokenizer.encode(f"<bos> {inst.prompt}", add_special_tokens=False)
        answer = tokenizer.encode(inst.answer, add_special_tokens=False)
        pairs.append((prompt, answer))
    return pairs


def accuracy(score_fn: ScoreFn, tokenizer, instances: Sequence[tasks.Instance],
             batch_size: int = 64) -> dict:
    """{"mean": mean over families, "families": {family: accuracy}, "n": count}."""
    pairs = encode_pairs(tokenizer, instances)
    hits: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        for (prompt, answer), logits, inst in zip(chunk, score_fn(chunk),
                                                  instances[start:start + batch_size]):
            hits[inst.family].append(bool((logits.argmax(-1) == torch.tensor(answer)).all()))
    families = {f: sum(v) / len(v) for f, v in hits.items()}
    return {"mean": sum(families.values()) / len(families), "families": families,
            "n": len(pairs)}


def perplexity(score_fn: ScoreFn, tokenizer, sentences: Sequence[str]) -> float:
    """Token perplexity of each sentence given "<bos>" (every word is scored)."""
    return pair_perplexity(score_fn, [([tokenizer.bos_token_id], tokenizer.encode(s, add_special_tokens=False))
                                      for s in sentences])


def hf_score_fn(model) -> ScoreFn:
    """Score with the plain transformers model (right padding, one batched forward)."""

    @torch.no_grad()
    def score(pairs):
        seqs = [p + c for p, c in pairs]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        return [logits[i, len(p) - 1: len(p) + len(c) - 1] for i, (p, c) in enumerate(pairs)]

    return score


def dense_accuracy(model_path: str, per_family: int = 100) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    score = hf_score_fn(model)
    acc = accuracy(score, tokenizer, tasks.split("test", per_family))
    acc["perplexity"] = perplexity(score, tokenizer, tasks.heldout_text(400))
    return acc


def runtime_score_fn(runtime, method) -> ScoreFn:
    """Score through the gated runtime: real sparse execution, mask chosen from the prompt."""

    def score(pairs):
        return [runtime.score(p, c, method) for p, c in pairs]

    return score


def text_pairs(tokenizer, sentences: Sequence[str], context_words: int = 3):
    """Perplexity pairs: "<bos> + first words" is the prompt (it selects the mask), the rest
    of the sentence is scored."""
    pairs = []
    for s in sentences:
        words = s.split()
        prompt = tokenizer.encode("<bos> " + " ".join(words[:context_words]), add_special_tokens=False)
        pairs.append((prompt, tokenizer.encode(" ".join(words[context_words:]), add_special_tokens=False)))
    return pairs


def pair_perplexity(score_fn: ScoreFn, pairs) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(pairs), 64):
        chunk = pairs[start:start + 64]
        for (_, cont), logits in zip(chunk, score_fn(chunk)):
            logp = torch.log_softmax(logits.float(), -1)
            nll -= float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())
            count += len(cont)
    return math.exp(nll / count)
