"""`shadowgate bench device`, the prepared check for a GPU machine, run here on the CPU so it is
known to work before a device is at hand: sparsity 0 equals transformers and dense."""

import pytest
import torch

from adapter.benchmarks.device_check import check_model
from tests.support import shadowgate


@pytest.mark.parametrize("name", ["default", "default-opt"])
def test_sparsity_zero_matches_transformers_token_for_token(name):
    row = check_model(name, "cpu", "float32", prompts_per_family=1, steps=4)
    assert row["prompts"] == 6 and row["ok"], row
    assert row["max_abs_logit_diff"] <= 1e-3
    assert row["dense_tokens_equal_transformers"] == 1.0
    if name == "default":  # it ships a shadowllm predictor: all units kept gives the dense tokens
        assert row["sparsity0_tokens_equal_dense"] == 1.0
        # the same device and dtype as the reference run: masks and tokens are identical
        assert row["sparse05_masks_equal_cpu"] == 1.0 and row["sparse05_tokens_equal_cpu"] == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_asked_for_without_a_device_is_a_clear_error():
    done = shadowgate("bench", "device", "--device", "cuda", "--no-timings", timeout=120)
    assert done.returncode == 2
    assert "no CUDA device here" in done.stderr and "Traceback" not in done.stderr
