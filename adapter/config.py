"""Typed configuration of the sparsity core. Built once at the entry point and passed down."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


class RuntimeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (CPU); None: torch default")
    gather_cache_mb: int = Field(512, ge=0, description="byte budget of the gathered-weights LRU")
    gather_recycle: bool = Field(
        True, description="keep evicted copies' memory (two spare blocks beyond the budget, made and "
        "touched with the first copy) and make the next copies into it once nothing reads it, so a "
        "copy does not fault on fresh pages (70 ms and more per copy of the 309 M checkpoint); decode "
        "plans' union copies get two blocks of their own. With prompt_copy_tokens, sparse/dense on it "
        "1.32-1.37 at concurrency 1, 0.96-1.14 at 4, 1.09-1.16 at 16; without recycling 1.25-1.30, "
        "0.90-1.00 and 1.10-1.13 (docs/SERVING.md)")
    prompt_copy_tokens: int | None = Field(
        32, ge=1, description="a request that joins a busy batch has its prompt run on a copy of its "
        "mask's weights when the prompt holds at least this many tokens: (1 - s) of the prompt's FLOPs "
        "repay the copy (on the 309 M checkpoint the break-even is near 30 tokens: at 45 a third less "
        "time than the prompt on the full weights with the mask applied, copy included); the sequence "
        "does not keep the copy (its decode steps share the batch's products), the gather cache does "
        "while its budget lasts. None: such prompts always run on the full weights (dense FLOPs)")
    mode: Literal["per_layer", "global"] = Field(
        "global", description="global: one budget over all gated layers (at 600 test prompts it keeps "
        "0.873 accuracy at 0.7 against 0.735 per_layer, and ties at 0.5; docs/RESULTS.md); per_layer: "
        "the same share in every layer")
    head_selection: Literal["heads", "groups"] = Field(
        "heads", description="heads: top-k over query heads; groups: score KV groups, keep the "
        "top groups and heads inside them only, so that under GQA the nominal sparsity is also "
        "the KV-cache saving (adapter/runtime/masks.py)")

    batch_heads: bool = Field(
        False, description="a decode step over rows with distinct masks may run attention on the "
        "batch's own heads (as many as a row keeps, those most rows keep; each row attends with "
        "those of its cached KV groups) when the byte model says so: the shared projections read "
        "fewer bytes, and a row's heads depend on its batch; a request joining a busy batch is "
        "prefilled on them too (docs/SERVING.md)")
    batch_neurons: bool = Field(
        False, description="the same for FFN neurons: every row of such a step runs the batch's "
        "most-kept neurons instead of its own or the union")
    batch_keep: float = Field(
        1.0, ge=1.0, le=8.0, description="how many units the batch keeps where it runs on its own "
        "units, as a multiple of what its rows keep on average (at most the union of their units): "
        "1.0 saves the most bytes; more keeps more of each row's own heads and neurons, for quality, "
        "at fewer bytes saved (docs/SERVING.md)")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def apply_threads(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)


class PredictorConfig(BaseModel):
    """Shapes of the predictors (paper: a 2048-wide unified MLP)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden: int = Field(2048, ge=8, description="width of the unified (shadowllm) predictor")
    neuron_rank: int = Field(0, ge=0, description="rank of the factored neuron output; 0: full, "
                             "auto-chosen when (L-1)*F*hidden would exceed max_neuron_params")
    max_neuron_params: int = Field(8_000_000, ge=1)
    dejavu_rank: int = Field(128, ge=4, description="width of each per-layer dejavu predictor")

    def rank_for(self, layers: int, ffn: int) -> int:
        if self.neuron_rank or (layers - 1) * ffn * self.hidden <= self.max_neuron_params:
            return self.neuron_rank
        return 128
