"""The embedded default models and the deterministic recipe that builds them.

`shadowgate model build` trains a word-level tokenizer on the task suite's vocabulary, then
a small Llama (GQA: 8 query heads share 2 KV heads) and a smaller OPT on the suite's train
split plus grammar text, and saves both with save_pretrained. The weights are committed
under adapter/default_models/; the recipe reproduces them (seeded, single process; torch
CPU kernels are deterministic for a fixed thread count, so build with the same
`--threads`). Loading takes the same path as a user's checkpoint:
AutoModelForCausalLM.from_pretrained.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from adapter import tasks

DEFAULT_MODELS_DIR = Path(__file__).parent / "default_models"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]


@dataclass(frozen=True)
class RecipeConfig:
    family: str  # "llama" or "opt"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    steps: int
    batch_size: int = 48
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.05
    text_fraction: float = 0.1
    seed: int = 0
    max_positions: int = 128
    stage2_steps: int = 0
    stage2_lr: float = 5e-4
    stage2_induction: float = 0.25
    stage2_threads: int | None = None  # stage 2 was run single-threaded (it shared the machine)


RECIPES = {
    "llama": RecipeConfig("llama", hidden=256, layers=6, heads=8, kv_heads=2, ffn=512, steps=1500,
                         stage2_steps=500, stage2_threads=1),
    "opt": RecipeConfig("opt", hidden=128, layers=4, heads=4, kv_heads=4, ffn=512, steps=400),
}


def default_model_path(family: str = "llama") -> Path:
    return DEFAULT_MODELS_DIR / family


def resolve_model(name: str) -> str:
    """'default' / 'default-llama' / 'default-opt' -> the embedded path; anything else is a
    local directory or hub id handed to from_pretrained unchanged."""
    aliases = {"default": "llama", "default-llama": "llama", "default-opt": "opt"}
    if name in aliases:
        path = default_model_path(aliases[name])
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"embedded model {name!r} is missing at {path}: run `shadowgate model build`"
            )
        return str(path)
    return name


def build_tokenizer():
    """Word-level tokenizer trained on the suite's text (every word of the grammar)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    corpus = [inst.text for inst in tasks.split("train", 200)] + tasks.plain_text(2000)
    corpus.append(" ".join(tasks.vocabulary()))  # every word, even ones sampling missed
    tok.train_from_iterator(corpus, trainer=trainer)
    # add_special_tokens=True prepends <bos>, as users' tokenizers commonly do.
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
        eos_token="<eos>", clean_up_tokenization_spaces=False,
    )


def make_config(recipe: RecipeConfig, tokenizer):
    from transformers import LlamaConfig, OPTConfig

    ids = dict(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=recipe.max_positions, tie_word_embeddings=True,
    )
    if recipe.family == "llama":
        return LlamaConfig(
            hidden_size=recipe.hidden, intermediate_size=recipe.ffn,
            num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
            num_key_value_heads=recipe.kv_heads, rms_norm_eps=1e-5, rope_theta=10000.0, **ids,
        )
    return OPTConfig(
        hidden_size=recipe.hidden, ffn_dim=recipe.ffn, num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads, word_embed_proj_dim=recipe.hidden,
        do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        **ids,
    )


def _rows(recipe: RecipeConfig, rng: random.Random, n: int, stage2: bool):
    """Training rows (text) for n steps. Stage 1: suite instances plus grammar text. Stage 2
    adds rows that only induction solves (a random word sequence, ";", the same sequence
    again) and draws half of the suite rows from the two in-context recall families: the
    copy-from-context circuit they need forms slowly from the suite alone."""
    train = tasks.split("train", 20_000)
    text = tasks.plain_text(50_000)
    rng.shuffle(train)
    recall = [inst for inst in train if inst.family in ("table_lookup", "kv_recall")]
    words = [w for w in tasks.vocabulary() if w != ";"]
    cursor = 0
    for _ in range(n):
        rows = []
        for _ in range(recipe.batch_size):
            r = rng.random()
            if r < recipe.text_fraction:
                k = rng.randrange(len(text) - 6)
                rows.append(" ".join(text[k:k + 6]))
            elif stage2 and r < recipe.text_fraction + recipe.stage2_induction:
                seq = " ".join(rng.choice(words) for _ in range(rng.randrange(8, 17)))
                rows.append(f"{seq} ; {seq} ;")
            elif stage2 and rng.random() < 0.5:
                rows.append(rng.choice(recall).text + " ;")
            elif stage2:
                rows.append(rng.choice(train).text + " ;")
            else:
                rows.append(train[cursor % len(train)].text + " ;")
                cursor += 1
        yield rows


