"""The embedded OPT default: its recipe's stage 3 and what the shipped weights score."""

import json
import random
from dataclasses import asdict

import pytest

from adapter.embedded import recipe as default_model
from adapter.evaluation.scoring import dense_accuracy


def test_opt_default_reaches_the_accuracy_target_on_the_test_split():
    # 30 test prompts per family (180 in all), the same target as the Llama default's.
    acc = dense_accuracy(str(default_model.default_model_path("opt")), per_family=30)
    assert acc["mean"] >= 0.8, acc
    # the recall families are solved by copying from the prompt: a guess among the prompt's
    # values scores about 0.2 (the stage-1 weights scored 0.19 and 0.09)
    assert acc["families"]["table_lookup"] >= 0.8 and acc["families"]["kv_recall"] >= 0.8, acc
    assert acc["perplexity"] < 8.0


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_shipped_weights_record_the_recipe_in_the_code(family):
    build = json.loads((default_model.default_model_path(family) / "build.json").read_text())
    assert build["recipe"] == asdict(default_model.RECIPES[family])
    assert build["stage3"]["threads"] == default_model.RECIPES[family].stage3_threads


def test_opt_recipe_has_stage_three_with_a_longer_repeat_phase():
    opt, llama = default_model.RECIPES["opt"], default_model.RECIPES["llama"]
    assert opt.stage2_steps == 0 and opt.stage3_threads is not None
    assert opt.stage3_steps > opt.stage3_induction_steps > llama.stage3_induction_steps
    rows = list(default_model._rows(opt, random.Random(5), opt.stage3_induction_steps + 1, 3))
    # the last repeat-only step: every row is a repeat with loss on the copied words only
    last_repeat, first_mixed = rows[-2], rows[-1]
    for text, marked in last_repeat:
        words = text.split()
        n = len(marked) + 1
        assert words[-n:] == words[-2 * n - 1:-n - 1]
    assert any(marked is None and " = " in text for text, marked in first_mixed)


def test_opt_recipe_resumes_from_stage_one_and_equals_running_through(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model.default_model_path("opt"))
    base = dict(family="opt", hidden=32, layers=2, heads=2, kv_heads=2, ffn=64, steps=3,
                batch_size=4, warmup=1, stage3_steps=3, stage3_induction_steps=2, stage3_threads=1)
    recipe = default_model.RecipeConfig(**base)
    full = default_model.train_model(recipe, tok, tmp_path / "full", threads=1)
    assert "stage2" not in full and full["stage3"]["train_tokens"] > 0
    default_model.train_model(default_model.RecipeConfig(**{**base, "stage3_steps": 0}), tok,
                              tmp_path / "s1", threads=1)
    # a build asked for 2 threads still runs stage 3 with the 1 thread its recipe records
    resumed = default_model.train_model(recipe, tok, tmp_path / "resumed", threads=2,
                                        resume=(1, tmp_path / "s1"))
    assert resumed["resumed_from_stage"] == 1 and "stage3" in resumed and "stage1" not in resumed
    assert resumed["stage3"]["threads"] == 1
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "full").config.model_type == "opt"
