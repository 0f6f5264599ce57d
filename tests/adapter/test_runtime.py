"""The gated runtime against the dense reference (transformers' own forward and generate)."""

import pytest
import torch

from adapter.runtime import masks

from adapter.selection import predictors as P
from adapter.runtime.model_view import ModelView
from adapter.config import RuntimeConfig
from adapter.runtime.gated import GatedModel, RequestError
from adapter.runtime.gather import SPARE_BLOCKS
from tests.support import tiny_llama, tiny_opt

ATOL = 1e-4


def prompt(n=21, seed=3, vocab=97):
    return torch.randint(4, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def random_mask(shape, sparsity, seed=0):
    return P.random_static(shape, sparsity, seed).mask


def masked_dense_logits(model, ids, mask):
    """Reference: the dense transformers forward with skipped heads' outputs and skipped
    neurons' activations zeroed in layers >= 1 (what gathering must equal)."""
    view = ModelView(model)
    shape, hooks = view.shape, []
    if view.family == "llama":
        layers = [(l.self_attn.o_proj, l.mlp.down_proj) for l in model.model.layers]
    else:
        layers = [(l.self_attn.out_proj, l.fc2) for l in model.model.decoder.layers]
    for idx, (o_proj, down) in enumerate(layers):
        if idx == 0:
            continue
        lm = mask.layers[idx]
        head_keep = torch.zeros(shape.heads)
        head_keep[lm.heads] = 1
        col_keep = head_keep.repeat_interleave(shape.head_dim)
        neuron_keep = torch.zeros(shape.ffn)
        neuron_keep[lm.neurons] = 1
        hooks.append(o_proj.register_forward_pre_hook(lambda m, a, k=col_keep: (a[0] * k,)))
        hooks.append(down.register_forward_pre_hook(lambda m, a, k=neuron_keep: (a[0] * k,)))
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0]
    finally:
        for h in hooks:
            h.remove()


def test_sparsity_zero_equals_dense_logits_and_generate(tiny_model):
    gm = GatedModel(tiny_model)
    ids = prompt()
    with torch.no_grad():
        ref = tiny_model(torch.tensor([ids])).logits[0]
    _, logits = gm.prefill(ids, P.Dense(), 0, all_logits=True)
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
    # shadowllm at sparsity 0 takes the dense path too
    pred = P.random_unified(gm.shape, 32)
    _, logits0 = gm.prefill(ids, P.ShadowLLM(pred, 0.0), 0, all_logits=True)
    torch.testing.assert_close(logits0, ref, atol=ATOL, rtol=0)
    want = tiny_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                               pad_token_id=0)[0, len(ids):].tolist()
    assert gm.generate([ids], P.Dense(), 12)[0].token_ids == want
    assert gm.generate([ids], P.ShadowLLM(pred, 0.0), 12)[0].token_ids == want


def test_dejavu_keeping_everything_equals_dense(tiny_model):
    """The per-token path (row gathers, embedding_bag o/down projections) at density 1.0."""
    gm = GatedModel(tiny_model)
    ids = prompt()
    method = P.DejaVu(P.random_dejavu(gm.shape, 8), 0.0)
    dense = gm.score(ids[:12], ids[12:], P.Dense())
    torch.testing.assert_close(gm.score(ids[:12], ids[12:], method), dense, atol=ATOL, rtol=0)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_gathered_equals_masked_dense(tiny_model, sparsity):
    gm = GatedModel(tiny_model)
    ids = prompt()
    mask = random_mask(gm.shape, sparsity, seed=int(sparsity * 10))
    _, logits = gm.prefill(ids, P.Static(mask, sparsity), 0, all_logits=True)
    torch.testing.assert_close(logits, masked_dense_logits(tiny_model, ids, mask), atol=ATOL, rtol=0)
    # and decode steps after the prompt agree with the masked dense model on the longer input
    st, _ = gm.prefill(ids[:15], P.Static(mask, sparsity), 6)
    for pos in range(15, 21):
        step = gm.decode([st], torch.tensor([ids[pos]]))[0]
    ref = masked_dense_logits(tiny_model, ids, mask)[-1]
    torch.testing.assert_close(step, ref, atol=ATOL, rtol=0)