def _train_stage(model, tokenizer, recipe: RecipeConfig, steps: int, lr: float, seed: int,
                 stage2: bool, desc: str) -> tuple[int, float]:
    """AdamW, linear warm-up then cosine to 5% of lr; loss on every real token."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        frac = (step - recipe.warmup) / max(1, steps - recipe.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    tokens, loss = 0, torch.tensor(0.0)
    bar = tqdm(_rows(recipe, random.Random(seed), steps, stage2), total=steps, desc=desc)
    for step, rows in enumerate(bar):
        enc = tokenizer([f"<bos> {r}" for r in rows], padding=True, return_tensors="pt",
                        add_special_tokens=False)
        ids = enc["input_ids"][:, : recipe.max_positions]
        mask = enc["attention_mask"][:, : recipe.max_positions]
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tokens += int(mask.sum())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return tokens, float(loss.detach())


def train_model(recipe: RecipeConfig, tokenizer, out_dir: Path, threads: int,
                resume_stage1: Path | None = None) -> dict:
    """Both stages of the recipe. `resume_stage1` starts from a saved stage-1 result (the
    same weights stage 1 produces with the same threads), to skip recomputing it."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    start = time.perf_counter()
    tokens = 0
    if resume_stage1 is not None:
        model = AutoModelForCausalLM.from_pretrained(resume_stage1).float()
    else:
        torch.manual_seed(recipe.seed)
        model = AutoModelForCausalLM.from_config(make_config(recipe, tokenizer)).float()
        tokens, loss = _train_stage(model, tokenizer, recipe, recipe.steps, recipe.lr, recipe.seed,
                                    False, f"train {recipe.family} stage 1")
    if recipe.stage2_steps:
        torch.set_num_threads(recipe.stage2_threads or threads)
        torch.manual_seed(recipe.seed + 1)
        t2, loss = _train_stage(model, tokenizer, recipe, recipe.stage2_steps, recipe.stage2_lr,
                                recipe.seed + 1, True, f"train {recipe.family} stage 2")
        tokens += t2
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"train_seconds": round(time.perf_counter() - start, 1), "train_tokens": tokens,
            "params": sum(p.numel() for p in model.parameters()), "final_loss": round(loss, 4),
            "resumed_stage1": resume_stage1 is not None}


def build(families: list[str], out_root: Path, threads: int = 2,
          steps: dict[str, int] | None = None, resume_stage1: dict[str, Path] | None = None) -> dict:
    """Run the recipe for `families`; returns the figures written to build.json."""
    from adapter.evaluate import dense_accuracy

    tokenizer = build_tokenizer()
    report = {}
    for family in families:
        recipe = RECIPES[family]
        if steps and family in steps:
            recipe = RecipeConfig(**{**asdict(recipe), "steps": steps[family]})
        out_dir = out_root / family
        figures = train_model(recipe, tokenizer, out_dir, threads, (resume_stage1 or {}).get(family))
        figures["test_accuracy"] = dense_accuracy(str(out_dir), per_family=100)
        figures["recipe"] = asdict(recipe)
        figures["threads"] = threads
        (out_dir / "build.json").write_text(json.dumps(figures, indent=2) + "\n")
        report[family] = figures
    return report


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip("/"))[-80:]


def default_predictor_dir(name: str) -> Path:
    """Where trained predictors of model `name` live by default: the embedded models ship
    theirs beside their weights; other models use runs/predictors/<slug>."""
    aliases = {"default": "llama", "default-llama": "llama", "default-opt": "opt"}
    if name in aliases:
        return default_model_path(aliases[name]) / "predictors"
    return Path("runs/predictors") / _slug(name)


def default_trace_dir(name: str) -> Path:
    aliases = {"default": "llama", "default-llama": "llama", "default-opt": "opt"}
    return Path("data/traces") / aliases.get(name, _slug(name))
