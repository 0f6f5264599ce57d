"""Decode-speed benchmark: dense vs shadowllm / dejavu / static, measured in one run.

The bench model has a realistic shape (vocab 32000, hidden 1024, 16 layers) with RANDOM
weights: speed does not depend on what the weights say, and the output says so. Batch-1
decode on a CPU is bound by reading weights, so the ideal speedup of a method is the ratio
of weight bytes read per dense step to weight bytes read per sparse step.

Configurations are measured round-robin (every repeat visits every configuration), so the
machine's drift hits all of them alike; figures are medians over repeats.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch
from tqdm import tqdm

from adapter.runtime import masks

from adapter.selection import predictors as P
from adapter.selection.methods import make_method
from adapter.config import PredictorConfig, RuntimeConfig
from adapter.runtime.gated import GatedModel

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
                          num_key_value_heads=spec["kv_heads"], max_position_embeddings=512,
                          tie_word_embeddings=False)
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


def _decode_seconds(gm: GatedModel, prompts: list[list[int]], method, steps: int) -> float:
    seqs, last = [], []
    for p in prompts:
        st, logits = gm.prefill(p, method, steps + 1)
        seqs.append(st)
        last.append(logits[0])
    tok = torch.stack(last).argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        tok = gm.decode(seqs, tok).argmax(-1)
    return (time.perf_counter() - start) / steps


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
              batch_size: int = 1, predictor: PredictorConfig = PredictorConfig()) -> dict:
    runtime.apply_threads()
    model, spec = bench_model(arch, quick)
    # room for the three static masks; per-request shadowllm masks churn through the LRU
    gm = GatedModel(model, runtime.model_copy(update={"gather_cache_mb": 4096}))
    shape = gm.shape
    repeats, steps = (3, 16) if quick else (5, 32)
    rng = torch.Generator().manual_seed(1)

    def prompts() -> list[list[int]]:
        return [torch.randint(0, VOCAB, (PROMPT_TOKENS,), generator=rng).tolist() for _ in range(batch_size)]

    unified = P.random_unified(shape, predictor.hidden, predictor.rank_for(shape.layers, shape.ffn))
    dejavu_preds = P.random_dejavu(shape, predictor.dejavu_rank)
    configs: list[tuple[str, float, object]] = [("dense", 0.0, make_method("dense", 0.0))]
    for method in METHODS:
        for s in SPARSITIES:
            if method == "shadowllm":
                configs.append((method, s, make_method("shadowllm", s, shape, unified, mode=runtime.mode,
                                                          head_selection=runtime.head_selection)))
            elif method == "dejavu":
                # decode speed: the prompt runs densely, as in DejaVu's own implementation
                configs.append((method, s, make_method("dejavu", s, shape, dejavu_preds, sparse_prompt=False)))
            else:
                configs.append((method, s, make_method("static", s, shape, P.random_static_scores(shape),
                                                          head_selection=runtime.head_selection)))
    hf = _HFDecoder(model)
    decode = {i: [] for i in range(len(configs))}
    request = {i: [] for i in range(len(configs))}
    pred = {i: [] for i in range(len(configs))}
    hf_decode: list[float] = []
    sample_mask = {}
    with torch.inference_mode():  # warm-up: allocator, kernels, gathered static masks
        for _, _, method in configs:
            gm.generate(prompts(), method, 2)
        hf.per_token_seconds(prompts()[0], 2)
    for _ in tqdm(range(repeats), desc=f"bench {arch}", disable=None):
        if batch_size == 1:
            hf_decode.append(hf.per_token_seconds(prompts()[0], steps))
        for i, (_, _, method) in enumerate(configs):
            ps = prompts()  # fresh prompts: per-request masks differ, gathers are not cached
            decode[i].append(_decode_seconds(gm, ps, method, steps))
            request[i].append(_request_seconds(gm, prompts(), method))
            pred[i].append(_predictor_seconds(gm, method, rng))
            if i not in sample_mask:
                st, _ = gm.prefill(ps[0], method, 0)
                sample_mask[i] = st
    dense_ms = _median_ms(decode[0])
    dense_bytes = step_bytes(gm, None)
    results = []
    for i, (name, s, method) in enumerate(configs):
        st = sample_mask[i]
        per_token = method.counts(shape) if method.per_token else None
        ms = _median_ms(decode[i])
        results.append({
            "method": name, "sparsity": s, "ms_per_token": round(ms, 3),
            "speedup": round(dense_ms / ms, 3),
            "ideal_speedup": round(dense_bytes / step_bytes(gm, st.mask, per_token), 3),
            "predictor_ms": round(_median_ms(pred[i]), 4),
            "request_ms": round(_median_ms(request[i]), 1),
            "effective_sparsity": round(st.effective_sparsity, 4),
        })
    hf_ms = _median_ms(hf_decode) if hf_decode else None
    return {
        "device": _device_name(gm.device), "threads": torch.get_num_threads(),
        "dtype": runtime.dtype, "model": spec, "batch_size": batch_size,
        "prompt_tokens": PROMPT_TOKENS, "request_tokens": REQUEST_TOKENS,
        "decode_steps": steps, "repeats": repeats, "quick": quick,
        "dense_ms_per_token": round(dense_ms, 3),
        "transformers_ms_per_token": None if hf_ms is None else round(hf_ms, 3),
        "wrapped_vs_transformers": None if hf_ms is None else round(dense_ms / hf_ms, 3),
        "dense_request_ms": results[0]["request_ms"],
        "results": results[1:],
        "predictor": {"shadowllm_hidden": predictor.hidden,
                      "shadowllm_neuron_rank": unified.neuron_rank,
                      "dejavu_rank": predictor.dejavu_rank},
        "gather_cache": gm.cache.stats(),
        "torch": torch.__version__,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"