def test_uneven_gqa_mask_gathers_correctly():
    """Layer 1 keeps heads 0,1,2,5 of groups (0,0,1,2): uneven, q2g path, 3 cached groups."""
    model = tiny_llama(kv_heads=4)
    gm = GatedModel(model)
    heads = [[0, 1, 2, 5], [7, 6, 3, 2]]
    neurons = [list(range(0, 96, 3)), list(range(40))]
    mask = masks.from_indices(gm.shape, heads, neurons)
    ids = prompt()
    st, logits = gm.prefill(ids, P.Static(mask, 0.5), 0, all_logits=True)
    torch.testing.assert_close(logits, masked_dense_logits(model, ids, mask), atol=ATOL, rtol=0)
    assert [k.shape[0] for k in st.k] == [4, 3, 2]  # only kept groups are cached
    # query heads 0,1,2,5 read cached groups 0,0,1,2 (the kept groups 0,1,2 in cache order):
    # padded to 2 query heads per group, group 1's spare slot repeats its head (kept head 2)
    slots = st.weights[1].attn.q2g
    assert slots.per_group == 2 and slots.pad.tolist() == [0, 1, 2, 2, 3, 3]
    assert slots.real.tolist() == [0, 1, 2, 4]
    # decode steps on the padded layout equal the masked dense model too
    st, _ = gm.prefill(ids[:6], P.Static(mask, 0.5), len(ids) - 6)
    for pos in range(6, len(ids)):
        step = gm.decode([st], torch.tensor([ids[pos]]))[0]
    torch.testing.assert_close(step, masked_dense_logits(model, ids, mask)[-1], atol=ATOL, rtol=0)


def test_skipped_heads_are_not_computed_or_cached():
    gm = GatedModel(tiny_llama(kv_heads=8))
    mask = random_mask(gm.shape, 0.5)
    st, _ = gm.prefill(prompt(), P.Static(mask, 0.5), 4)
    for layer in range(1, gm.shape.layers):
        kept = mask.layers[layer].heads.numel()
        assert st.k[layer].shape[0] == kept
        w = st.weights[layer]
        assert w.attn.qkv[0][0].shape[0] == 3 * kept * gm.shape.head_dim
        assert w.attn.wo.shape[1] == kept * gm.shape.head_dim
        assert w.ffn.w_down.shape[1] == mask.layers[layer].neurons.numel()
    assert st.k[0].shape[0] == 8  # layer 0 is dense


def test_mixed_mask_batch_equals_single_runs(tiny_model):
    gm = GatedModel(tiny_model)
    shape = gm.shape
    methods = [P.Dense(), P.ShadowLLM(P.random_unified(shape, 32), 0.5),
               P.ShadowLLM(P.random_unified(shape, 32, seed=1), 0.7), P.random_static(shape, 0.3),
               P.random_static(shape, 0.3), P.DejaVu(P.random_dejavu(shape, 8), 0.5)]
    prompts = [prompt(n=10 + 3 * i, seed=i) for i in range(len(methods))]
    batch = gm.generate(prompts, methods, 10)
    for p, m, got in zip(prompts, methods, batch):
        alone = gm.generate([p], m, 10)[0]
        assert got.token_ids == alone.token_ids
        assert got.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    # the logits of one batched step match each sequence's single step
    states = [gm.prefill(p, m, 2)[0] for p, m in zip(prompts, methods)]
    toks = torch.tensor([p[-1] for p in prompts])
    batched = gm.decode(states, toks)
    for i, (p, m) in enumerate(zip(prompts, methods)):
        st, _ = gm.prefill(p, m, 2)
        torch.testing.assert_close(batched[i], gm.decode([st], toks[i:i + 1])[0], atol=ATOL, rtol=0)


def test_score_equals_prefill_then_decode():
    gm = GatedModel(tiny_llama())
    method = P.ShadowLLM(P.random_unified(gm.shape, 32), 0.5)
    ids = prompt()
    scored = gm.score(ids[:14], ids[14:], method)
    st, logits = gm.prefill(ids[:14], method, 7)
    rows = [logits[0]] + [gm.decode([st], torch.tensor([t]))[0] for t in ids[14:-1]]
    torch.testing.assert_close(scored, torch.stack(rows), atol=ATOL, rtol=0)


def test_effective_sparsity_counts_kept_groups():
    gm = GatedModel(tiny_llama(kv_heads=2))
    shape = gm.shape  # D=64, H=8, G=2, Dh=8, F=96, L=3
    heads = [[0, 1, 2, 3], [0, 4, 5, 6]]  # layer 1 keeps one group, layer 2 both
    neurons = [list(range(48)), list(range(48))]
    mask = masks.from_indices(shape, heads, neurons)
    per_head = per_group = 2 * 64 * 8
    dense = 2 * (8 * per_head + 2 * per_group + 96 * 3 * 64)
    kept = (4 * per_head + 1 * per_group + 48 * 192) + (4 * per_head + 2 * per_group + 48 * 192)
    assert masks.effective_sparsity(shape, mask) == pytest.approx(1 - kept / dense)


