"""The gated runtime: runs a loaded transformers model with per-sequence sparsity.

Per request: layer 0 runs densely over the whole prompt; the output of its attention block
at the selection position (the last prompt token) goes to the method, which returns ONE
mask for the sequence; layers >= 1 then run on gathered weights (smaller matmuls) for the
rest of the prompt and every decode step. Skipped heads are never computed: each layer's KV
cache holds only the kept KV groups. DejaVu-style methods instead pick units per token in
decode, with all KV groups computed so their cache stays complete.

Per-request state lives in a `Sequence` value that the caller holds and passes back; the
model object holds nothing per request (concurrent requests never share mutable state).

Shapes: B batch, T tokens, D model dim, H/G query/KV heads, Dh head dim, Kh/Kg kept heads
and groups, K kept neurons, V vocab, C cache capacity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence as Seq

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from adapter.runtime import masks
from adapter.runtime.model_view import ModelView, Shape
from adapter.config import RuntimeConfig
from adapter.runtime.gather import AttnWeights, FfnWeights, GatherCache, LayerWeights, head_rows
from adapter.selection.base import SelectionMethod


class RequestError(ValueError):
    """A request the model cannot run (too long, bad ids): a client error, not a crash."""


@dataclass
class Sequence:
    method: object
    mask: masks.Mask
    weights: list[LayerWeights]
    k: list[torch.Tensor]  # per layer (Kg_l, C, Dh)
    v: list[torch.Tensor]
    length: int  # tokens written to the cache
    predictor_input: torch.Tensor  # (D,) layer-0 attention output at the selection position
    effective_sparsity: float

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Generation:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    method: str
    sparsity: float
    effective_sparsity: float
    mask: masks.Mask
    logprobs: list[float] = field(default_factory=list)  # of the chosen tokens
    predictor_input: torch.Tensor | None = None  # (D,) what selected the mask (drift features)


class GatedModel:
    def __init__(self, model, config: RuntimeConfig | None = None):
        self.config = config or RuntimeConfig()
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.config.dtype]
        self.device = torch.device(self.config.resolved_device())
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.view = ModelView(self.model)
        self.shape: Shape = self.view.shape
        self.cache = GatherCache(self.view.layers, self.shape, self.config.gather_cache_mb << 20)
        self.scale = self.shape.head_dim ** -0.5
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self._dejavu_t: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def from_pretrained(cls, path: str, config: RuntimeConfig | None = None) -> "GatedModel":
        from transformers import AutoModelForCausalLM

        return cls(AutoModelForCausalLM.from_pretrained(path), config)

    # ---- building blocks ------------------------------------------------------------------
    def _qkv(self, w: AttnWeights, x: torch.Tensor):
        """x (T, D) -> q (T, Kh*Dh), k, v (T, Kg*Dh)."""
        if len(w.qkv) == 1:
            return F.linear(x, *w.qkv[0]).split([w.q_width, w.kv_width, w.kv_width], dim=-1)
        return tuple(F.linear(x, wt, b) for wt, b in w.qkv)

    def _attend(self, st: Sequence, layer: int, q, k, v, n_heads: int, n_groups: int,
                q2g: torch.Tensor | None, rope, pos0: int) -> torch.Tensor:
        """One sequence: q (T, Kh*Dh), k/v (T, Kg*Dh) at positions pos0.. -> (T, Kh*Dh).

        Writes k/v into the layer's cache; q2g maps each query head to its cache slot when
        the kept heads are not spread evenly over the kept groups."""
        t, dh = q.shape[0], self.shape.head_dim
        q = q.view(t, n_heads, dh).transpose(0, 1)
        k = k.view(t, n_groups, dh).transpose(0, 1)
        v = v.view(t, n_groups, dh).transpose(0, 1)
        if rope is not None:
            q, k = apply_rotary_pos_emb(q, k, rope[0], rope[1], unsqueeze_dim=0)
        end = pos0 + t
        st.k[layer][:, pos0:end] = k
        st.v[layer][:, pos0:end] = v
        keys, vals = st.k[layer][:, :end], st.v[layer][:, :end]
        if q2g is not None:
            keys, vals = keys.index_select(0, q2g), vals.index_select(0, q2g)
        mask, causal = None, False
        if t > 1 and pos0 == 0:
            causal = True
        elif t > 1:
            mask = (torch.arange(end, device=q.device)[None, :]
                    <= torch.arange(pos0, end, device=q.device)[:, None])
        out = F.scaled_dot_product_attention(
            q[None], keys[None], vals[None], attn_mask=mask, is_causal=causal, scale=self.scale,
            enable_gqa=q2g is None and n_heads != keys.shape[0])
        return out[0].transpose(0, 1).reshape(t, n_heads * dh)

    def _ffn(self, layer: int, w: FfnWeights, x: torch.Tensor) -> torch.Tensor:
        act = self.view.layers[layer].act
        if w.gated:
            if len(w.inp) == 1:
                gate, up = F.linear(x, *w.inp[0]).split(w.width, dim=-1)
            else:
                gate, up = F.linear(x, *w.inp[0]), F.linear(x, *w.inp[1])
            a = act(gate) * up
        else:
            a = act(F.linear(x, *w.inp[0]))
        return F.linear(a, w.w_down, w.b_down)

    @staticmethod
    def _block(h, norm, fn, pre_norm: bool):
        """Residual block; returns (new hidden, block output)."""
        if pre_norm:
            out = fn(norm(h))
            return h + out, out
        out = fn(h)
        return norm(h + out), out

    def _seq_layer(self, st: Sequence, layer: int, h: torch.Tensor, rope, pos0: int):
        """One sequence through one layer on its gathered weights; returns (h, attn block out)."""
        ref, w = self.view.layers[layer], st.weights[layer]

        def attn(x):
            q, k, v = self._qkv(w.attn, x)
            o = self._attend(st, layer, q, k, v, w.attn.n_heads, w.attn.n_groups, w.attn.q2g, rope, pos0)
            return F.linear(o, w.attn.wo, w.attn.bo)

        h, attn_out = self._block(h, ref.attn_norm, attn, ref.pre_norm)
        h, _ = self._block(h, ref.ffn_norm, lambda x: self._ffn(layer, w.ffn, x), ref.pre_norm)
        return h, attn_out

    # ---- prefill --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: Seq[int], method, max_new_tokens: int = 0, select_at: int | None = None,
                all_logits: bool = False) -> tuple[Sequence, torch.Tensor]:
        """Run the prompt; returns the sequence state and logits (1, V), or (T, V) with
        all_logits. `select_at` is the position whose layer-0 attention output selects the
        mask (default: the last token); scoring passes prompt+continuation and the last
        prompt position, which gives the same mask as a prefill of the prompt alone."""
        t = len(ids)
        if t == 0:
            raise RequestError("the prompt is empty")
        if t + max_new_tokens > self.max_positions:
            raise RequestError(f"prompt ({t} tokens) + max_tokens ({max_new_tokens}) exceeds the "
                               f"model's context of {self.max_positions} tokens")
        ids_t = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)
        if int(ids_t.min()) < 0 or int(ids_t.max()) >= self.shape.vocab:
            raise RequestError(f"token ids must be in [0, {self.shape.vocab})")
        pos = torch.arange(t, device=self.device)
        h = self.view.embed(ids_t, pos)
        rope = self.view.rope(h, pos)
        cap = t + max_new_tokens
        dense = self.cache.dense()
        method = method.placed(h.device, h.dtype)  # its predictor on the model's device
        st = Sequence(method=method, mask=None, weights=dense, k=[], v=[], length=0,
                      predictor_input=None, effective_sparsity=0.0)
        self._alloc(st, 0, self.shape.kv_heads, cap, h.dtype)
        h, attn0 = self._seq_layer(st, 0, h, rope, 0)
        st.predictor_input = attn0[t - 1 if select_at is None else select_at]
        st.mask = method.choose(self.shape, st.predictor_input)
        st.weights = self.cache.get(st.mask)
        st.effective_sparsity = self._effective(method, st.mask)
        for layer in range(1, self.shape.layers):
            self._alloc(st, layer, st.weights[layer].attn.n_groups, cap, h.dtype)
            if method.per_token and method.sparse_prompt:
                # per-token selection on prompt tokens too, one token at a time (causal: each
                # token's keys are cached before the next token of the same layer attends)
                h = torch.cat([self._dejavu_layer(st, layer, h[i:i + 1],
                                                  None if rope is None else (rope[0][i:i + 1], rope[1][i:i + 1]), i)
                               for i in range(t)])
            else:
                h, _ = self._seq_layer(st, layer, h, rope, 0)
        st.length = t
        return st, self.view.logits(h if all_logits else h[-1:])

    @torch.inference_mode()
    def predictor_input(self, ids: Seq[int]) -> torch.Tensor:
        """The (D,) input a method selects from, for a prompt: layer 0 only, the same code
        path as prefill (drift references need only this, not the whole model)."""
        if not ids:
            raise RequestError("the prompt is empty")
        t = len(ids)
        ids_t = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)
        pos = torch.arange(t, device=self.device)
        h = self.view.embed(ids_t, pos)
        st = Sequence(method=None, mask=None, weights=self.cache.dense(), k=[], v=[], length=0,
                      predictor_input=None, effective_sparsity=0.0)
        self._alloc(st, 0, self.shape.kv_heads, t, h.dtype)
        _, attn0 = self._seq_layer(st, 0, h, self.view.rope(h, pos), 0)
        return attn0[t - 1]

    def _alloc(self, st: Sequence, layer: int, groups: int, cap: int, dtype) -> None:
        shape = (groups, cap, self.shape.head_dim)
        st.k.append(torch.empty(shape, dtype=dtype, device=self.device))
        st.v.append(torch.empty(shape, dtype=dtype, device=self.device))
        assert len(st.k) == layer + 1

    def _effective(self, method: SelectionMethod, mask: masks.Mask) -> float:
        return method.effective_sparsity(self.shape, mask)

    # ---- decode ---------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], tokens: torch.Tensor) -> torch.Tensor:
        """One step for a batch: tokens (B,) -> logits (B, V). Sequences sharing a mask run
        their projections as one matmul; attention is per sequence (own cache)."""
        for st in seqs:
            if st.length >= st.capacity:
                raise RequestError("the sequence reached its max_tokens capacity")
        b = len(seqs)
        pos = torch.tensor([st.length for st in seqs], device=self.device)
        h = self.view.embed(tokens.to(self.device), pos)  # (B, D)
        cos_sin = self.view.rope(h, pos)
        groups: dict[object, list[int]] = {}
        for i, st in enumerate(seqs):
            key = ("token", i) if st.method.per_token else st.mask.key
            groups.setdefault(key, []).append(i)
        if len(groups) == 1 and not seqs[0].method.per_token:  # one shared mask: no row shuffling
            for layer in range(self.shape.layers):
                h = self._group_layer(seqs, layer, h, cos_sin)
            for st in seqs:
                st.length += 1
            return self.view.logits(h)
        for layer in range(self.shape.layers):
            out = torch.empty_like(h)
            for key, idx in groups.items():
                if key[0] == "token" and layer > 0:
                    i = idx[0]
                    out[i] = self._dejavu_layer(seqs[i], layer, h[i:i + 1], self._rope_rows(cos_sin, [i]))[0]
                else:
                    rows = torch.tensor(idx, device=self.device)
                    out.index_copy_(0, rows, self._group_layer([seqs[i] for i in idx], layer,
                                                               h.index_select(0, rows),
                                                               self._rope_rows(cos_sin, idx)))
            h = out
        for st in seqs:
            st.length += 1
        return self.view.logits(h)

    @staticmethod
    def _rope_rows(cos_sin, idx: list[int]):
        if cos_sin is None:
            return None
        return cos_sin[0][idx], cos_sin[1][idx]

    def _group_layer(self, seqs: list[Sequence], layer: int, h: torch.Tensor, rope) -> torch.Tensor:
        """Sequences with the same weights for `layer`, one new token each: h (n, D)."""
        ref, w = self.view.layers[layer], seqs[0].weights[layer]

        def attn(x):
            q, k, v = self._qkv(w.attn, x)
            outs = [self._attend(st, layer, q[j:j + 1], k[j:j + 1], v[j:j + 1], w.attn.n_heads,
                                 w.attn.n_groups, w.attn.q2g,
                                 None if rope is None else (rope[0][j:j + 1], rope[1][j:j + 1]),
                                 st.length)
                    for j, st in enumerate(seqs)]
            return F.linear(torch.cat(outs), w.attn.wo, w.attn.bo)

        h, _ = self._block(h, ref.attn_norm, attn, ref.pre_norm)
        h, _ = self._block(h, ref.ffn_norm, lambda x: self._ffn(layer, w.ffn, x), ref.pre_norm)
        return h

    def _transposed(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """o_proj and down_proj stored (in, D) so a per-token gather of kept inputs is one
        embedding_bag that reads only the kept rows. Built on first DejaVu use; costs one
        extra copy of those two matrices per layer."""
        if self._dejavu_t is None:
            self._dejavu_t = [(ref.wo.t().contiguous(), ref.w_down.t().contiguous())
                              for ref in self.view.layers]
        return self._dejavu_t

    def _dejavu_layer(self, st: Sequence, layer: int, h: torch.Tensor, rope, pos: int | None = None) -> torch.Tensor:
        """DejaVu-style layer for one token h (1, D): the predictor picks heads and neurons
        from the hidden state entering the layer; all KV groups are computed and cached."""
        ref, method, shape = self.view.layers[layer], st.method, self.shape
        wo_t, wd_t = self._transposed()[layer]
        kh, kf = method.counts(shape)
        heads, neurons = method.units(layer, h[0], kh, kf)
        rows_q = head_rows(heads, shape.head_dim)

        def attn(x):
            q = F.linear(x, ref.wq.index_select(0, rows_q), None if ref.bq is None else ref.bq[rows_q])
            k, v = F.linear(x, ref.wk, ref.bk), F.linear(x, ref.wv, ref.bv)
            q2g = heads // shape.group_size
            o = self._attend(st, layer, q, k, v, kh, shape.kv_heads, q2g, rope, st.length if pos is None else pos)
            out = F.embedding_bag(rows_q[None], wo_t, per_sample_weights=o, mode="sum")
            return out if ref.bo is None else out + ref.bo

        def ffn(x):
            z = F.linear(x, ref.w_in.index_select(0, neurons), None if ref.b_in is None else ref.b_in[neurons])
            a = ref.act(z)
            if ref.w_up is not None:
                a = a * F.linear(x, ref.w_up.index_select(0, neurons))
            out = F.embedding_bag(neurons[None], wd_t, per_sample_weights=a, mode="sum")
            return out if ref.b_down is None else out + ref.b_down

        h, _ = self._block(h, ref.attn_norm, attn, ref.pre_norm)
        h, _ = self._block(h, ref.ffn_norm, ffn, ref.pre_norm)
        return h

    # ---- whole requests ---------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prompt: Seq[int], continuation: Seq[int], method) -> torch.Tensor:
        """Logits (len(continuation), V) predicting each continuation token, teacher-forced,
        with the mask chosen from the prompt alone (as a real generation would)."""
        if not continuation:
            return torch.empty(0, self.shape.vocab)
        if method.per_token:
            st, logits = self.prefill(prompt, method, len(continuation))
            rows = [logits[0]]
            for tok in continuation[:-1]:
                rows.append(self.decode([st], torch.tensor([tok]))[0])
            return torch.stack(rows).float().cpu()
        ids = list(prompt) + list(continuation)
        _, logits = self.prefill(ids, method, 0, select_at=len(prompt) - 1, all_logits=True)
        return logits[len(prompt) - 1: len(ids) - 1].float().cpu()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], methods, max_new_tokens: int,
                 sampling: list[SamplingParams] | SamplingParams | None = None,
                 stop_ids: Seq[int] = ()) -> list[Generation]:
        """Batched generation: per-request prefill, then batched decode steps over the
        sequences still running. `methods` is one method or one per prompt."""
        n = len(prompts)
        methods = methods if isinstance(methods, list) else [methods] * n
        if not isinstance(sampling, list):
            sampling = [sampling or SamplingParams()] * n
        gens = [torch.Generator(device="cpu").manual_seed(p.seed) if p.seed is not None else None
                for p in sampling]
        states, last = [], []
        for ids, method in zip(prompts, methods):
            st, logits = self.prefill(ids, method, max_new_tokens)
            states.append(st)
            last.append(logits[0])
        out_ids: list[list[int]] = [[] for _ in range(n)]
        out_lp: list[list[float]] = [[] for _ in range(n)]
        finish = ["length"] * n
        active = list(range(n)) if max_new_tokens > 0 else []
        logits = torch.stack(last) if n else None
        stop = set(stop_ids)
        while active:
            toks, lps = pick_tokens(logits, [sampling[i] for i in active], [gens[i] for i in active])
            still = []
            for j, i in enumerate(active):
                tok = int(toks[j])  # the token goes back to the caller: one host copy per step
                out_ids[i].append(tok)
                out_lp[i].append(float(lps[j]))
                if tok in stop:
                    finish[i] = "stop"
                elif len(out_ids[i]) < max_new_tokens:
                    still.append((j, i))
            if not still:
                break
            active = [i for _, i in still]
            logits = self.decode([states[i] for i in active], toks[[j for j, _ in still]])
        return [Generation(token_ids=out_ids[i], finish_reason=finish[i], method=methods[i].name,
                           sparsity=methods[i].sparsity, effective_sparsity=states[i].effective_sparsity,
                           mask=states[i].mask, logprobs=out_lp[i], predictor_input=states[i].predictor_input)
                for i in range(n)]


def pick_tokens(logits: torch.Tensor, params: list[SamplingParams], gens) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) -> chosen tokens (B,) and their log-probabilities (B,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    toks = logp.argmax(-1)
    for j, p in enumerate(params):
        if p.temperature > 0:
            probs = torch.softmax(logits[j].float() / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < p.top_p
                probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
            toks[j] = torch.multinomial(probs.cpu(), 1, generator=gens[j])[0]
    return toks, logp.gather(-1, toks[:, None])[:, 0]
