"""The embedded default models: the accuracy target and the recipe's training rows."""

import random

from adapter import default_model, tasks
from adapter.evaluate import dense_accuracy


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
        assert marked and all(words[i - 1] in ("=", "is") for i in marked)
        for i in marked:
            key, value = words[i - 2], words[i]
            # the key appeared earlier followed by the value, directly or after "=" / "is"
            assert any(words[j] == key and (words[j + 1] == value or
                                            (words[j + 1] in ("=", "is") and words[j + 2] == value))
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