def test_global_mode_keeps_floor_per_layer():
    gm = GatedModel(tiny_llama())
    shape = gm.shape
    heads = torch.tensor([[9.0] * 8, [0.0] * 8])
    neurons = torch.cat([torch.full((1, 96), 5.0), torch.zeros(1, 96)])
    mask = masks.select(shape, heads, neurons, 0.5, mode="global", neuron_floor=0.1)
    assert mask.layers[1].heads.numel() == 7 and mask.layers[2].heads.numel() == 1
    assert mask.layers[1].neurons.numel() == 96 - 10 + 0 or mask.layers[2].neurons.numel() == 10
    total = sum(mask.layers[l].neurons.numel() for l in (1, 2))
    assert total == 96 and mask.layers[2].neurons.numel() == 10


def test_gather_cache_stays_within_budget():
    model = tiny_llama()
    gm = GatedModel(model, RuntimeConfig(gather_cache_mb=0))
    for seed in range(5):
        gm.prefill(prompt(), P.Static(random_mask(gm.shape, 0.5, seed), 0.5), 0)
    assert gm.cache.bytes == 0 and gm.cache.stats()["entries"] == 0
    big = GatedModel(model, RuntimeConfig(gather_cache_mb=64))
    mask = random_mask(big.shape, 0.5)
    big.prefill(prompt(), P.Static(mask, 0.5), 0)
    big.prefill(prompt(seed=9), P.Static(mask, 0.5), 0)
    assert big.cache.stats()["hits"] == 1 and big.cache.stats()["misses"] == 1


def test_an_evicted_copy_s_memory_is_reused_only_once_nothing_reads_it():
    """A copy evicted from the cache leaves its memory for the next copy, which is made into
    it only when no sequence holds the evicted weights: a sequence still decoding on them
    keeps its weights and its outputs."""
    gm = GatedModel(tiny_llama(), RuntimeConfig(gather_cache_mb=0, gather_recycle=True))
    ref = GatedModel(gm.model)
    methods = [P.Static(random_mask(gm.shape, 0.5, seed), 0.5) for seed in range(4)]
    ids = prompt()
    held, _ = gm.prefill(ids, methods[0], 4)  # decodes on copy 0, evicted at once (budget 0)
    before = [w.ffn.w_down.clone() for w in held.own]
    # the first copy made the spare blocks too (their pages touched)
    assert gm.cache.stats()["recycled"] == 0 and gm.cache.stats()["spare_bytes"] > 0
    block0 = held.own[1].ffn.w_down.untyped_storage().data_ptr()
    one, _ = gm.prefill(ids, methods[1], 4)  # copy 1: into a spare block, not copy 0's (held)
    assert gm.cache.stats()["recycled"] == 1
    assert one.own[1].ffn.w_down.untyped_storage().data_ptr() != block0
    del one
    gm.prefill(ids, methods[2], 0)  # copy 2 may reuse copy 1's memory (no one holds it)
    assert gm.cache.stats()["recycled"] == 2
    assert all(torch.equal(a, w.ffn.w_down) for a, w in zip(before, held.own))
    solo, _ = ref.prefill(ids, methods[0], 4)
    tok = torch.tensor([ids[-1]])
    torch.testing.assert_close(gm.decode([held], tok), ref.decode([solo], tok), atol=ATOL, rtol=0)
    # copies made into reused memory equal fresh ones
    _, got = gm.prefill(ids, methods[3], 0, all_logits=True)
    _, want = ref.prefill(ids, methods[3], 0, all_logits=True)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert gm.cache.stats()["recycled"] == 3 and gm.cache.stats()["faults"] >= 0
    off = GatedModel(gm.model, RuntimeConfig(gather_cache_mb=0, gather_recycle=False))  # no memory kept
    for m in methods:
        off.prefill(ids, m, 0)
    assert off.cache.stats()["recycled"] == 0 and off.cache.stats()["spare_bytes"] == 0


