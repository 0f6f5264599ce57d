"""The built-in few-shot task suite the embedded default model is trained and evaluated on.

Six families with exact-match answers. A prompt is five solved shots and one query, each
shot ends with " ;" and the answer follows the query's "=" separator, so the model must
infer the task (and, for the recall families, the prompt's own mapping) from context:

  table_lookup  table : cat red , dog blue , ... ; cat = red ; ... ; dog =        -> blue
  kv_recall     owl is pink ; cat is red ; owl is pink ; ... ; cat is            -> red
  mod_add       3 + 4 = 7 ; ... ; 8 + 5 =                                         -> 3
  reverse       rev b d a = a d b ; ... ; rev c a h =                             -> h a c
  successor     seq 2 4 6 = 8 ; ... ; seq 7 8 9 =                                 -> 0
  lexicon       review good bad fine = pos ; ... ; review sad dull nice =         -> neg

Instances are generated from seeded RNGs; the splits use disjoint seeds and the validation
and test splits drop any prompt whose text appears in the training split.
Plain text from a small grammar (same vocabulary) gives held-out text for perplexity.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator

DIGITS = [str(d) for d in range(10)]
LETTERS = list("abcdefgh")
ANIMALS = ["cat", "dog", "fox", "owl", "bee", "ant", "elk", "yak"]
COLORS = ["red", "blue", "green", "pink", "gray", "gold", "teal", "tan"]
POSITIVE = ["good", "fine", "nice", "great", "happy", "fun", "calm", "kind"]
NEGATIVE = ["bad", "sad", "dull", "poor", "rude", "ugly", "cold", "grim"]
FUNCTION_WORDS = [
    ";", "=", ",", ":", "+", "is", "rev", "seq", "review", "table", "pos", "neg",
    "the", "a", "sees", "likes", "chases", "near", "and", ".", "very", "big", "small",
]
SPLIT_SEEDS = {"train": 1_000, "validation": 2_000, "test": 3_000, "text": 4_000, "traffic": 5_000}
EVAL_RESERVE = 1_000  # instances per family of validation and test that traffic never repeats
N_SHOTS = 5


@dataclass(frozen=True)
class Instance:
    family: str
    prompt: str  # ends with the query's separator, no trailing space
    answer: str  # space-separated answer tokens

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


def vocabulary() -> list[str]:
    """Every word the suite and the plain-text grammar can produce."""
    words = DIGITS + LETTERS + ANIMALS + COLORS + POSITIVE + NEGATIVE + FUNCTION_WORDS
    return list(dict.fromkeys(words))


def _table_lookup(rng: random.Random) -> tuple[list[tuple[str, str]], str]:
    keys = rng.sample(ANIMALS, 5)
    values = rng.sample(COLORS, 5)
    table = dict(zip(keys, values))
    header = "table : " + " , ".join(f"{k} {v}" for k, v in table.items()) + " ;"
    pairs = [(f"{k} =", table[k]) for k in (rng.choice(keys) for _ in range(N_SHOTS + 1))]
    return pairs, header


def _kv_recall(rng: random.Random) -> tuple[list[tuple[str, str]], str]:
    # Four keys over six examples: most keys repeat, so values are recalled from context.
    keys = rng.sample(ANIMALS, 4)
    mapping = dict(zip(keys, rng.sample(COLORS, 4)))
    shots = [rng.choice(keys) for _ in range(N_SHOTS)]
    query = rng.choice(shots)
    return [(f"{k} is", mapping[k]) for k in shots + [query]], ""


def _mod_add(rng: random.Random) -> tuple[list[tuple[str, str]], str]:
    pairs = []
    for _ in range(N_SHOTS + 1):
        a, b = rng.randrange(10), rng.randrange(10)
        pairs.append((f"{a} + {b} =", str((a + b) % 10)))
    return pairs, ""


def _reverse(rng: random.Random) -> tuple[list[tuple[str, str]], str]:
    pairs = []
    for _ in range(N_SHOTS + 1):
        word = rng.sample(LETTERS, 3)
        pairs.append(("rev " + " ".join(word) + " =", " ".join(reversed(word))))
    return pairs, ""


def _successor(rng: random.Random) -> tuple[list[tuple[str, str]], str]:
    pairs = []
    for _ in range(N_SHOTS + 1):
        start, step = rng.randrange(10), rng.choice([1, 2, 3])
        terms = [str((start + i * step) % 10) for i in range(4)]
        pairs.append(("seq " + " ".join(terms[:3]) + " =", terms[3]))
    return pairs, ""


def _lexicon(rng: random.Random) -> tuple[list[tuple[str, str]], str]:
    pairs = []
    for _ in range(N_SHOTS + 1):
        n_pos = rng.randrange(4)
        words = rng.sample(POSITIVE, n_pos) + rng.sample(NEGATIVE, 3 - n_pos)
        rng.shuffle(words)
        pairs.append(("review " + " ".join(words) + " =", "pos" if n_pos >= 2 else "neg"))
    return pairs, ""


FAMILIES: dict[str, Callable[[random.Random], tuple[list[tuple[str, str]], str]]] = {
    "table_lookup": _table_lookup,
    "kv_recall": _kv_recall,
    "mod_add": _mod_add,
    "reverse": _reverse,
    "successor": _successor,
    "lexicon": _lexicon,
}


def make_instance(family: str, rng: random.Random) -> Instance:
    pairs, header = FAMILIES[family](rng)
    shots = " ".join(f"{q} {a} ;" for q, a in pairs[:-1])
    query, answer = pairs[-1]
    prompt = " ".join(part for part in (header, shots, query) if part)
    return Instance(family=family, prompt=prompt, answer=answer)


def _generate(split: str, per_family: int, seed_offset: int = 0) -> Iterator[Instance]:
    rng = random.Random(SPLIT_SEEDS[split] + seed_offset)
    for i in range(per_family):
        for family in FAMILIES:
            yield make_instance(family, rng)


def split(name: str, per_family: int) -> list[Instance]:
    """`per_family` instances of every family for split `name` (train, validation, test,
    traffic).

    Held-out splits never contain a prompt of the training split (checked against the
    first 20,000 training instances per family, more than any recipe trains on). The traffic
    split (what scenarios send as client requests) also never repeats one of the first
    EVAL_RESERVE validation or test prompts per family, so accuracy is measured on prompts
    never sent as traffic."""
    if name not in ("train", "validation", "test", "traffic"):
        raise ValueError(f"unknown split {name!r}: use train, validation, test or traffic")
    if name == "train":
        return list(_generate("train", per_family))
    seen = _train_prompts() | (_eval_prompts() if name == "traffic" else set())
    out: list[Instance] = []
    counts = {f: 0 for f in FAMILIES}
    rng = random.Random(SPLIT_SEEDS[name])
    while min(counts.values()) < per_family:
        for family in FAMILIES:
            inst = make_instance(family, rng)
            if counts[family] < per_family and inst.prompt not in seen:
                out.append(inst)
                counts[family] += 1
    return out


_TRAIN_PROMPTS: set[str] | None = None


def _train_prompts() -> set[str]:
    global _TRAIN_PROMPTS
    if _TRAIN_PROMPTS is None:
        _TRAIN_PROMPTS = {inst.prompt for inst in _generate("train", 20_000)}
    return _TRAIN_PROMPTS


_EVAL_PROMPTS: set[str] | None = None


def _eval_prompts() -> set[str]:
    global _EVAL_PROMPTS
    if _EVAL_PROMPTS is None:
        _EVAL_PROMPTS = {i.prompt for s in ("validation", "test") for i in split(s, EVAL_RESERVE)}
    return _EVAL_PROMPTS


def plain_text(n_sentences: int, seed_offset: int = 0) -> list[str]:
    """Sentences from a small grammar over the suite's nouns and adjectives."""
    rng = random.Random(SPLIT_SEEDS["text"] + seed_offset)
    adjectives = COLORS + POSITIVE + NEGATIVE + ["big", "small"]

    def noun_phrase() -> str:
        det = rng.choice(["the", "a"])
        adj = f" {rng.choice(['very ', ''])}{rng.choice(adjectives)}" if rng.random() < 0.6 else ""
        return f"{det}{adj} {rng.choice(ANIMALS)}"

    out = []
    for _ in range(n_sentences):
        clause = f"{noun_phrase()} {rng.choice(['sees', 'likes', 'chases'])} {noun_phrase()}"
        if rng.random() < 0.3:
            clause += f" near {noun_phrase()}"
        if rng.random() < 0.2:
            clause += f" and {noun_phrase()}"
        out.append(clause + " .")
    return out


def heldout_text(n_sentences: int = 400) -> list[str]:
    """Held-out plain text (a disjoint seed stream from the one used in training)."""
    return plain_text(n_sentences, seed_offset=1)


ANSWER_SEPARATORS = ("=", "is")


def shot_answer_word_positions(prompt: str) -> list[int]:
    """Word indices (0-based, in prompt.split()) of the in-context shots' answers: the words
    after a separator up to the closing ";". The query's own answer is not in the prompt."""
    words = prompt.split()
    positions, inside = [], False
    for i, w in enumerate(words):
        if w == ";":
            inside = False
        elif inside:
            positions.append(i)
        elif w in ANSWER_SEPARATORS:
            inside = True
    # the query's separator is the last word: nothing follows it
    return positions
