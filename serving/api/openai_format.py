"""OpenAI completions formatting of a served request: the `logprobs` object (tokens as
strings, their log-probabilities, top-k alternatives keyed by token string, text offsets)
and the echoed prompt text. The engine hands out token ids and numbers only
(serving/replica/engine.py TokenScores); strings are made here, once per request.
"""

from __future__ import annotations

from serving.replica.engine import GenResult, TokenScores


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each id's own text (special tokens included, as OpenAI's `tokens` lists them)."""
    return [tokenizer.decode([i]) for i in ids]


def logprobs_object(tokenizer, scores: TokenScores) -> dict:
    """{"tokens", "token_logprobs", "top_logprobs", "text_offset"}. top_logprobs dicts are
    keyed by token string; two ids with the same text keep the higher log-probability.
    text_offset counts each token's text plus one separator (the word-level tokenizers'
    join), starting at 0."""
    names = token_strings(tokenizer, scores.token_ids)
    cache: dict[int, str] = dict(zip(scores.token_ids, names))

    def name(i: int) -> str:
        if i not in cache:
            cache[i] = tokenizer.decode([i])
        return cache[i]

    top = []
    for entry in scores.top:
        if entry is None:
            top.append(None)
            continue
        ids, vals = entry
        alt: dict[str, float] = {}
        for i, v in zip(ids, vals):
            alt.setdefault(name(i), v)
        top.append(alt)
    offsets, pos = [], 0
    for s in names:
        offsets.append(pos)
        pos += len(s) + 1
    return {"tokens": names, "token_logprobs": list(scores.logprobs), "top_logprobs": top,
            "text_offset": offsets}


def echo_text(tokenizer, prompt_ids: list[int], token_ids: list[int]) -> str:
    """The prompt's text as it joins the completion (the separator included)."""
    full = tokenizer.decode(prompt_ids + token_ids, skip_special_tokens=True)
    tail = tokenizer.decode(token_ids, skip_special_tokens=True)
    if tail and full.endswith(tail):
        return full[:len(full) - len(tail)]
    return tokenizer.decode(prompt_ids, skip_special_tokens=True)


def format_result(tokenizer, res: GenResult, echo: bool) -> GenResult:
    """Fill the OpenAI fields of a finished result in place; the raw scores are dropped (they
    need not travel to the gateway)."""
    if res.scores is not None:
        res.logprobs = logprobs_object(tokenizer, res.scores)
        res.scores = None
    if echo:
        res.prompt_text = echo_text(tokenizer, res.prompt_ids, res.token_ids)
    return res