def test_spare_blocks_are_made_with_the_first_copy_and_grow_for_a_larger_mask():
    """The first copy makes every spare block at once (pages touched then, in the replica's
    warm-up, not in a later round under load); a mask larger than the blocks (a lower
    sparsity) replaces a free block with a larger one, so the block count stays bounded and
    the next such mask is made into kept memory again."""
    gm = GatedModel(tiny_llama(), RuntimeConfig(gather_cache_mb=0, gather_recycle=True))
    ref = GatedModel(gm.model, RuntimeConfig(gather_recycle=False))
    ids = prompt()
    gm.prefill(ids, P.Static(random_mask(gm.shape, 0.7, 0), 0.7), 0)
    small = gm.cache.stats()["spare_bytes"]
    assert len(gm.cache._spare) == SPARE_BLOCKS  # without the reserve, the one copy's block alone
    big = [P.Static(random_mask(gm.shape, 0.2, seed), 0.2) for seed in (1, 2, 3)]
    for m in big[:2]:
        gm.prefill(ids, m, 0)
    assert gm.cache._blocks <= SPARE_BLOCKS + 1 and gm.cache.stats()["spare_bytes"] > small
    recycled = gm.cache.stats()["recycled"]
    _, got = gm.prefill(ids, big[2], 0, all_logits=True)
    assert gm.cache.stats()["recycled"] == recycled + 1
    torch.testing.assert_close(got, ref.prefill(ids, big[2], 0, all_logits=True)[1], atol=ATOL, rtol=0)


def test_union_copies_go_into_blocks_of_their_own_reused_once_their_plan_is_gone():
    """With recycling, a decode plan's union copies are carved from union blocks of their
    own (fresh pages cost 250 ms per plan on the 309 M checkpoint): a live plan's block is
    never written by another plan or by a mask copy, mask copies still reuse their spare
    blocks meanwhile, and the batch's outputs stay those of each row alone."""
    gm = GatedModel(tiny_llama(), RuntimeConfig(gather_cache_mb=0))
    ref = GatedModel(gm.model, RuntimeConfig(gather_recycle=False))
    methods = [P.Static(random_mask(gm.shape, 0.5, seed), 0.5) for seed in range(8)]
    rows = [gm.prefill(prompt(), m, 8, gather=False)[0] for m in methods[:3]]
    solo = [ref.prefill(prompt(), m, 8)[0] for m in methods[:3]]
    first = gm.batch_plan(rows[:2], force="union")
    union = [lp.ffn.weights.w_down.clone() for lp in first.layers[1:]]
    second = gm.batch_plan(rows[1:], force="union")  # the first is live: the second block
    assert len(gm.cache._union) == 2 and gm.cache.stats()["plan_recycled"] == 0
    misses = gm.cache.stats()["misses"]
    for m in methods[3:6]:  # mask copies meanwhile reuse their own spare blocks
        gm.prefill(prompt(), m, 0)
    assert gm.cache.stats()["misses"] == misses + 3 and gm.cache.stats()["recycled"] >= 1
    assert all(torch.equal(a, lp.ffn.weights.w_down) for a, lp in zip(union, first.layers[1:]))
    toks = torch.tensor([3, 4])
    want = torch.cat([ref.decode([st], toks[i:i + 1]) for i, st in enumerate(solo[:2])])
    torch.testing.assert_close(gm.decode(rows[:2], toks, plan=first), want, atol=ATOL, rtol=0)
    del first, second
    gm.plans.clear()  # both plans gone: the next plan reuses a block
    gm.batch_plan([rows[0], rows[2]], force="union")
    assert gm.cache.stats()["plan_recycled"] == 1 and len(gm.cache._union) == 2


def test_bad_requests_get_clear_errors():
    gm = GatedModel(tiny_opt())
    with pytest.raises(RequestError, match="empty"):
        gm.prefill([], P.Dense())
    with pytest.raises(RequestError, match="token ids"):
        gm.prefill([1, 500], P.Dense())
    with pytest.raises(RequestError, match="context"):
        gm.prefill(list(range(4, 90)), P.Dense(), max_new_tokens=100)
    with pytest.raises(ValueError, match="sparsity"):
        masks.select(gm.shape, torch.zeros(2, 4), torch.zeros(2, 96), 1.0)


def test_seeded_sampling_is_reproducible():
    gm = GatedModel(tiny_llama())
    from adapter.runtime.gated import SamplingParams

    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    a = gm.generate([prompt()], P.Dense(), 8, sp)[0].token_ids
    b = gm.generate([prompt()], P.Dense(), 8, sp)[0].token_ids
    assert a == b


def test_dejavu_sparse_prompt_equals_token_by_token_decode():
    gm = GatedModel(tiny_llama())
    method = P.DejaVu(P.random_dejavu(gm.shape, 8), 0.5)
    ids = prompt()
    st, last = gm.prefill(ids, method, 0)
    st1, _ = gm.prefill(ids[:1], method, len(ids))
    for tok in ids[1:]:
        step = gm.decode([st1], torch.tensor([tok]))
    torch.testing.assert_close(last, step, atol=ATOL, rtol=0)
    dense = P.DejaVu(method.predictors, 0.5, sparse_prompt=False)
    assert not torch.allclose(gm.prefill(ids, dense, 0)[1], last, atol=1e-3)
