"""The built-in task suite: families, determinism, disjoint splits."""

from adapter.embedded import suite as tasks


def test_six_families_with_five_shots_each():
    insts = tasks.split("test", 5)
    assert {i.family for i in insts} == set(tasks.FAMILIES) and len(tasks.FAMILIES) >= 6
    for inst in insts:
        assert inst.prompt.count(";") - ("table :" in inst.prompt) == 5, inst.prompt
        assert inst.answer and ";" not in inst.answer


def test_answers_are_correct():
    for inst in tasks.split("validation", 20):
        words = inst.prompt.split()
        if inst.family == "mod_add":
            assert int(inst.answer) == (int(words[-4]) + int(words[-2])) % 10
        elif inst.family == "reverse":
            assert inst.answer.split() == list(reversed(words[-4:-1]))
        elif inst.family == "table_lookup":
            table = inst.prompt.split(";")[0].split(":")[1].split(",")
            assert dict(e.split() for e in table)[words[-2]] == inst.answer
        elif inst.family == "kv_recall":
            assert f"{words[-2]} is {inst.answer} ;" in inst.prompt


def test_splits_are_deterministic_and_disjoint():
    assert tasks.split("test", 30) == tasks.split("test", 30)
    train = {i.prompt for i in tasks.split("train", 2000)}
    for name in ("validation", "test"):
        held = tasks.split(name, 100)
        assert not train & {i.prompt for i in held}
    assert tasks.heldout_text(50) != tasks.plain_text(50)
