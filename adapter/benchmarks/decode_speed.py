"""Decode-speed benchmark: dense vs shadowllm / dejavu / static, measured in one run.

The bench model has a realistic shape (vocab 32000, hidden 1024, 16 layers) with RANDOM
weights: speed does not depend on what the weights say, and the output says so. Batch-1
decode on a CPU is bound by reading weights, so the ideal speedup of a method is the ratio
of weight bytes read per dense step to weight bytes read per sparse step.

Batches (`batch_sizes`): every row has its own prompt, so per-request masks differ. The
runtime plans each batch composition by a byte model (adapter/runtime/gather.py: per-mask
products, one product over the union of the rows' kept units, or dense); the ideal speedup
of a batched row is dense bytes over the bytes of the plan it chose, and the per-layer union
density of that plan is recorded. The plan is built before the timed steps (it is built
once per batch composition; `plan_ms` says what that costs).

Every repeat visits every configuration at every batch size. Each configuration's decode
steps alternate step by step with a dense batch of the same size, and its speedup is the
median dense step over its median step, so the machine's drift hits both alike; figures are
medians over all steps of all repeats. Whole requests (`request_ms`) are timed at batch 1.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections import Counter
from typing import Sequence

import torch
from tqdm import tqdm

from adapter.runtime import masks

from adapter.selection import predictors as P
from adapter.selection.methods import make_method
from adapter.config import PredictorConfig, RuntimeConfig
from adapter.runtime.gated import GatedModel
from adapter.runtime.gather import BATCH_UNITS, BatchPlan

ARCHS = {
    "llama-gqa": dict(family="llama", hidden=1024, layers=16, heads=16, kv_heads=4, ffn=4096),
    "llama-mha": dict(family="llama", hidden=1024, layers=16, heads=16, kv_heads=16, ffn=4096),
    "opt": dict(family="opt", hidden=1024, layers=16, heads=16, kv_heads=16, ffn=4096),
}
SPARSITIES = (0.3, 0.5, 0.7)
METHODS = ("shadowllm", "dejavu", "static")
PROMPT_TOKENS, REQUEST_TOKENS, VOCAB = 128, 32, 32000


def bench_model(arch: str, quick: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}: use one of {', '.join(ARCHS)}")
    spec = dict(ARCHS[arch])
    if quick:
        spec["layers"] = 8
    torch.manual_seed(0)
    if spec["family"] == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=spec["hidden"], intermediate_size=spec["ffn"],
                          num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                          num_key_value_heads=spec["kv_heads"], max_position_embeddings=2048,
                          tie_word_embeddings=False)  # room for long prompts (--prompt-tokens)
    else:
        cfg = OPTConfig(vocab_size=VOCAB, hidden_size=spec["hidden"], ffn_dim=spec["ffn"],
                        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                        word_embed_proj_dim=spec["hidden"], max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return model, dict(spec, vocab=VOCAB, arch=arch, weights="random (speed only)",
                       params=sum(p.numel() for p in model.parameters()))


def step_bytes(gm: GatedModel, mask: masks.Mask | None, per_token: tuple[int, int] | None = None) -> int:
    """Weight bytes read by one decode step: every layer's kept weights plus the lm_head."""
    shape, wb = gm.shape, gm.view.weight_bytes()
    total = wb["head"] + wb["layers"][0]
    elt = gm.view.layers[0].wq.element_size()
    for layer in range(1, shape.layers):
        if per_token is not None:
            kept = masks.layer_params(shape, per_token[0], shape.kv_heads, per_token[1])
        elif mask is None or mask.layers[layer].full:
            total += wb["layers"][layer]
            continue
        else:
            lm = mask.layers[layer]
            kept = masks.layer_params(shape, lm.heads.numel(), lm.groups.numel(), lm.neurons.numel())
        total += kept * elt
    return total


def plan_step_bytes(gm: GatedModel, plan: BatchPlan, per_token: tuple[int, int] | None = None) -> int:
    """Weight bytes one batched decode step reads under `plan`: its layers, plus each
    per-token row's own kept weights (they run apart), plus the lm_head."""
    shape, wb = gm.shape, gm.view.weight_bytes()
    total = wb["head"] + plan.step_bytes()
    if per_token is not None and plan.token_rows:
        elt = gm.view.layers[0].wq.element_size()
        kept = masks.layer_params(shape, per_token[0], shape.kv_heads, per_token[1])
        total += len(plan.token_rows) * (shape.layers - 1) * kept * elt
    return total


