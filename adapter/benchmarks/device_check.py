"""One prepared check of the runtime on a device (`shadowgate bench device`): correctness at
sparsity 0 against plain transformers on that device, the shipped predictors running there,
then batch-1 and batch-8 decode timings of the 309 M shape (adapter/benchmarks/decode_speed).

Correctness, for each embedded default (Llama with GQA, OPT) and each dtype asked for:
- the gated model's prompt logits at sparsity 0 against transformers' own forward on the
  same device and dtype (max abs difference), and greedy tokens of both decode loops;
- shadowllm at sparsity 0 (every unit kept) gives the dense tokens;
- shadowllm at 0.5 on the device against the same prompts on the CPU in float32: the share
  of equal masks and of equal tokens (a different device sums in another order, so a mask
  near a tie may differ; these are reported, not required)."""

from __future__ import annotations

import time

import torch

from adapter.config import RuntimeConfig
from adapter.embedded import suite
from adapter.embedded.recipe import default_predictor_dir
from adapter.evaluation.scoring import encode_pairs
from adapter.pipeline import traces
from adapter.runtime.loading import load
from adapter.selection import artifact
from adapter.selection.methods import dense

MODELS = ("default", "default-opt")
# max abs logit difference against transformers that counts as equal, per dtype
LOGIT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25}


def _hf_greedy(model, prompt: list[int], steps: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """transformers' own forward and cache: the prompt's last logits and `steps` greedy tokens."""
    out = model(torch.tensor([prompt], device=device), use_cache=True)
    first = out.logits[0, -1].float().cpu()
    cache, tok, tokens = out.past_key_values, out.logits[:, -1:].argmax(-1), []
    for _ in range(steps):
        tokens.append(int(tok))
        out = model(tok, past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return first, tokens


def _shadowllm(loaded, sparsity: float):
    """The shipped shadowllm predictor of an embedded default, or None where it ships none."""
    folder = default_predictor_dir(loaded.name) / "shadowllm-plainact"
    if not (folder / "predictor.json").exists():
        return None
    rt = loaded.runtime
    lp = artifact.load_predictor(folder, rt.shape, traces.model_fingerprint(rt.model))
    return lp.method(sparsity, rt.config.mode, rt.shape, rt.config.head_selection)


def check_model(name: str, device: str, dtype: str, prompts_per_family: int = 2, steps: int = 16) -> dict:
    from transformers import AutoModelForCausalLM

    loaded = load(name, RuntimeConfig(device=device, dtype=dtype))
    rt = loaded.runtime
    hf = AutoModelForCausalLM.from_pretrained(loaded.path).to(device=rt.device, dtype=rt.model.dtype).eval()
    prompts = [p for p, _ in encode_pairs(loaded.tokenizer, suite.split("test", prompts_per_family))]
    full = _shadowllm(loaded, 0.0)
    half = _shadowllm(loaded, 0.5)
    if half is None:
        cpu = None
    elif rt.device.type == "cpu" and dtype == "float32":  # already the reference: no second load
        cpu = loaded
    else:
        cpu = load(name, RuntimeConfig(device="cpu", dtype="float32"))
    cpu_half = half if cpu is loaded else (_shadowllm(cpu, 0.5) if cpu is not None else None)
    diffs, same_dense, same_full, same_mask, same_half = [], 0, 0, 0, 0
    with torch.inference_mode():
        for p in prompts:
            ref_logits, ref_tokens = _hf_greedy(hf, p, steps, rt.device)
            _, logits = rt.prefill(p, dense(), 0)
            diffs.append(float((logits[0].float().cpu() - ref_logits).abs().max()))
            got = rt.generate([p], dense(), steps)[0].token_ids
            same_dense += got == ref_tokens
            if full is not None:
                same_full += rt.generate([p], full, steps)[0].token_ids == got
            if half is not None:
                a, b = rt.generate([p], half, steps)[0], cpu.runtime.generate([p], cpu_half, steps)[0]
                same_mask += a.mask.key == b.mask.key  # a content hash of every layer's kept units
                same_half += a.token_ids == b.token_ids
    n = len(prompts)
    row = {"model": name, "device": str(rt.device), "dtype": dtype, "prompts": n, "steps": steps,
           "max_abs_logit_diff": round(max(diffs), 6), "logit_tolerance": LOGIT_TOLERANCE[dtype],
           "dense_tokens_equal_transformers": same_dense / n,
           "sparsity0_tokens_equal_dense": None if full is None else same_full / n,
           "sparse05_masks_equal_cpu": None if half is None else same_mask / n,
           "sparse05_tokens_equal_cpu": None if half is None else same_half / n}
    # float32 must agree token for token; bfloat16 rounds differently from transformers'
    # fused kernels, so there only the logits' closeness and sparsity 0 == dense are required
    row["ok"] = (row["max_abs_logit_diff"] <= row["logit_tolerance"]
                 and (dtype != "float32" or row["dense_tokens_equal_transformers"] == 1.0)
                 and row["sparsity0_tokens_equal_dense"] in (None, 1.0))
    return row


def run_check(device: str = "cuda", dtypes: tuple[str, ...] = ("float32", "bfloat16"),
              timings: bool = True, prompts_per_family: int = 2, steps: int = 16,
              batches: tuple[int, ...] = (1, 8)) -> dict:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("no CUDA device here (torch.cuda.is_available() is False); use --device cpu")
    start = time.perf_counter()
    rows = [check_model(m, device, d, prompts_per_family, steps) for d in dtypes for m in MODELS]
    out = {"device": device, "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda")
           else "cpu", "torch": torch.__version__, "correctness": rows,
           "ok": all(r["ok"] for r in rows)}
    if timings:
        from adapter.benchmarks.decode_speed import run_speed

        out["timings"] = {d: run_speed(RuntimeConfig(device=device, dtype=d), batch_size=batches,
                                       methods=("shadowllm", "static"), sparsities=(0.5,))
                          for d in dtypes}
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out
