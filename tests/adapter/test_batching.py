"""Decode steps over batches of distinct masks: every row gets what it would get alone, and
the plan the byte model picks never reads more weight bytes than the dense step."""

import pytest
import torch

from adapter.config import RuntimeConfig
from adapter.runtime import gated as gated_mod
from adapter.runtime import masks
from adapter.runtime.gated import GatedModel
from adapter.runtime.gather import GATHER_READS, PlanCache, unit_bytes
from adapter.selection import predictors as P
from tests.adapter.test_runtime import prompt
from tests.support import tiny_llama

# batched and solo steps differ only by float reassociation (the batched GEMM of layer 0 and
# the lm_head already differ from the solo one at ~1e-7); 1e-5 is 10x tighter than the
# runtime's other tests
ATOL = 1e-5


def mixed_methods(shape):
    """Distinct masks at several sparsities, two rows sharing one, a dense row, a per-token row."""
    shared = P.random_static(shape, 0.5, seed=4)
    return [P.ShadowLLM(P.random_unified(shape, 32, seed=0), 0.5),
            P.ShadowLLM(P.random_unified(shape, 32, seed=1), 0.5),
            P.ShadowLLM(P.random_unified(shape, 32, seed=2), 0.7),
            shared, P.random_static(shape, 0.3, seed=5), shared,
            P.Dense(), P.DejaVu(P.random_dejavu(shape, 8), 0.5)]