def per_mask_step_bytes(gm: GatedModel, plan: BatchPlan) -> int:
    """What one product per distinct mask would read (the runtime before batch plans)."""
    return gm.view.weight_bytes()["head"] + sum(lp.bytes["attn"]["per_mask"] + lp.bytes["ffn"]["per_mask"]
                                                 for lp in plan.layers)


def _median_ms(samples: list[float]) -> float:
    return 1000.0 * statistics.median(samples)


class _HFDecoder:
    """Plain transformers decode loop (model forward with its own DynamicCache)."""

    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def per_token_seconds(self, prompt: list[int], steps: int) -> float:
        out = self.model(torch.tensor([prompt]), use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = self.model(tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / steps


def _sync(gm: GatedModel) -> None:
    if gm.device.type == "cuda":
        torch.cuda.synchronize(gm.device)


def _prepared(gm: GatedModel, prompts: list[list[int]], method, steps: int):
    """Prefilled sequences for `steps` decode steps, their first tokens, the batch's plan
    and the seconds it took to build (once per batch composition, before the timed steps)."""
    seqs, last = [], []
    for p in prompts:
        st, logits = gm.prefill(p, method, steps + 1)
        seqs.append(st)
        last.append(logits[0])
    _sync(gm)
    start = time.perf_counter()
    plan = gm.batch_plan(seqs, horizon=steps)  # what the first step would build; every step reuses it
    _sync(gm)
    return seqs, torch.stack(last).argmax(-1), plan, time.perf_counter() - start


def _paired_steps(gm: GatedModel, dense_run: tuple, run: tuple, steps: int) -> tuple[list[float], list[float]]:
    """Seconds of each decode step of two batches decoded in alternation (dense first on
    even steps, second on odd ones), so the machine's drift hits both alike."""
    runs = [dense_run, list(run)]  # [sequences, tokens]; the dense run goes on from where it is
    times: tuple[list[float], list[float]] = ([], [])
    for step in range(steps):
        for k in ((0, 1) if step % 2 == 0 else (1, 0)):
            seqs, tok = runs[k]
            start = time.perf_counter()
            runs[k][1] = gm.decode(seqs, tok).argmax(-1)
            _sync(gm)
            times[k].append(time.perf_counter() - start)
    return times


def _request_seconds(gm: GatedModel, prompts: list[list[int]], method) -> float:
    start = time.perf_counter()
    gm.generate(prompts, method, REQUEST_TOKENS)
    return time.perf_counter() - start


def _predictor_seconds(gm: GatedModel, method, rng: torch.Generator) -> float:
    """Predictor time per generated token (a once-per-request predictor is amortised)."""
    d = gm.shape.hidden
    method = method.placed(gm.device, next(gm.model.parameters()).dtype)
    if method.name == "shadowllm":
        u = torch.randn(d, generator=rng).to(gm.device)
        start = time.perf_counter()
        with torch.inference_mode():
            method.choose(gm.shape, u)
        return (time.perf_counter() - start) / REQUEST_TOKENS
    if method.per_token:
        kh, kf = method.counts(gm.shape)
        h = torch.randn(d, generator=rng).to(gm.device, next(gm.model.parameters()).dtype)
        start = time.perf_counter()
        with torch.inference_mode():
            for layer in range(1, gm.shape.layers):
                method.units(layer, h, kh, kf)
        return time.perf_counter() - start
    return 0.0


def run_speed(runtime: RuntimeConfig, arch: str = "llama-gqa", quick: bool = False,
              batch_size: int | Sequence[int] = 1, predictor: PredictorConfig = PredictorConfig(),
              methods: Sequence[str] | None = None, sparsities: Sequence[float] | None = None,
              repeats: int | None = None, steps: int | None = None,
              units: Sequence[str] = ("per_request",), prompt_tokens: int = PROMPT_TOKENS) -> dict:
    """batch_size: one size or several (each row of `results` says its own). methods and
    sparsities: a subset of METHODS and of (0, 1) (default: all METHODS at SPARSITIES).
    repeats and steps (decode steps timed per repeat) default to 5 x 32, quick 3 x 16.
    units: the shadowllm rows' batch units, each a row of its own: per_request (the
    runtime's exact plans), heads, heads_neurons (batch-invariant units, gather.py).
    prompt_tokens: each row's prompt (the cache a decode step attends over)."""
    batches = (batch_size,) if isinstance(batch_size, int) else tuple(batch_size)
    methods = METHODS if methods is None else tuple(methods)
    sparsities = SPARSITIES if sparsities is None else tuple(sparsities)
    if not batches or any(b < 1 for b in batches):
        raise ValueError(f"batch sizes must be >= 1, got {list(batches)}")
    if not methods or not sparsities:
        raise ValueError("give at least one method and one sparsity to compare with dense")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method {bad[0]!r}: use {', '.join(METHODS)} (dense always runs)")
    if any(not 0.0 < s < 1.0 for s in sparsities):
        raise ValueError(f"sparsities must be in (0, 1), got {list(sparsities)}")
    if not units or (bad := [u for u in units if u not in BATCH_UNITS]):
        raise ValueError(f"unknown units {bad[0] if units else None!r}: use {', '.join(BATCH_UNITS)}")
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    runtime.apply_threads()
    model, spec = bench_model(arch, quick)
    # room for the static masks and the union copies; per-request shadowllm masks churn
    gm = GatedModel(model, runtime.model_copy(update={"gather_cache_mb": 4096}))
    shape = gm.shape
    repeats, steps = repeats or (3 if quick else 5), steps or (16 if quick else 32)
    rng = torch.Generator().manual_seed(1)

    def prompts(n: int) -> list[list[int]]:  # distinct prompts, one per row
        return [torch.randint(0, VOCAB, (prompt_tokens,), generator=rng).tolist() for _ in range(n)]

    unified = P.random_unified(shape, predictor.hidden, predictor.rank_for(shape.layers, shape.ffn))
    dejavu_preds = P.random_dejavu(shape, predictor.dejavu_rank)
    # (method, sparsity, its object, the batch units its decode steps may use)
    configs: list[tuple[str, float, object, str]] = [("dense", 0.0, make_method("dense", 0.0), "per_request")]
    for method in methods:
        for s in sparsities:
            if method == "shadowllm":
                for u in units:
                    configs.append((method, s, make_method("shadowllm", s, shape, unified, mode=runtime.mode,
                                                              head_selection=runtime.head_selection), u))
            elif method == "dejavu":
                # decode speed: the prompt runs densely, as in DejaVu's own implementation
                configs.append((method, s, make_method("dejavu", s, shape, dejavu_preds, sparse_prompt=False),
                                "per_request"))
            else:
                configs.append((method, s, make_method("static", s, shape, P.random_static_scores(shape),
                                                          head_selection=runtime.head_selection), "per_request"))
    hf = _HFDecoder(model)
    cells = [(b, i) for b in batches for i in range(len(configs))]
    decode = {c: [] for c in cells}  # seconds per step; (b, 0): every dense step at batch b
    paired = {c: [] for c in cells}  # the dense steps that alternated with (b, i)
    request = {c: [] for c in cells}
    pred = {c: [] for c in cells}
    plan_ms = {c: [] for c in cells}
    plans: dict[tuple[int, int], list[dict]] = {c: [] for c in cells}  # _plan_record per repeat
    effective = {}
    hf_decode: list[float] = []
    with torch.inference_mode():  # warm-up: allocator, kernels, gathered static masks
        for b in batches:
            for _, _, method, u in configs:
                gm.batch_parts = BATCH_UNITS[u]
                gm.generate(prompts(b), method, 2)
        hf.per_token_seconds(prompts(1)[0], 2)
    for _ in tqdm(range(repeats), desc=f"bench {arch}", disable=None):
        if 1 in batches:
            hf_decode.append(hf.per_token_seconds(prompts(1)[0], steps))
            request[1, 0].append(_request_seconds(gm, prompts(1), configs[0][2]))
        dense_run = {}
        for b, i in cells:
            if i == 0:  # one dense batch per size, decoded on alongside every configuration
                dense_seqs, dense_tok, _, _ = _prepared(gm, prompts(b), configs[0][2], (len(configs) - 1) * steps)
                dense_run[b] = [dense_seqs, dense_tok]
                continue
            method = configs[i][2]
            gm.batch_parts = BATCH_UNITS[configs[i][3]]
            # fresh prompts: per-request masks differ, their gathers and plans are not cached
            seqs, tok, plan, plan_s = _prepared(gm, prompts(b), method, steps)
            d, c = _paired_steps(gm, dense_run[b], (seqs, tok), steps)
            decode[b, 0] += d
            paired[b, i] += d
            decode[b, i] += c
            plan_ms[b, i].append(plan_s)
            per_token = method.counts(shape) if method.per_token else None
            plans[b, i].append(_plan_record(gm, plan, per_token))
            effective.setdefault(i, seqs[0].effective_sparsity)
            del plan, seqs
            gm.plans.clear()  # fresh prompts: this composition never comes back
            if b == 1:
                request[b, i].append(_request_seconds(gm, prompts(b), method))
            pred[b, i].append(_predictor_seconds(gm, method, rng))
    dense_bytes = step_bytes(gm, None)
    results, dense = [], []
    for b, i in cells:
        if i == 0:
            dense.append({"batch_size": b, "ms_per_token": round(_median_ms(decode[b, 0]), 3),
                          "request_ms": round(_median_ms(request[b, 0]), 1) if request[b, 0] else None})
            continue
        name, s, method, u = configs[i]
        ms, dense_ms = _median_ms(decode[b, i]), _median_ms(paired[b, i])
        ideal = dense_bytes / statistics.mean(p["bytes"] for p in plans[b, i])
        results.append({
            "method": name, "sparsity": s, "batch_size": b, "units": u, "ms_per_token": round(ms, 3),
            "dense_ms_per_token": round(dense_ms, 3),  # the dense steps it alternated with
            "speedup": round(dense_ms / ms, 3),
            "ideal_speedup": round(ideal, 3),  # dense bytes / bytes of the plan it chose
            "pct_of_ideal": round(100 * dense_ms / ms / ideal, 1),
            # what one product per distinct mask would read, relative to dense
            "per_mask_bytes_vs_dense": round(statistics.mean(p["per_mask_bytes"] for p in plans[b, i])
                                             / dense_bytes, 3),
            "plan_ms": round(_median_ms(plan_ms[b, i]), 2),
            # with the plan's build (once per composition) spread over the timed steps
            "speedup_with_plan": round(dense_ms / (ms + _median_ms(plan_ms[b, i]) / steps), 3),
            "plan_gathered_mb": round(statistics.mean(p["gathered_bytes"] for p in plans[b, i]) / 2**20, 1),
            "predictor_ms": round(_median_ms(pred[b, i]), 4),
            "request_ms": round(_median_ms(request[b, i]), 1) if request[b, i] else None,
            "effective_sparsity": round(effective[i], 4),
            "plan": _plan_summary(plans[b, i]),
        })
    hf_ms = _median_ms(hf_decode) if hf_decode else None
    dense_b1 = next((d for d in dense if d["batch_size"] == 1), None)
    out = {
        "device": _device_name(gm.device), "threads": torch.get_num_threads(),
        "dtype": runtime.dtype, "mode": runtime.mode, "model": spec, "batch_sizes": list(batches),
        "prompt_tokens": prompt_tokens, "request_tokens": REQUEST_TOKENS,
        "decode_steps": steps, "repeats": repeats, "quick": quick,
        "dense": dense,
        "transformers_ms_per_token": None if hf_ms is None else round(hf_ms, 3),
        "wrapped_vs_transformers": None if hf_ms is None else round(dense_b1["ms_per_token"] / hf_ms, 3),
        "results": results,
        "predictor": {"shadowllm_hidden": predictor.hidden,
                      "shadowllm_neuron_rank": unified.neuron_rank,
                      "dejavu_rank": predictor.dejavu_rank},
        "plan_horizon_steps": gm.plan_horizon,
        "gather_cache": gm.cache.stats(),
        "plan_cache": gm.plans.stats(),
        "torch": torch.__version__,
    }
    if len(batches) == 1:  # the single-batch fields of earlier runs' JSON
        out.update(batch_size=batches[0], dense_ms_per_token=dense[0]["ms_per_token"],
                   dense_request_ms=dense[0]["request_ms"])
    return out


def _plan_record(gm: GatedModel, plan: BatchPlan, per_token: tuple[int, int] | None) -> dict:
    """What the bench keeps of a plan (not the plan: it holds the union copies)."""
    return {"bytes": plan_step_bytes(gm, plan, per_token), "per_mask_bytes": per_mask_step_bytes(gm, plan),
            "gathered_bytes": plan.gathered_bytes, "layers": plan.summary()}


def _plan_summary(records: list[dict]) -> list[dict]:
    """Per layer over the repeats' plans: the kinds chosen for attention and FFN (most
    frequent first) and the mean union density of heads, KV groups and neurons."""
    out = []
    for layer in range(len(records[0]["layers"])):
        rows = [r["layers"][layer] for r in records]
        kinds = lambda part: "|".join(k for k, _ in Counter(r[part] for r in rows).most_common())
        out.append({"layer": layer, "attn": kinds("attn"), "ffn": kinds("ffn"),
                    **{k: round(statistics.mean(r[k] for r in rows), 4) for k in ("heads", "kv_groups", "neurons")}})
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"
