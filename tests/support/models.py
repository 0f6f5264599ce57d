"""Tiny models built from a config (random weights, seeded): in memory for the runtime tests,
or saved with save_pretrained like a user's checkpoint for the serving tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig


def tiny_llama(kv_heads: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      attention_bias=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    # attention_bias=True exercises bias gathering; give the biases non-zero values.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def tiny_opt(seed: int = 0):
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=97, hidden_size=64, ffn_dim=96, num_hidden_layers=3,
                    num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def save_tiny_model(folder: Path) -> Path:
    """A small Llama (GQA) with the embedded word-level tokenizer, saved with save_pretrained."""
    from adapter.embedded.recipe import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
