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
        False, description="keep evicted copies' memory (two blocks beyond the budget) and make the "
        "next copies into it once nothing reads it, so a lone request's copy does not fault on fresh "
        "pages: on the 309 M checkpoint sparse/dense 1.37-1.48 at concurrency 1 against 1.13-1.39, "
        "but 0.83-0.97 at concurrency 4 against 0.98-1.05 (docs/SERVING.md)")
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
