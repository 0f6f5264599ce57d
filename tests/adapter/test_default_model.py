"""The embedded default models: the accuracy target and the recipe's training rows."""

import random

from adapter.embedded import recipe as default_model

from adapter.embedded import suite as tasks
from adapter.evaluation.scoring import dense_accuracy


def test_llama_default_reaches_the_accuracy_target_on_the_test_split():
    # 30 test prompts per family (180 in all); the target is a mean of >= 80%.
    acc = dense_accuracy(str(default_model.default_model_path("llama")), per_family=30)
    assert acc["mean"] >= 0.8, acc
    # the in-context recall families are solved by copying from the prompt, not by guessing
    assert acc["families"]["table_lookup"] >= 0.8 and acc["families"]["kv_recall"] >= 0.8, acc
    assert acc["perplexity"] < 8.0


def test_repeat_rows_mark_only_what_copying_predicts():
    rng = random.Random(0)
    offsets = set()
    for _ in range(200):
        text, marked = default_model._repeat_row(rng)
        words = text.split()
        n = len(marked) + 1
        assert words[-n - 1] == ";" and words[-n:] == words[-2 * n - 1:-n - 1]
        assert marked == list(range(len(words) - n + 1, len(words)))
        offsets.add(len(words) - 2 * n - 1)
    assert len(offsets) > 5  # the copy does not sit at a fixed position


def test_synthetic_recall_values_are_recoverable_from_the_context():
    rng = random.Random(1)
    forms = set()
    for _ in range(300):
        text, marked = default_model._synthetic_recall(rng)
        words = text.split()
        forms.add(words[0] == "table")
        assert marked and all(words[i - 1] in tasks.ANSWER_SEPARATORS for i in marked)
        for i in marked:
            key, value = words[i - 2], words[i]
            # the key appeared earlier followed by the value, directly or after "=" / "is"
            assert any(words[j] == key and (words[j + 1] == value or
                                            (words[j + 1] in tasks.ANSWER_SEPARATORS and words[j + 2] == value))
                       for j in range(i - 2)), (text, i)
        assert all(w in tasks.vocabulary() for w in words)
    assert forms == {True, False}


def test_stage_three_starts_with_repeats_then_mixes_the_suite():
    recipe = default_model.RECIPES["llama"]
    rows = list(default_model._rows(recipe, random.Random(3), recipe.stage3_induction_steps + 2, 3))
    first, mixed = rows[0], rows[-1]
    assert all(marked is not None and ";" in text for text, marked in first)
    suite_rows = [text for text, marked in mixed if marked is None]
    assert suite_rows and any(" = " in t for t in suite_rows)
    assert any(marked is not None for _, marked in mixed)


def _tiny_recipe(**over):
    base = dict(family="llama", hidden=32, layers=2, heads=2, kv_heads=1, ffn=64, steps=3,
                batch_size=4, warmup=1, stage2_steps=2, stage3_steps=3, stage3_induction_steps=1)
    return default_model.RecipeConfig(**{**base, **over})


def test_recipe_is_deterministic_and_resuming_equals_running_through(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model.default_model_path("llama"))
    full = default_model.train_model(_tiny_recipe(), tok, tmp_path / "full", threads=1)
    default_model.train_model(_tiny_recipe(), tok, tmp_path / "again", threads=1)
    assert {"stage1", "stage2", "stage3"} <= full.keys() and full["resumed_from_stage"] == 0
    assert all(full[f"stage{k}"]["train_tokens"] > 0 for k in (1, 2, 3))
    # stage 1 alone, then stages 2-3 resumed from its saved result
    default_model.train_model(_tiny_recipe(stage2_steps=0, stage3_steps=0), tok, tmp_path / "s1", threads=1)
    resumed = default_model.train_model(_tiny_recipe(), tok, tmp_path / "resumed", threads=1,
                                        resume=(1, tmp_path / "s1"))
    assert resumed["resumed_from_stage"] == 1 and "stage1" not in resumed
    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in ("full", "again", "resumed")}
    for name in ("again", "resumed"):
        assert weights[name].keys() == weights["full"].keys()
        assert all(torch.equal(weights[name][k], weights["full"][k]) for k in weights["full"]), name
    # the saved result loads the way a user's checkpoint does
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert model.config.num_key_value_heads == 1 and torch.isfinite(torch.tensor(full["final_loss"]))
