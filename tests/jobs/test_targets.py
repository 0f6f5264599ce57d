"""The target policy: one code path for the offline collector and the shadow path.

Parity: suite prompts served by the engine and recorded by the real shadow path
(serving.replica.shadow.shadow_run), scored by the fine-tune job, give the record collect() writes
for the same prompts under the same policy: the same target spec, the same importance."""

from __future__ import annotations

import pytest
import torch

from adapter.embedded import suite as tasks
from adapter.pipeline import traces
from adapter.pipeline.collect import collect
from adapter.pipeline.targets import Spec, TargetPolicy, cut_continuation, make_spec
from jobs.finetune import dedupe, in_holdout, score_examples
from tests.jobs.conftest import shadow_records

POLICIES = [TargetPolicy(), TargetPolicy(continuation="tokens", max_tokens=4, prompt="all"),
            TargetPolicy(prompt="none", continuations=3, temperature=0.7)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name())
def test_the_shadow_path_writes_what_collect_writes(engine, tmp_path, policy):
    rt, tok = engine.runtime, engine.tokenizer
    folder = collect(rt.model, tok, tmp_path, {"test": 2}, pseudo_labels=True, policy=policy)
    offline = traces.load_split(folder, "test")
    # a client of the 'tokens' policy asks for tokens, not for an answer: no stop string
    stop = (";",) if policy.continuation == "stop" else ()
    shadow = shadow_records(engine, list(tasks.FAMILIES), 2, split="test", policy=policy, stop=stop)
    assert len(shadow) == len(offline) == 12
    row = {Spec.from_meta(m).key(): j for j, m in enumerate(offline.metas)}
    order = [row[Spec.from_meta(r.meta).key()] for r in shadow]  # the same prompts, grouped by family
    for rec, j in zip(shadow, order):
        assert rec.meta["policy"] == offline.metas[j]["policy"] == policy.model_dump()
        assert Spec.from_meta(rec.meta) == Spec.from_meta(offline.metas[j])
    # the fine-tune job scores the shadow specs: the same targets as the collector's
    ex = score_examples(engine.loaded, [Spec.from_meta(r.meta) for r in shadow], [None] * 12, policy, "plainact")
    torch.testing.assert_close(ex.x, offline.tensors["predictor_input"][order].float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ex.heads, offline.heads("plainact")[order].float(), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(ex.neurons, offline.neurons("plainact")[order].float(), rtol=1e-3, atol=1e-6)


def test_stop_policy_targets_the_answer_span(engine):
    """Under the default policy a few-shot answer's targets are the answer and the token that
    ends it: the served continuation up to the request's stop string, whatever the replica
    generated after."""
    rt, tok = engine.runtime, engine.tokenizer
    inst = [i for i in tasks.split("test", 3) if i.family == "reverse"][0]
    answer = tok.encode(inst.answer, add_special_tokens=False)
    semi = tok.encode(";", add_special_tokens=False)
    served = answer + semi + answer
    prompt = tok.encode(f"<bos> {inst.prompt}", add_special_tokens=False)
    assert make_spec(rt.model, tok, prompt, served, [";"], TargetPolicy()).labels == answer + semi
    # no stop string: up to EOS; the 'tokens' policy: the first max_tokens, stop or not
    eos = tok.eos_token_id
    assert cut_continuation(tok, answer + [eos] + answer, [], TargetPolicy()) == answer + [eos]
    assert cut_continuation(tok, served, [";"], TargetPolicy(continuation="tokens", max_tokens=4)) == served[:4]
    assert cut_continuation(tok, served, [";"], TargetPolicy(max_tokens=2)) == answer[:2]
    # a continuation that stops at once: its terminator is the one target
    assert make_spec(rt.model, tok, prompt, semi + answer, [";"], TargetPolicy()).labels == semi
    # prompt targets: none, all positions after the first, or those the dense model predicts
    assert make_spec(rt.model, tok, prompt, served, [";"], TargetPolicy(prompt="none")).positions == []
    every = make_spec(rt.model, tok, prompt, served, [";"], TargetPolicy(prompt="all")).positions
    assert every == list(range(1, len(prompt)))
    some = make_spec(rt.model, tok, prompt, served, [";"], TargetPolicy(prompt="predictable")).positions
    assert 0 < len(some) < len(every) and set(some) <= set(every)


def test_dedupe_keeps_the_newest_sample_of_a_prompt_and_holdout_follows_the_prompt():
    a, b = Spec([2, 5, 6], [7]), Spec([2, 5, 8], [9])
    a2 = Spec([2, 5, 6], [4])  # the same prompt served again, another continuation
    specs, ids = dedupe([a, b, a2], ["1-0", "2-0", "3-0"])
    assert specs == [a2, b] and ids == ["3-0", "2-0"]
    assert in_holdout(a, 0.3) == in_holdout(a2, 0.3)
    share = sum(in_holdout(Spec([2, i, i + 1], [3]), 0.25) for i in range(2000)) / 2000
    assert 0.22 < share < 0.28


def test_the_replay_set_grows_with_what_versions_learnt_and_thins_the_whole_history():
    from jobs.finetune import Examples, grow_replay

    def ex(prompts):
        n = len(prompts)
        return Examples(torch.arange(n, dtype=torch.float32)[:, None], torch.zeros(n, 2, 2), torch.zeros(n, 2, 3),
                        [Spec([2, p], [5]) for p in prompts], [f"{p}-0" for p in prompts])

    parent, learnt = ex(range(0, 60)), ex(range(50, 100))  # 10 prompts seen again
    kept = grow_replay(parent, learnt, keep=1000)
    assert len(kept) == 100 and len({s.key() for s in kept.specs}) == 100
    assert kept.ids[-1] == "99-0" and "55-0" in kept.ids  # a repeated prompt once, the newer sample
    thin = grow_replay(parent, learnt, keep=40)
    firsts = [s.prompt_ids[1] for s in thin.specs]
    assert len(thin) == 40 and min(firsts) < 30 and max(firsts) >= 70  # old drift and new both kept
    assert grow_replay(None, learnt, keep=1000).ids == learnt.ids