def overlapping_masks(shape, n, drop=4, seed=0):
    """n masks that keep the same half of every layer but for `drop` neurons and one head
    each: the union is small, so the union plan pays."""
    g = torch.Generator().manual_seed(seed)
    base_n = torch.randperm(shape.ffn, generator=g)[: shape.ffn // 2]
    base_h = torch.randperm(shape.heads, generator=g)[: shape.heads // 2]
    out = []
    for i in range(n):
        heads, neurons = [], []
        for _ in range(shape.layers - 1):
            extra_n = torch.randperm(shape.ffn, generator=g)[:drop]
            neurons.append(torch.unique(torch.cat([base_n[drop:], extra_n])))
            extra_h = torch.randperm(shape.heads, generator=g)[:1]
            heads.append(torch.unique(torch.cat([base_h[1:], extra_h])))
        out.append(masks.from_indices(shape, heads, neurons))
    return out


def run_both(gm, prompts, methods, steps, force=None):
    """Batched decode under a plan vs each row decoded alone: the logits of every step."""
    batch = [gm.prefill(p, m, steps + 1)[0] for p, m in zip(prompts, methods)]
    solo = [gm.prefill(p, m, steps + 1)[0] for p, m in zip(prompts, methods)]
    plan = gm.batch_plan(batch, force)
    toks = torch.tensor([p[-1] for p in prompts])
    got, want = [], []
    for _ in range(steps):
        out = gm.decode(batch, toks, plan)
        got.append(out)
        want.append(torch.cat([gm.decode([st], toks[i:i + 1]) for i, st in enumerate(solo)]))
        toks = out.argmax(-1)
    return plan, batch, torch.stack(got), torch.stack(want)


@pytest.mark.parametrize("force", [None, "per_mask", "union", "dense"])
def test_each_row_of_a_mixed_batch_equals_the_row_alone(tiny_model, force):
    gm = GatedModel(tiny_model)
    methods = mixed_methods(gm.shape)
    prompts = [prompt(n=9 + 2 * i, seed=i) for i in range(len(methods))]
    plan, _, got, want = run_both(gm, prompts, methods, steps=4, force=force)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    if force is not None:
        assert {lp.ffn.kind for lp in plan.layers[1:]} == {force}
        assert {lp.attn.kind for lp in plan.layers[1:]} == {force}
    assert plan.token_rows == (7,)  # the DejaVu row runs its own per-token path


def test_union_plan_rows_equal_alone_and_caches_stay_per_sequence():
    """Overlapping masks: the byte model picks the union, GQA with uneven heads per group."""
    gm = GatedModel(tiny_llama(kv_heads=2))
    ms = overlapping_masks(gm.shape, 4)
    methods = [P.Static(m, 0.5) for m in ms]
    prompts = [prompt(n=8 + i, seed=10 + i) for i in range(4)]
    plan, batch, got, want = run_both(gm, prompts, methods, steps=5)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for lp in plan.layers[1:]:
        assert lp.ffn.kind == "union" and lp.attn.kind == "union"
        assert lp.bytes["ffn"]["union"] < lp.bytes["ffn"]["per_mask"]
        assert lp.density["neurons"] < 1.0
    assert plan.gathered_bytes > 0
    for i, (st, m) in enumerate(zip(batch, ms)):
        assert st.length == len(prompts[i]) + 5
        for layer in range(1, gm.shape.layers):
            # the row's cache holds only its own kept groups
            assert st.k[layer].shape[0] == m.layers[layer].groups.numel()


def test_disjoint_masks_run_per_mask():
    """Two masks with no unit in common: the union reads what the two products read, and its
    copy would cost more, so each mask runs its own product on its own gathered weights."""
    gm = GatedModel(tiny_llama(kv_heads=2))
    shape = gm.shape  # H=8 over G=2, F=96
    a = masks.from_indices(shape, [[0, 1], [0, 1]], [list(range(0, 30))] * 2)
    b = masks.from_indices(shape, [[4, 5], [4, 5]], [list(range(30, 60))] * 2)
    methods = [P.Static(a, 0.7), P.Static(b, 0.7), P.Static(a, 0.7)]
    prompts = [prompt(n=10, seed=i) for i in range(3)]
    plan, _, got, want = run_both(gm, prompts, methods, steps=3)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for lp in plan.layers[1:]:
        assert lp.ffn.kind == "per_mask" and lp.attn.kind == "per_mask"
        assert [g.members for g in lp.ffn.groups] == [(0, 2), (1,)]
    assert plan.gathered_bytes == 0


def test_one_shared_mask_runs_on_its_own_weights():
    gm = GatedModel(tiny_llama())
    method = P.random_static(gm.shape, 0.5)
    states = [gm.prefill(prompt(seed=i), method, 2)[0] for i in range(3)]
    plan = gm.batch_plan(states)
    for layer, lp in enumerate(plan.layers):
        assert lp.ffn.kind == lp.attn.kind == "per_mask"
        (group,) = lp.ffn.groups
        assert group.rows is None and group.members == (0, 1, 2)
    assert plan.step_bytes() == sum(lp.bytes["ffn"]["per_mask"] + lp.bytes["attn"]["per_mask"]
                                    for lp in plan.layers)


@pytest.mark.parametrize("kv_heads", [2, 8])
def test_chosen_plan_never_reads_more_bytes_than_dense(kv_heads):
    gm = GatedModel(tiny_llama(kv_heads=kv_heads))
    shape = gm.shape
    g = torch.Generator().manual_seed(0)
    dense_layer = sum(n * c for n, c in zip(unit_bytes(gm.view.layers[1], shape),
                                             (shape.heads, shape.kv_heads, shape.ffn)))
    pred = P.random_unified(shape, 32)
    checked = set()
    for trial in range(24):
        b = int(torch.randint(1, 10, (1,), generator=g))
        s = [0.3, 0.5, 0.7, 0.9][trial % 4]
        kind = trial % 3
        if kind == 0:
            methods = [P.random_static(shape, s, seed=int(torch.randint(0, 4, (1,), generator=g)))
                       for _ in range(b)]
        elif kind == 1:
            methods = [P.ShadowLLM(pred, s)] * b
        else:
            methods = [P.Static(m, s) for m in overlapping_masks(shape, b, seed=trial)]
        states = [gm.prefill(prompt(n=6, seed=100 * trial + i), m, 1)[0] for i, m in enumerate(methods)]
        plan = gm.batch_plan(states)
        distinct = len({st.mask.key for st in states})
        for lp in plan.layers:
            for part in ("attn", "ffn"):
                nbytes, kind_chosen = lp.bytes[part], getattr(lp, part).kind
                chosen = nbytes[kind_chosen]
                assert chosen <= nbytes["dense"] and chosen <= nbytes["per_mask"]
                cost = {k: v * (1 + GATHER_READS / gm.plan_horizon) if k == "union" else v
                        for k, v in nbytes.items()}
                assert cost[kind_chosen] == min(cost.values())
                checked.add(kind_chosen)
            assert lp.step_bytes <= dense_layer
        assert plan.step_bytes() <= shape.layers * dense_layer
        if distinct == 1:
            assert all(lp.ffn.kind == "per_mask" for lp in plan.layers)
    assert checked == {"per_mask", "union", "dense"}  # the trials reach every kind


def test_plan_is_built_once_per_composition(monkeypatch):
    gm = GatedModel(tiny_llama())
    calls = []
    real = gated_mod.build_plan
    monkeypatch.setattr(gated_mod, "build_plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    methods = [P.ShadowLLM(P.random_unified(gm.shape, 32, seed=i), 0.5) for i in range(3)]
    prompts = [prompt(n=8, seed=i) for i in range(3)]
    gm.generate(prompts, methods, 6)
    assert len(calls) == 1  # every row ran to max_tokens: one composition
    assert gm.plans.stats()["hits"] == 4  # decode steps 2..5 reuse it
    states = [gm.prefill(p, m, 2)[0] for p, m in zip(prompts, methods)]
    gm.decode(states[::-1], torch.tensor([1, 2, 3]))  # another row order: another plan
    assert len(calls) == 2


def test_only_per_token_rows():
    gm = GatedModel(tiny_llama())
    method = P.DejaVu(P.random_dejavu(gm.shape, 8), 0.5)
    prompts = [prompt(n=7, seed=i) for i in range(2)]
    plan, _, got, want = run_both(gm, prompts, [method, method], steps=3)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert plan.token_rows == (0, 1) and all(not lp.members for lp in plan.layers[1:])


def test_plan_cache_keeps_the_newest_plan_over_budget():
    cache = PlanCache(budget_bytes=0, max_entries=2)

    class Fake:
        def __init__(self, n):
            self.gathered_bytes, self.layers = n, ()

    first = cache.get(("a",), lambda: Fake(10))
    assert cache.get(("a",), lambda: Fake(99)) is first  # kept although over budget
    cache.get(("b",), lambda: Fake(10))
    assert cache.stats()["entries"] == 1 and cache.stats()["bytes"] == 10
    cache.get(("c",), lambda: Fake(0))
    cache.get(("d",), lambda: Fake(0))
    cache.get(("e",), lambda: Fake(0))
    assert cache.stats()["entries"] == 2


def test_a_new_plan_with_copies_drops_the_older_plans_copies():
    """Compositions that moved on rarely come back: their union copies give way (and their
    memory to the next plan's copies); plans without copies stay."""
    cache = PlanCache(budget_bytes=1 << 30)

    class Fake:
        def __init__(self, n):
            self.gathered_bytes, self.layers = n, ()

    cheap = cache.get(("x",), lambda: Fake(0))
    cache.get(("a",), lambda: Fake(10))
    newest = cache.get(("b",), lambda: Fake(20))
    assert cache.stats()["entries"] == 2 and cache.stats()["bytes"] == 20
    assert cache.get(("x",), lambda: Fake(5)) is cheap and cache.get(("b",), lambda: Fake(5)) is newest


def test_bench_speed_reports_each_batch_against_its_plan(monkeypatch):
    """`shadowgate bench speed --batch 1,3` on a tiny shape: every row names its batch size,
    its ideal comes from the plan it chose, and the plan's union density is recorded."""
    from adapter.benchmarks import decode_speed as bench
    from adapter.config import PredictorConfig, RuntimeConfig

    monkeypatch.setitem(bench.ARCHS, "tiny", dict(family="llama", hidden=64, layers=3, heads=8,
                                                  kv_heads=2, ffn=96))
    out = bench.run_speed(RuntimeConfig(), arch="tiny", quick=True, batch_size=[1, 3],
                          predictor=PredictorConfig(hidden=32), methods=["shadowllm", "static"],
                          sparsities=[0.5], repeats=1, steps=3)
    assert out["batch_sizes"] == [1, 3] and [d["batch_size"] for d in out["dense"]] == [1, 3]
    rows = {(r["method"], r["batch_size"]): r for r in out["results"]}
    assert set(rows) == {("shadowllm", 1), ("static", 1), ("shadowllm", 3), ("static", 3)}
    for r in rows.values():
        assert len(r["plan"]) == 8 and r["plan"][0]["neurons"] == 1.0  # quick: 8 layers, layer 0 dense
        assert r["ideal_speedup"] >= 1.0 and r["per_mask_bytes_vs_dense"] > 0
        assert r["pct_of_ideal"] == pytest.approx(100 * r["speedup"] / r["ideal_speedup"], rel=0.01)
    # static rows share one mask: the same bytes at every batch size
    assert rows["static", 3]["ideal_speedup"] == rows["static", 1]["ideal_speedup"]
    # three distinct shadowllm masks: the plan reads at most dense, never 3x one mask
    assert rows["shadowllm", 3]["ideal_speedup"] >= 1.0
    assert rows["shadowllm", 3]["per_mask_bytes_vs_dense"] > 1.0 / rows["shadowllm", 3]["ideal_speedup"]
    assert rows["shadowllm", 1]["request_ms"] is not None and rows["shadowllm", 3]["request_ms"] is None


def test_bench_speed_rows_per_batch_units(monkeypatch):
    """--units per_request --units heads_neurons: a shadowllm row each; at batch 3 the batch's
    units read fewer bytes (a higher ideal) than the exact plan, at batch 1 the same."""
    from adapter.benchmarks import decode_speed as bench
    from adapter.config import PredictorConfig, RuntimeConfig

    monkeypatch.setitem(bench.ARCHS, "tiny", dict(family="llama", hidden=64, layers=3, heads=8,
                                                  kv_heads=2, ffn=96))
    out = bench.run_speed(RuntimeConfig(), arch="tiny", quick=True, batch_size=[1, 3],
                          predictor=PredictorConfig(hidden=32), methods=["shadowllm"], sparsities=[0.5],
                          repeats=1, steps=3, units=("per_request", "heads_neurons"))
    rows = {(r["units"], r["batch_size"]): r for r in out["results"]}
    assert set(rows) == {(u, b) for u in ("per_request", "heads_neurons") for b in (1, 3)}
    assert rows["heads_neurons", 1]["ideal_speedup"] == rows["per_request", 1]["ideal_speedup"]
    assert rows["heads_neurons", 3]["ideal_speedup"] > rows["per_request", 3]["ideal_speedup"]
    assert {p["ffn"] for p in rows["heads_neurons", 3]["plan"][1:]} == {"batch"}
    with pytest.raises(ValueError, match="unknown units 'all'"):
        bench.run_speed(RuntimeConfig(), arch="tiny", units=("all",))


def test_batch_quality_per_request_rows_equal_alone_and_batch_units_are_measured():
    """`shadowgate bench batch-quality` on the embedded model: per-request rows in batches of
    two generate exactly what they generate alone; the batch-unit rows are reported."""
    from adapter.benchmarks import batch_quality
    from adapter.embedded.recipe import default_predictor_dir
    from adapter.evaluation.sweep import load_set
    from adapter.pipeline import traces
    from adapter.runtime.loading import load

    loaded = load("default")
    preds = load_set(default_predictor_dir("default"), loaded.runtime.shape,
                     traces.model_fingerprint(loaded.runtime.model))
    out = batch_quality.run(loaded.runtime, loaded.tokenizer, preds["shadowllm-plainact"], sparsities=(0.5,),
                            batches=(1, 2), per_family=2, tokens=4, keeps=(1.0, 2.0))
    assert {(r["units"], r["batch_keep"]) for r in out["results"] if r["batch"] == 2} == \
        {("per_request", None), ("heads", 1.0), ("heads", 2.0), ("heads_neurons", 1.0), ("heads_neurons", 2.0)}
    rows = {(r["units"], r["batch"]): r for r in out["results"] if r.get("batch_keep") in (None, 1.0)}
    assert rows["dense", 8]["accuracy"] == rows["dense", 8]["agreement"] == 1.0
    assert {k: v for k, v in rows["per_request", 2].items() if k != "batch"} == \
        {k: v for k, v in rows["per_request", 1].items() if k != "batch"}
    assert {("heads", 2), ("heads_neurons", 2)} <= set(rows) and out["prompts"] == 12
    assert loaded.runtime.batch_parts == frozenset() and loaded.runtime.batch_keep == 1.0  # restored


def test_a_short_horizon_does_not_pay_for_a_union_copy():
    gm = GatedModel(tiny_llama(kv_heads=2))
    methods = [P.Static(m, 0.5) for m in overlapping_masks(gm.shape, 4)]
    states = [gm.prefill(prompt(n=8, seed=i), m, 2)[0] for i, m in enumerate(methods)]
    short = gm.batch_plan(states, horizon=1)  # a copy read 2x over 1 step costs more than dense
    assert {lp.ffn.kind for lp in short.layers[1:]} == {"dense"} and short.gathered_bytes == 0
    assert gm.batch_plan(states).gathered_bytes == 0  # the cached plan stands for this composition
    stats = gm.plans.stats()  # one plan built; its gated layers' kinds counted (the replica publishes them)
    assert stats["misses"] == 1 and stats["hits"] == 1 and stats["build_ms"] > 0
    assert stats["ffn_dense"] == gm.shape.layers - 1 and stats["ffn_union"] == 0
    gm.plans.clear()
    assert {lp.ffn.kind for lp in gm.batch_plan(states, horizon=32).layers[1:]} == {"union"}


def test_a_prefill_without_a_copy_equals_the_gathered_prefill():
    """gather=False runs the prompt on the full weights with the mask applied: the same
    logits and the same (kept-groups-only) KV cache as on gathered weights, no copy made."""
    gm = GatedModel(tiny_llama(kv_heads=2))
    ms = overlapping_masks(gm.shape, 2) + [masks.from_indices(gm.shape, [[0, 1, 5]] * 2, [list(range(40))] * 2)]
    methods = [P.Static(m, 0.5) for m in ms] + [P.ShadowLLM(P.random_unified(gm.shape, 32, seed=3), 0.7), P.Dense()]
    for i, method in enumerate(methods):
        ids = prompt(n=9 + i, seed=20 + i)
        lazy, got = gm.prefill(ids, method, 3, all_logits=True, gather=False)
        assert gm.cache.stats()["misses"] == 0
        assert lazy.gathered == isinstance(method, P.Dense)  # a dense mask needs no copy
        eager, want = gm.prefill(ids, method, 3, all_logits=True)
        if not isinstance(method, P.Dense):  # the copy's time is the eager prefill's alone
            assert lazy.gather_ms == 0.0 and eager.gather_ms > 0.0
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        for layer in range(gm.shape.layers):
            torch.testing.assert_close(lazy.k[layer][:, :len(ids)], eager.k[layer][:, :len(ids)], atol=ATOL, rtol=0)
        gm.cache = type(gm.cache)(gm.view.layers, gm.shape, gm.cache.budget)  # cold again


def test_a_joiners_long_prompt_runs_on_a_copy_it_does_not_keep():
    """runtime.prompt_copy_tokens: a joiner's prompt of at least that many tokens runs on its
    mask's copy ((1 - s) of the FLOPs; the same logits and cache), which the sequence then
    drops (the cache keeps it); shorter prompts, None, and batch units make no copy."""
    gm = GatedModel(tiny_llama(kv_heads=2), RuntimeConfig(prompt_copy_tokens=12))
    ms = overlapping_masks(gm.shape, 2)
    ref = GatedModel(gm.model, RuntimeConfig(prompt_copy_tokens=None))
    long_ids, short_ids = prompt(n=12, seed=41), prompt(n=11, seed=42)
    lazy, got = gm.prefill(long_ids, P.Static(ms[0], 0.5), 3, all_logits=True, gather=False)
    assert gm.cache.stats()["misses"] == 1 and lazy.gather_ms > 0.0
    assert not lazy.gathered and gm.cache.has(ms[0])  # the sequence let go of it, the cache did not
    eager, want = ref.prefill(long_ids, P.Static(ms[0], 0.5), 3, all_logits=True)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for layer in range(gm.shape.layers):
        torch.testing.assert_close(lazy.k[layer][:, :12], eager.k[layer][:, :12], atol=ATOL, rtol=0)
    toks = torch.tensor([long_ids[-1]])
    torch.testing.assert_close(gm.decode([lazy], toks), ref.decode([eager], toks), atol=ATOL, rtol=0)
    short, _ = gm.prefill(short_ids, P.Static(ms[1], 0.5), 3, gather=False)
    assert gm.cache.stats()["misses"] == 1 and not short.gathered  # 11 < 12 tokens: no copy
    never, _ = ref.prefill(long_ids, P.Static(ms[1], 0.5), 3, gather=False)
    assert ref.cache.stats()["misses"] == 1 and not never.gathered  # None: only the eager prefill above copied
    units = GatedModel(gm.model, RuntimeConfig(prompt_copy_tokens=1, batch_heads=True, batch_neurons=True))
    units.prefill(long_ids, P.Static(ms[1], 0.5), 3, gather=False)
    assert units.cache.stats()["misses"] == 0  # batch units give the prompt (1 - s) without a copy


def test_rows_prefilled_without_a_copy_share_products_and_gather_only_when_alone():
    """A busy batch of rows prefilled without copies decodes on union/dense products (no
    per-row copy is ever made) and equals each row alone; the row left by itself later gets
    its own copy, because the byte model charges it once over the steps left."""
    gm = GatedModel(tiny_llama(kv_heads=2))
    ms = overlapping_masks(gm.shape, 4)
    methods = [P.Static(m, 0.5) for m in ms]
    prompts = [prompt(n=8 + i, seed=30 + i) for i in range(4)]
    batch = [gm.prefill(p, m, 40, gather=False)[0] for p, m in zip(prompts, methods)]
    assert gm.cache.stats()["misses"] == 0
    ref = GatedModel(gm.model)
    solo = [ref.prefill(p, m, 40)[0] for p, m in zip(prompts, methods)]
    toks = torch.tensor([p[-1] for p in prompts])
    for _ in range(3):
        out = gm.decode(batch, toks, horizon=30)
        want = torch.cat([ref.decode([st], toks[i:i + 1]) for i, st in enumerate(solo)])
        torch.testing.assert_close(out, want, atol=ATOL, rtol=0)
        toks = out.argmax(-1)
    plan = gm.batch_plan(batch, horizon=30)
    assert {lp.ffn.kind for lp in plan.layers[1:]} <= {"union", "dense"}
    assert gm.cache.stats()["misses"] == 0 and not any(st.gathered for st in batch)
    # the last row alone, 30 steps to go: its own copy (half the layer) beats dense
    alone = gm.batch_plan(batch[:1], horizon=30)
    assert {lp.ffn.kind for lp in alone.layers[1:]} == {"per_mask"}
    out = gm.decode(batch[:1], toks[:1], alone)
    torch.testing.assert_close(out, ref.decode(solo[:1], toks[:1]), atol=ATOL, rtol=0)
    assert batch[0].gathered and gm.cache.stats()["misses"] == 1
    # one step left: the copy would not pay for itself, the full weights serve it
    last = gm.batch_plan([batch[1]], horizon=1)
    assert {lp.ffn.kind for lp in last.layers[1:]} == {"dense"}


def _batch_model(heads: bool, neurons: bool) -> GatedModel:

    return GatedModel(tiny_llama(kv_heads=2), RuntimeConfig(batch_heads=heads, batch_neurons=neurons))


def test_batch_units_are_off_by_default_and_exact_kinds_win_ties():
    gm = GatedModel(tiny_llama(kv_heads=2))
    assert gm.batch_parts == frozenset()
    methods = [P.ShadowLLM(P.random_unified(gm.shape, 32, seed=i), 0.5) for i in range(4)]
    states = [gm.prefill(prompt(seed=i), m, 4)[0] for i, m in enumerate(methods)]
    assert "batch" not in {lp.attn.kind for lp in gm.batch_plan(states).layers}
    # one shared mask: the batch's units are that mask's, and its own product stays
    gm = _batch_model(True, True)
    method = P.random_static(gm.shape, 0.5)
    states = [gm.prefill(prompt(seed=i), method, 2)[0] for i in range(3)]
    assert {(lp.attn.kind, lp.ffn.kind) for lp in gm.batch_plan(states).layers} == {("per_mask", "per_mask")}


def test_batch_heads_rows_with_equal_heads_equal_alone():
    """Distinct masks that keep the same heads (uneven over the two KV groups) and differ in
    neurons: the batch's heads are those heads, so every row attends exactly as alone."""
    gm = _batch_model(True, False)
    shape = gm.shape  # H=8 over G=2, F=96
    heads = [[0, 1, 2, 5]] * (shape.layers - 1)
    ms = [masks.from_indices(shape, heads, [list(range(10 * i, 10 * i + 48))] * (shape.layers - 1))
          for i in range(3)]
    prompts = [prompt(n=9 + i, seed=20 + i) for i in range(3)]
    plan, _, got, want = run_both(gm, prompts, [P.Static(m, 0.5) for m in ms], steps=4, force="batch")
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for lp in plan.layers[1:]:
        assert lp.attn.kind == "batch" and lp.attn.row_heads[0][0] == 4
        assert lp.ffn.kind != "batch"  # neurons stay each row's own (union, dense or per mask)


def test_batch_neurons_rows_with_equal_neurons_equal_alone():
    gm = _batch_model(False, True)
    shape = gm.shape
    neurons = [list(range(0, 96, 2))] * (shape.layers - 1)
    ms = [masks.from_indices(shape, [[i, 4 + i]] * (shape.layers - 1), neurons) for i in range(3)]
    prompts = [prompt(n=9 + i, seed=30 + i) for i in range(3)]
    plan, _, got, want = run_both(gm, prompts, [P.Static(m, 0.5) for m in ms], steps=4, force="batch")
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert {lp.ffn.kind for lp in plan.layers[1:]} == {"batch"}


def test_batch_heads_are_the_most_kept_and_every_row_attends_within_its_cached_groups():
    from adapter.runtime.gather import _batch_heads

    gm = _batch_model(True, True)
    shape = gm.shape  # group g holds heads 4g..4g+3
    lms = [masks.from_indices(shape, [hs] * (shape.layers - 1), [list(range(48))] * (shape.layers - 1)).layers[1]
           for hs in ([0, 1, 2, 3], [0, 1, 2, 4], [0, 1, 5, 6], [4, 5, 6, 7])]
    chosen, rows = _batch_heads(shape, lms)
    assert chosen.tolist() == [0, 1, 2, 4]  # 4 heads (the mean kept), by votes 3, 3, 2, 2 (4 beats 5, 6)
    assert [r.tolist() for r in rows] == [[0, 1, 2], [0, 1, 2, 4], [0, 1, 2, 4], [4]]
    # a row none of whose groups the batch's heads touch gets its most-kept own head added
    lms = [masks.from_indices(shape, [hs] * (shape.layers - 1), [list(range(48))] * (shape.layers - 1)).layers[1]
           for hs in ([0, 1], [0, 1], [0, 2], [5])]
    chosen, rows = _batch_heads(shape, lms)
    assert chosen.tolist() == [0, 1, 5] and rows[3].tolist() == [5]


def test_batch_keep_widens_the_batch_units_up_to_the_union():
    from adapter.runtime.gather import _batch_heads

    gm = _batch_model(True, True)
    shape = gm.shape
    lms = [masks.from_indices(shape, [hs] * (shape.layers - 1), [list(range(48))] * (shape.layers - 1)).layers[1]
           for hs in ([0, 1, 2, 3], [0, 1, 2, 4], [0, 1, 5, 6], [4, 5, 6, 7])]
    # 1.5 x the 4 heads a row keeps: the 6 most voted (0, 1 by 3 votes; 2, 4, 5, 6 by 2)
    chosen, rows = _batch_heads(shape, lms, 1.5, 8)
    assert chosen.tolist() == [0, 1, 2, 4, 5, 6]
    assert [r.tolist() for r in rows] == [[0, 1, 2], [0, 1, 2, 4, 5, 6], [0, 1, 2, 4, 5, 6], [4, 5, 6]]
    # never more than the union: a unit no row keeps is never added
    chosen, _ = _batch_heads(shape, lms, 8.0, 8)
    assert chosen.tolist() == list(range(8))
    methods = [P.ShadowLLM(P.random_unified(shape, 32, seed=i), 0.5) for i in range(6)]
    states = [gm.prefill(prompt(seed=40 + i), m, 8)[0] for i, m in enumerate(methods)]
    cached = gm.batch_plan(states)
    narrow = gm.batch_plan(states, force="batch")
    gm.batch_keep = 1.5
    assert gm.batch_plan(states) is not cached  # the plan cache keys on batch_keep
    gm.batch_kept.clear()
    wide = gm.batch_plan(states, force="batch")
    for n, w in zip(narrow.layers[1:], wide.layers[1:]):
        assert w.ffn.kind == w.attn.kind == "batch"
        union = round(n.density["neurons"] * shape.ffn)
        kept_n, kept_w = n.ffn.weights.w_down.shape[1], w.ffn.weights.w_down.shape[1]
        assert kept_w == min(union, round(1.5 * kept_n)) and kept_w > kept_n
        assert n.bytes["ffn"]["batch"] < w.bytes["ffn"]["batch"] <= w.bytes["ffn"]["union"]
    out = gm.decode(states, torch.tensor([5] * 6), wide)
    assert out.isfinite().all()


def test_batch_units_read_fewer_bytes_than_the_union_of_distinct_masks():
    gm = _batch_model(True, True)
    methods = [P.ShadowLLM(P.random_unified(gm.shape, 32, seed=i), 0.5) for i in range(6)]
    states = [gm.prefill(prompt(seed=40 + i), m, 8)[0] for i, m in enumerate(methods)]
    plan = gm.batch_plan(states, horizon=32)
    out = gm.decode(states, torch.tensor([5] * 6), plan)
    assert out.isfinite().all()
    for lp in plan.layers[1:]:
        assert lp.attn.kind == lp.ffn.kind == "batch"
        assert lp.bytes["ffn"]["batch"] < min(lp.bytes["ffn"].get("union", 1 << 62), lp.bytes["ffn"]["dense"])
        assert lp.bytes["attn"]["batch"] <= lp.bytes["attn"].get("union", lp.bytes["attn"]["dense"])


def test_batch_units_are_kept_across_compositions_while_they_hold_the_votes():
    """Rows come and go: a new composition whose best batch units nearly equal the kept ones
    reuses them and their copy (no gather); one that votes elsewhere gathers its own."""
    gm = _batch_model(True, True)
    shape = gm.shape
    layers = shape.layers - 1
    common = list(range(40))
    ms = [masks.from_indices(shape, [[0, 1, 2, 4 + i % 2]] * layers, [common + list(range(40 + i, 48 + i))] * layers)
          for i in range(6)]
    states = [gm.prefill(prompt(seed=50 + i), P.Static(m, 0.5), 8)[0] for i, m in enumerate(ms)]
    first = gm.batch_plan(states[:4], horizon=32)
    assert {lp.attn.kind for lp in first.layers[1:]} == {lp.ffn.kind for lp in first.layers[1:]} == {"batch"}
    assert first.gathered_bytes > 0
    again = gm.batch_plan(states[1:5], horizon=32)  # one row left, another joined
    assert again.gathered_bytes == 0
    assert all(a.ffn.weights is b.ffn.weights and a.attn.weights is b.attn.weights
               for a, b in zip(first.layers[1:], again.layers[1:]))
    out = gm.decode(states[1:5], torch.tensor([5] * 4), again)
    assert out.isfinite().all()
    # rows that keep other heads and neurons: the kept units no longer hold the votes
    far = [masks.from_indices(shape, [[5, 6, 7, 3 - i % 2]] * layers, [list(range(50, 90)) + list(range(i, i + 8))] * layers)
           for i in range(3)]
    others = [gm.prefill(prompt(seed=60 + i), P.Static(m, 0.5), 8)[0] for i, m in enumerate(far)]
    moved = gm.batch_plan(others, horizon=32)
    assert moved.gathered_bytes > 0
    assert gm.batch_kept["ffn", 1].weights is moved.layers[1].ffn.weights


def test_a_row_joining_a_busy_batch_is_prefilled_on_the_batch_units():
    """With batch units on, a prefill without a copy runs the layers the batch holds units
    for on those units (their copies, no new one): the same logits and KV cache as a
    prefill whose mask keeps exactly the batch's heads (of the row's groups) and neurons."""
    gm = _batch_model(True, True)
    shape = gm.shape  # H=8 over G=2, F=96
    layers = shape.layers - 1
    ms = [masks.from_indices(shape, [hs] * layers, [list(range(8 * i, 8 * i + 48))] * layers)
          for i, hs in enumerate(([0, 1, 4, 5], [0, 1, 4, 6], [0, 2, 4, 5]))]
    states = [gm.prefill(prompt(seed=70 + i), P.Static(m, 0.5), 8)[0] for i, m in enumerate(ms)]
    plan = gm.batch_plan(states, force="batch")
    assert {(lp.attn.kind, lp.ffn.kind) for lp in plan.layers[1:]} == {("batch", "batch")}
    kept_h, kept_n = gm.batch_kept["attn", 1].units, gm.batch_kept["ffn", 1].units
    assert kept_h.tolist() == [0, 1, 4, 5]
    misses = gm.cache.stats()["misses"]
    joiner = masks.from_indices(shape, [[1, 3, 6, 7]] * layers, [list(range(40, 88))] * layers)
    ids = prompt(n=11, seed=77)
    lazy, got = gm.prefill(ids, P.Static(joiner, 0.5), 4, all_logits=True, gather=False)
    assert gm.cache.stats()["misses"] == misses and not lazy.gathered  # no copy made
    as_batch = masks.from_indices(shape, [kept_h.tolist()] * layers, [kept_n.tolist()] * layers)
    ref = GatedModel(gm.model)
    eager, want = ref.prefill(ids, P.Static(as_batch, 0.5), 4, all_logits=True)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for layer in range(shape.layers):
        torch.testing.assert_close(lazy.k[layer][:, :len(ids)], eager.k[layer][:, :len(ids)], atol=ATOL, rtol=0)
    # the row then decodes inside the batch on those units
    out = gm.decode(states + [lazy], torch.tensor([5] * 4), horizon=32)
    assert out.isfinite().all()
    # a row whose KV group the kept heads' copy lacks keeps its own heads there
    only0 = masks.from_indices(shape, [[0, 1]] * layers, [list(range(48))] * layers)
    gm.batch_kept["attn", 1] = type(gm.batch_kept["attn", 1])(
        torch.tensor([0, 1]), torch.tensor([0]), gm.batch_kept["attn", 1].weights)
    assert gm._kept_attn(only0.layers[1], 1) is not None
    assert gm._kept_attn(joiner.layers[1], 1) is None


def test_without_batch_units_a_prefill_without_a_copy_ignores_kept_units():
    gm = GatedModel(tiny_llama(kv_heads=2))
    ms = overlapping_masks(gm.shape, 2)
    lazy, got = gm.prefill(prompt(n=9, seed=3), P.Static(ms[0], 0.5), 2, gather=False)
    _, want = gm.prefill(prompt(n=9, seed=3), P.Static(ms[0], 0.5), 2)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_step_profile_splits_a_step_into_matmuls_and_the_rest(monkeypatch):
    """`shadowgate bench step-profile` on a tiny shape: per step, matmuls plus the other
    operators make the profiled time, and the ideal is the plan's bytes against dense."""
    from adapter.benchmarks import decode_speed, step_profile

    monkeypatch.setitem(decode_speed.ARCHS, "tiny", dict(family="llama", hidden=64, layers=3, heads=8,
                                                         kv_heads=2, ffn=96))
    out = step_profile.run(RuntimeConfig(), arch="tiny", batch=2, units="heads_neurons", steps=3, quick=True)
    for name in ("dense", "shadowllm"):
        r = out[name]
        assert r["matmul_ms"] > 0 and r["other_ms"] >= 0 and r["wall_ms"] > 0
        assert r["profiled_ms"] == pytest.approx(r["matmul_ms"] + r["other_ms"], abs=0.02)
        top = r["top_other"]
        assert top and all(not t["op"].endswith(("::mm", "::addmm", "::linear")) for t in top)
        assert [t["ms"] for t in top] == sorted((t["ms"] for t in top), reverse=True)
        assert sum(t["ms"] for t in top) <= r["other_ms"] + 0.01 and r["calls"] >= sum(t["calls"] for t in top)
    assert out["dense"]["bytes"] > out["shadowllm"]["bytes"]
    assert out["ideal_speedup"] == round(out["dense"]["bytes"] / out["shadowllm"]["bytes"], 3)
    with pytest.raises(ValueError, match="unknown units 'all'"):
        step_profile.run(RuntimeConfig(), arch="tiny", units="all", quick=True)


def test_attention_bench_pads_uneven_heads_to_the_same_result():
    """`shadowgate bench attention`: the padded queries give what selecting the cache's rows
    per head gives, at every cache length, and every path is timed."""
    from adapter.benchmarks import attention

    out = attention.run(cache_tokens=(7, 33), spread=(3, 2, 2, 1), repeats=2)
    assert out["kept_heads"] == 8 and out["kept_groups"] == 4 and out["padded_per_group"] == 3
    assert [r["cache_tokens"] for r in out["results"]] == [7, 33]
    for r in out["results"]:
        assert r["max_abs_diff"] < 1e-5
        assert r["padded_ms"] > 0 and r["select_ms"] > 0 and r["dense_ms"] > 0
    with pytest.raises(ValueError, match="spread"):
        attention.run(spread=(5,))
