"""Views onto a loaded transformers model: the same weights and sub-modules, laid out the
way the gated runtime reads them. Nothing here copies a modeling file; the runtime calls
the model's own norms, embeddings, rotary embedding and lm_head, and reads the projection
weights to gather the kept rows/columns from them.

Shapes: D model dim, H query heads, G KV heads (groups), Dh head dim, F FFN dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

LLAMA_FAMILY = {"llama", "mistral", "qwen2"}
OPT_FAMILY = {"opt"}


class UnsupportedModel(ValueError):
    pass


@dataclass(frozen=True)
class Shape:
    family: str  # "llama" | "opt"
    layers: int
    hidden: int  # D
    heads: int  # H
    kv_heads: int  # G
    head_dim: int  # Dh
    ffn: int  # F
    vocab: int  # V

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class LayerRefs:
    """One decoder layer's weights (references, never copies) and its callables."""

    attn_norm: nn.Module
    ffn_norm: nn.Module
    wq: torch.Tensor  # (H*Dh, D)
    wk: torch.Tensor  # (G*Dh, D)
    wv: torch.Tensor  # (G*Dh, D)
    wo: torch.Tensor  # (D, H*Dh)
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    bo: torch.Tensor | None
    w_in: torch.Tensor  # gated: gate_proj (F, D); mlp: fc1 (F, D)
    w_up: torch.Tensor | None  # gated only: up_proj (F, D)
    w_down: torch.Tensor  # (D, F)
    b_in: torch.Tensor | None
    b_down: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]
    pre_norm: bool  # False only for OPT-350m style post-norm layers


class ModelView:
    """Family-specific plumbing around the loaded model: embedding, positions, final head."""

    def __init__(self, model: nn.Module):
        self.model = model
        cfg = model.config
        kind = getattr(cfg, "model_type", "")
        if kind in LLAMA_FAMILY:
            self.family = "llama"
            self._build_llama(cfg)
        elif kind in OPT_FAMILY:
            self.family = "opt"
            self._build_opt(cfg)
        else:
            raise UnsupportedModel(
                f"model_type {kind!r} is not supported: the gated runtime knows the Llama family "
                f"({', '.join(sorted(LLAMA_FAMILY))}) and OPT"
            )

    # ---- Llama family: RMSNorm, RoPE, GQA, gated SiLU FFN -------------------------------
    def _build_llama(self, cfg) -> None:
        inner = self.model.model
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            # Mistral-style windows would need a windowed cache; refuse rather than be wrong.
            if cfg.model_type == "mistral":
                raise UnsupportedModel("sliding-window attention is not supported by the gated runtime")
        attn0 = inner.layers[0].self_attn
        self.shape = Shape(
            family="llama", layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
            heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
            head_dim=attn0.head_dim, ffn=cfg.intermediate_size, vocab=cfg.vocab_size,
        )
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(LayerRefs(
                attn_norm=layer.input_layernorm, ffn_norm=layer.post_attention_layernorm,
                wq=a.q_proj.weight, wk=a.k_proj.weight, wv=a.v_proj.weight, wo=a.o_proj.weight,
                bq=a.q_proj.bias, bk=a.k_proj.bias, bv=a.v_proj.bias, bo=a.o_proj.bias,
                w_in=m.gate_proj.weight, w_up=m.up_proj.weight, w_down=m.down_proj.weight,
                b_in=m.gate_proj.bias, b_down=m.down_proj.bias, act=m.act_fn, pre_norm=True,
            ))
        if any(getattr(layer.mlp.up_proj, "bias", None) is not None for layer in inner.layers):
            raise UnsupportedModel("biased up_proj is not supported")
        self._embed = inner.embed_tokens
        self._rotary = inner.rotary_emb
        self._final_norm = inner.norm

    def _build_opt(self, cfg) -> None:
        dec = self.model.model.decoder
        if dec.project_in is not None or dec.project_out is not None:
            self._project_in, self._project_out = dec.project_in, dec.project_out
        else:
            self._project_in = self._project_out = None
        heads = cfg.num_attention_heads
        self.shape = Shape(
            family="opt", layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=heads,
            kv_heads=heads, head_dim=cfg.hidden_size // heads, ffn=cfg.ffn_dim, vocab=cfg.vocab_size,
        )
        self.layers = []
        for layer in dec.layers:
            a = layer.self_attn
            self.layers.append(LayerRefs(
                attn_norm=layer.self_attn_layer_norm, ffn_norm=layer.final_layer_norm,
                wq=a.q_proj.weight, wk=a.k_proj.weight, wv=a.v_proj.weight, wo=a.out_proj.weight,
                bq=a.q_proj.bias, bk=a.k_proj.bias, bv=a.v_proj.bias, bo=a.out_proj.bias,
                w_in=layer.fc1.weight, w_up=None, w_down=layer.fc2.weight,
                b_in=layer.fc1.bias, b_down=layer.fc2.bias, act=layer.activation_fn,
                pre_norm=layer.do_layer_norm_before,
            ))
        self._embed = dec.embed_tokens
        self._positions = dec.embed_positions
        self._final_norm = dec.final_layer_norm

    # ---- shared entry points --------------------------------------------------------------
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids, positions: (N,) -> (N, D)."""
        h = self._embed(ids)
        if self.family == "opt":
            if self._project_in is not None:
                h = self._project_in(h)
            h = h + self._positions.weight[positions + self._positions.offset]
        return h

    def rope(self, h: torch.Tensor, positions: torch.Tensor):
        """(cos, sin), each (N, Dh), for Llama; None for OPT (learned absolute positions)."""
        if self.family != "llama":
            return None
        cos, sin = self._rotary(h[None], positions[None])
        return cos[0], sin[0]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(N, D) final hidden -> (N, V)."""
        if self._final_norm is not None:
            h = self._final_norm(h)
        if self.family == "opt" and self._project_out is not None:
            h = self._project_out(h)
        return self.model.lm_head(h)

    def weight_bytes(self) -> dict:
        """Bytes of weights read per decode step, split into the gateable part of each layer
        and the rest (embedding row, final norm, lm_head)."""
        layer_bytes = []
        for ref in self.layers:
            tensors = [ref.wq, ref.wk, ref.wv, ref.wo, ref.w_in, ref.w_down]
            if ref.w_up is not None:
                tensors.append(ref.w_up)
            layer_bytes.append(sum(t.numel() * t.element_size() for t in tensors))
        head = self.model.lm_head.weight
        return {"layers": layer_bytes, "head": head.numel() * head.element_size()}
