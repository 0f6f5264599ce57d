"""The gated runtime: runs a loaded transformers model with per-sequence sparsity.

Per request: layer 0 runs densely over the whole prompt; the output of its attention block
at the selection position (the last prompt token) goes to the method, which returns ONE
mask for the sequence; layers >= 1 then run on gathered weights (smaller matmuls) for the
rest of the prompt and every decode step. Skipped heads are never computed: each layer's KV
cache holds only the kept KV groups. DejaVu-style methods instead pick units per token in
decode, with all KV groups computed so their cache stays complete.

A decode step over a batch of distinct masks follows the batch's plan (gather.build_plan),
built once per batch composition: per layer, per-mask products, one product over the union
of the rows' kept units, or a dense one, whichever reads the fewest weight bytes; each row's
own mask is applied to its result, and attention stays per sequence.

Per-request state lives in a `Sequence` value that the caller holds and passes back; the
model object holds nothing per request (concurrent requests never share mutable state).

Shapes: B batch, T tokens, D model dim, H/G query/KV heads, Dh head dim, Kh/Kg kept heads
and groups, K kept neurons, V vocab, C cache capacity.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence as Seq

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from adapter.pipeline import traces
from adapter.runtime import masks
from adapter.runtime.model_view import ModelView, Shape
from adapter.config import RuntimeConfig
from adapter.runtime.gather import (UNION_HORIZON_STEPS, AttnLayout, AttnPlan, AttnWeights, BatchPlan,
                                    FfnPlan, FfnWeights, GatherCache, HeadSlots, LayerPlan, LayerWeights, MaskGroup,
                                    PlanCache, PlanKind, attn_layout, build_plan, head_rows,
                                    in_groups, mask_layouts)
from adapter.selection.base import SelectionMethod


class RequestError(ValueError):
    """A request the model cannot run (too long, bad ids): a client error, not a crash."""


@dataclass
class Sequence:
    method: object
    mask: masks.Mask
    k: list[torch.Tensor]  # per layer (Kg_l, C, Dh)
    v: list[torch.Tensor]
    length: int  # tokens written to the cache
    predictor_input: torch.Tensor  # (D,) layer-0 attention output at the selection position
    effective_sparsity: float
    own: list[LayerWeights] | None = None  # the mask's gathered weights, once made
    layouts: list[AttnLayout | AttnWeights] | None = None  # per layer: its kept heads (no copy)
    gather: Callable[[], list[LayerWeights]] | None = None  # makes (or finds) `own`
    gather_ms: float = 0.0  # of its prefill, the time spent finding or copying `own`
    gather_faults: int = 0  # the process's minor page faults meanwhile (fresh memory the copy touched)

    @property
    def weights(self) -> list[LayerWeights]:
        """The mask's gathered weights, made on first use: a sequence that only ever runs in
        shared (union or dense) products of a batch never pays for a copy of its own."""
        if self.own is None:
            self.own = self.gather()
        return self.own

    @property
    def gathered(self) -> bool:
        return self.own is not None

    def attn_layout(self, layer: int) -> AttnLayout | AttnWeights:
        """The layer's kept heads and groups (n_heads, n_groups, q2g), without gathering."""
        return self.own[layer].attn if self.own is not None else self.layouts[layer]

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
        traces.pin_fingerprint_once(model)  # the identity of the weights as given, before the cast
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.view = ModelView(self.model)
        self.shape: Shape = self.view.shape
        self.cache = GatherCache(self.view.layers, self.shape, self.config.gather_cache_mb << 20,
                                 self.config.gather_recycle)
        # decode plans of batch compositions (content-keyed values, like the gather cache)
        self.plans = PlanCache(self.config.gather_cache_mb << 20)
        self.plan_horizon = UNION_HORIZON_STEPS
        # parts a decode step of distinct masks may run on the batch's own units
        self.batch_parts = frozenset(p for p, on in (("attn", self.config.batch_heads),
                                                     ("ffn", self.config.batch_neurons)) if on)
        self.batch_kept: dict = {}  # the last batch units per (part, layer), with their copies
        self.batch_keep = self.config.batch_keep  # batch units per a row's kept units
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
                q2g: HeadSlots | torch.Tensor | None, rope, pos0: int) -> torch.Tensor:
        """One sequence: q (T, Kh*Dh), k/v (T, Kg*Dh) at positions pos0.. -> (T, Kh*Dh).

        Writes k/v into the layer's cache. When the kept heads are not spread evenly over the
        kept groups, q2g says where each query head reads: HeadSlots (a mask's layout: the
        queries padded to plain GQA, the cache read as it is), or a tensor (Kh,) of each
        head's cache slot (DejaVu's per-token heads: the cache's rows are selected)."""
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
        slots = q2g if isinstance(q2g, HeadSlots) else None
        if slots is not None:
            q, q2g = q.index_select(0, slots.pad), None  # (Kg*P, T, Dh)
        elif q2g is not None:
            keys, vals = keys.index_select(0, q2g), vals.index_select(0, q2g)
        mask, causal = None, False
        if t > 1 and pos0 == 0:
            causal = True
        elif t > 1:
            mask = (torch.arange(end, device=q.device)[None, :]
                    <= torch.arange(pos0, end, device=q.device)[:, None])
        out = F.scaled_dot_product_attention(
            q[None], keys[None], vals[None], attn_mask=mask, is_causal=causal, scale=self.scale,
            enable_gqa=q2g is None and q.shape[0] != keys.shape[0])[0]
        if slots is not None:
            out = out.index_select(0, slots.real)  # (Kh, T, Dh)
        return out.transpose(0, 1).reshape(t, n_heads * dh)

    def _ffn(self, layer: int, w: FfnWeights, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (n, D) -> (n, D). keep (n, K): each row's own units among w's (batch plans);
        the others' activations are zeroed before the down projection."""
        act = self.view.layers[layer].act
        if w.gated:
            if len(w.inp) == 1:
                gate, up = F.linear(x, *w.inp[0]).split(w.width, dim=-1)
            else:
                gate, up = F.linear(x, *w.inp[0]), F.linear(x, *w.inp[1])
            a = act(gate) * up
        else:
            a = act(F.linear(x, *w.inp[0]))
        if keep is not None:
            a = a * keep
        return F.linear(a, w.w_down, w.b_down)

    @staticmethod
    def _block(h, norm, fn, pre_norm: bool):
        """Residual block; returns (new hidden, block output)."""
        if pre_norm:
            out = fn(norm(h))
            return h + out, out
        out = fn(h)
        return norm(h + out), out

    def _seq_layer(self, st: Sequence, layer: int, h: torch.Tensor, rope, pos0: int,
                   w: LayerWeights | None = None):
        """One sequence through one layer on its gathered weights (or `w`); returns (h, attn
        block out)."""
        ref, w = self.view.layers[layer], w or st.weights[layer]

        def attn(x):
            q, k, v = self._qkv(w.attn, x)
            o = self._attend(st, layer, q, k, v, w.attn.n_heads, w.attn.n_groups, w.attn.q2g, rope, pos0)
            return F.linear(o, w.attn.wo, w.attn.bo)

        h, attn_out = self._block(h, ref.attn_norm, attn, ref.pre_norm)
        h, _ = self._block(h, ref.ffn_norm, lambda x: self._ffn(layer, w.ffn, x), ref.pre_norm)
        return h, attn_out

    def _masked_layer(self, st: Sequence, layer: int, h: torch.Tensor, rope, pos0: int) -> torch.Tensor:
        """One sequence through one layer on the model's own weights with its mask applied:
        the kept heads' q/k/v taken out of the full projections (the cache holds only the
        kept groups, as on gathered weights), the skipped heads' outputs left zero before o,
        the skipped neurons' activations zeroed before down. The same result as the gathered
        layer up to float reassociation, at the dense FLOPs and without a copy: for the
        prefill of a sequence that will decode inside a batch's shared products.

        With batch units on (`batch_parts`), those parts run on the batch's kept units instead,
        where the runtime holds them for this layer (`batch_kept`, the copies the batch's decode
        steps read): (1 - s) of the FLOPs and no copy, and the units the sequence's decode
        steps get inside that batch (its own mask then no longer applies to that part)."""
        lm, dense = st.mask.layers[layer], self.cache.dense()[layer]
        if lm.full:
            return self._seq_layer(st, layer, h, rope, pos0, dense)[0]
        ref, lay = self.view.layers[layer], st.layouts[layer]
        kept_attn = self._kept_attn(lm, layer) if "attn" in self.batch_parts else None
        kept_ffn = self.batch_kept.get(("ffn", layer)) if "ffn" in self.batch_parts else None

        def attn(x):
            if kept_attn is not None:  # the batch's heads of this sequence's groups
                w, rows_q, rows_kv, row = kept_attn
            else:
                w, rows_q, rows_kv, row = dense.attn, lay.rows_q, lay.rows_kv, lay
            q, k, v = self._qkv(w, x)  # (T, Hw*Dh), (T, Gw*Dh), (T, Gw*Dh)
            q, k, v = q.index_select(1, rows_q), k.index_select(1, rows_kv), v.index_select(1, rows_kv)
            o = self._attend(st, layer, q, k, v, row.n_heads, lay.n_groups, row.q2g, rope, pos0)
            full = o.new_zeros(o.shape[0], w.q_width).index_copy_(1, rows_q, o)
            return F.linear(full, w.wo, w.bo)

        def ffn(x):
            if kept_ffn is not None:  # every row of the batch runs its neurons
                return self._ffn(layer, kept_ffn.weights, x)
            keep = x.new_zeros(self.shape.ffn).index_fill_(0, lm.neurons.to(x.device), 1)
            return self._ffn(layer, dense.ffn, x, keep)

        h, _ = self._block(h, ref.attn_norm, attn, ref.pre_norm)
        h, _ = self._block(h, ref.ffn_norm, ffn, ref.pre_norm)
        return h

    def _kept_attn(self, lm: masks.LayerMask, layer: int):
        """The batch's kept heads of one layer as a sequence with layer mask `lm` attends
        with them inside that batch: (their copy, its q columns of the sequence's heads, its
        k/v columns of the sequence's groups, the heads' layout), or None where there are no
        kept heads, the copy lacks one of the sequence's KV groups, or none of its heads
        falls in them."""
        kept = self.batch_kept.get(("attn", layer))
        if kept is None or not bool(torch.isin(lm.groups, kept.groups).all()):
            return None
        dh = self.shape.head_dim
        ours = in_groups(kept.units, lm.groups, self.shape)
        heads = kept.units[ours]
        if heads.numel() == 0:
            return None
        device = kept.weights.wo.device
        at_h = ours.nonzero().squeeze(1)  # the heads' slots in the copy
        at_g = torch.searchsorted(kept.groups, lm.groups)
        row = attn_layout(heads.to(device), lm.groups.to(device), self.shape)
        return kept.weights, head_rows(at_h, dh).to(device), head_rows(at_g, dh).to(device), row

    # ---- prefill --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: Seq[int], method, max_new_tokens: int = 0, select_at: int | None = None,
                all_logits: bool = False, gather: bool = True) -> tuple[Sequence, torch.Tensor]:
        """Run the prompt; returns the sequence state and logits (1, V), or (T, V) with
        all_logits. `select_at` is the position whose layer-0 attention output selects the
        mask (default: the last token); scoring passes prompt+continuation and the last
        prompt position, which gives the same mask as a prefill of the prompt alone.

        `gather`: run the prompt on the mask's gathered weights (copied now unless cached),
        what a sequence that decodes alone needs; False runs it on the full weights with the
        mask applied (no copy) when the gathered ones are not cached, for a sequence that
        joins a busy batch, whose decode steps share union or dense products; its copy is
        made later only if a plan asks for it (`Sequence.weights`). A prompt of at least
        runtime.prompt_copy_tokens runs on its mask's copy all the same, for (1 - s) of the
        FLOPs, and the sequence lets go of the copy after (the cache keeps it while its budget
        lasts). With batch units on (`batch_parts`), such a prompt runs the layers the batch
        holds units for on those units' copies instead (no copy, (1 - s) of the FLOPs;
        `_masked_layer`)."""
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
        st = Sequence(method=method, mask=None, k=[], v=[], length=0, predictor_input=None,
                      effective_sparsity=0.0)
        self._alloc(st, 0, self.shape.kv_heads, cap, h.dtype)
        h, attn0 = self._seq_layer(st, 0, h, rope, 0, dense[0])
        st.predictor_input = attn0[t - 1 if select_at is None else select_at]
        st.mask = method.choose(self.shape, st.predictor_input)
        st.gather = lambda mask=st.mask: self.cache.get(mask)
        # a joiner's long prompt repays a copy it does not keep (its decode shares the batch's products)
        for_prompt = not gather and self._copy_for_prompt(method, st.mask, t)
        if gather or for_prompt or self.cache.has(st.mask):
            t0, f0 = time.perf_counter(), self.cache.faults
            st.own = self.cache.get(st.mask)
            st.gather_ms = (time.perf_counter() - t0) * 1000
            st.gather_faults = self.cache.faults - f0  # counted by the cache while it copied
        else:
            st.layouts = self._layouts(st.mask)
        st.effective_sparsity = self._effective(method, st.mask)
        for layer in range(1, self.shape.layers):
            self._alloc(st, layer, st.attn_layout(layer).n_groups, cap, h.dtype)
            if method.per_token and method.sparse_prompt:
                # per-token selection on prompt tokens too, one token at a time (causal: each
                # token's keys are cached before the next token of the same layer attends)
                h = torch.cat([self._dejavu_layer(st, layer, h[i:i + 1],
                                                  None if rope is None else (rope[0][i:i + 1], rope[1][i:i + 1]), i)
                               for i in range(t)])
            elif st.gathered:
                h, _ = self._seq_layer(st, layer, h, rope, 0)
            else:
                h = self._masked_layer(st, layer, h, rope, 0)
        st.length = t
        if for_prompt:  # let the cache evict (or recycle) the copy; a plan that wants it asks again
            st.own, st.layouts = None, self._layouts(st.mask)
        return st, self.view.logits(h if all_logits else h[-1:])

    def _layouts(self, mask: masks.Mask) -> list[AttnLayout | AttnWeights]:
        dense = self.cache.dense()
        return [lay or d.attn for lay, d in zip(mask_layouts(self.view.layers, mask, self.shape), dense)]

    def _copy_for_prompt(self, method, mask: masks.Mask, t: int) -> bool:
        """Whether a prompt of t tokens that would run on the full weights (a joiner's) should
        run on its mask's copy instead: long enough to repay it (runtime.prompt_copy_tokens),
        and not when batch units give it (1 - s) of the FLOPs without a copy."""
        n = self.config.prompt_copy_tokens
        return (n is not None and t >= n and not mask.dense and not self.batch_parts
                and not (method.per_token and method.sparse_prompt))

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
        st = Sequence(method=None, mask=None, k=[], v=[], length=0, predictor_input=None,
                      effective_sparsity=0.0, own=self.cache.dense())
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
    def batch_plan(self, seqs: list[Sequence], force: PlanKind | None = None,
                   horizon: int | None = None) -> BatchPlan:
        """How a decode step over these sequences shares its products, layer by layer
        (gather.build_plan). Cached by the rows' mask keys in row order, so it is built when
        the batch's composition changes, not per token. `horizon`: the steps the caller
        expects this composition to last (default plan_horizon); it weighs a union copy
        when the plan is built, and a cached plan stands. `force` (tests) is never cached."""
        @torch.inference_mode()  # its union copies may go into blocks made under inference mode
        def build() -> BatchPlan:
            return build_plan(self.view.layers, self.shape, [st.mask for st in seqs],
                              [st.method.per_token for st in seqs], max(1, horizon or self.plan_horizon),
                              force, [st.gathered for st in seqs], self.batch_parts, self.batch_kept,
                              self.batch_keep, self.cache.scratch())

        if force is not None:
            return build()
        rows = ("token" if st.method.per_token else st.mask.key for st in seqs)
        return self.plans.get((self.batch_parts, self.batch_keep, *rows), build)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], tokens: torch.Tensor, plan: BatchPlan | None = None,
               horizon: int | None = None) -> torch.Tensor:
        """One step for a batch: tokens (B,) -> logits (B, V). Per layer the batch's plan
        runs its projections per distinct mask, or once over the union of the rows' kept
        units, or once densely, whichever reads the fewest weight bytes; every row gets its
        own mask's result. Attention is per sequence (own kept heads, own cache). `plan`:
        one from batch_plan (default: the cached one); `horizon`: see batch_plan."""
        for st in seqs:
            if st.length >= st.capacity:
                raise RequestError("the sequence reached its max_tokens capacity")
        if plan is None:
            plan = self.batch_plan(seqs, horizon=horizon)
        pos = torch.tensor([st.length for st in seqs], device=self.device)
        h = self.view.embed(tokens.to(self.device), pos)  # (B, D)
        cos_sin = self.view.rope(h, pos)
        for layer, lp in enumerate(plan.layers):
            token_rows = plan.token_rows if layer > 0 else ()
            if lp.rows is None and not token_rows:
                h = self._plan_layer(seqs, layer, h, cos_sin, lp)
                continue
            out = torch.empty_like(h)
            if lp.members:
                out.index_copy_(0, lp.rows, self._plan_layer(
                    [seqs[i] for i in lp.members], layer, h.index_select(0, lp.rows),
                    self._rope_sel(cos_sin, lp.rows), lp))
            for i in token_rows:
                out[i] = self._dejavu_layer(seqs[i], layer, h[i:i + 1], self._rope_row(cos_sin, i))[0]
            h = out
        for st in seqs:
            st.length += 1
        return self.view.logits(h)

    @staticmethod
    def _rope_row(cos_sin, j: int):
        return None if cos_sin is None else (cos_sin[0][j:j + 1], cos_sin[1][j:j + 1])

    @staticmethod
    def _rope_sel(cos_sin, rows: torch.Tensor | None):
        if cos_sin is None or rows is None:
            return cos_sin
        return cos_sin[0].index_select(0, rows), cos_sin[1].index_select(0, rows)

    def _plan_layer(self, seqs: list[Sequence], layer: int, h: torch.Tensor, rope, lp: LayerPlan) -> torch.Tensor:
        """The layer's rows, one new token each: h (n, D) -> (n, D)."""
        ref = self.view.layers[layer]
        h, _ = self._block(h, ref.attn_norm, lambda x: self._plan_attn(seqs, layer, x, rope, lp.attn), ref.pre_norm)
        h, _ = self._block(h, ref.ffn_norm, lambda x: self._plan_ffn(seqs, layer, x, lp.ffn), ref.pre_norm)
        return h

    def _group_weights(self, seqs: list[Sequence], g: MaskGroup, layer: int) -> LayerWeights:
        """The weights a mask group's product runs on: a full layer's are the model's own;
        else a row's copy, one that has it already if any (rows sharing this layer's mask
        may differ in others), made now otherwise."""
        st = next((seqs[j] for j in g.members if seqs[j].gathered), seqs[g.members[0]])
        if not st.gathered and st.mask.layers[layer].full:
            return self.cache.dense()[layer]
        return st.weights[layer]

    def _per_mask(self, groups: tuple[MaskGroup, ...], x: torch.Tensor, rope, fn) -> torch.Tensor:
        """fn(group, its rows of x, their rope) per group of rows sharing a layer mask."""
        if len(groups) == 1 and groups[0].rows is None:  # one mask: no row shuffling
            return fn(groups[0], x, rope)
        out = torch.empty_like(x)
        for g in groups:
            out.index_copy_(0, g.rows, fn(g, x.index_select(0, g.rows), self._rope_sel(rope, g.rows)))
        return out

    def _plan_attn(self, seqs: list[Sequence], layer: int, x: torch.Tensor, rope, ap: AttnPlan) -> torch.Tensor:
        if ap.kind == "per_mask":
            return self._per_mask(ap.groups, x, rope, lambda g, xs, rs: self._attn_rows(
                [seqs[j] for j in g.members], layer, xs, rs, self._group_weights(seqs, g, layer).attn))
        # one projection over the layout's heads (union, all, or the batch's); each row takes
        # its heads and groups out of it and attends over its own cache
        w, n = ap.weights, x.shape[0]
        q, k, v = self._qkv(w, x)  # (n, Hu*Dh), (n, Gu*Dh), (n, Gu*Dh)
        qs = q.reshape(-1).index_select(0, ap.q_idx).split(ap.q_split)
        ks = k.reshape(-1).index_select(0, ap.kv_idx).split(ap.kv_split)
        vs = v.reshape(-1).index_select(0, ap.kv_idx).split(ap.kv_split)
        outs = []
        for j, st in enumerate(seqs):
            own = st.attn_layout(layer)
            # batch: the batch's heads of this row's cached groups; else its own heads
            n_heads, q2g = ap.row_heads[j] if ap.row_heads else (own.n_heads, own.q2g)
            outs.append(self._attend(st, layer, qs[j][None], ks[j][None], vs[j][None], n_heads,
                                     own.n_groups, q2g, self._rope_row(rope, j), st.length))
        # skipped heads' outputs stay zero: o reads each row's own heads only
        o = x.new_zeros(n * w.q_width).index_copy_(0, ap.q_idx, torch.cat(outs, dim=1)[0])
        return F.linear(o.view(n, w.q_width), w.wo, w.bo)

    def _attn_rows(self, seqs: list[Sequence], layer: int, x: torch.Tensor, rope, w: AttnWeights) -> torch.Tensor:
        """Rows sharing the attention weights w, one new token each: x (n, D) -> (n, D)."""
        q, k, v = self._qkv(w, x)
        outs = [self._attend(st, layer, q[j:j + 1], k[j:j + 1], v[j:j + 1], w.n_heads, w.n_groups,
                             w.q2g, self._rope_row(rope, j), st.length)
                for j, st in enumerate(seqs)]
        return F.linear(torch.cat(outs), w.wo, w.bo)

    def _plan_ffn(self, seqs: list[Sequence], layer: int, x: torch.Tensor, fp: FfnPlan) -> torch.Tensor:
        if fp.kind == "per_mask":
            return self._per_mask(fp.groups, x, None, lambda g, xs, _: self._ffn(
                layer, self._group_weights(seqs, g, layer).ffn, xs))
        return self._ffn(layer, fp.weights, x, fp.keep)

    def _transposed(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """o_proj and down_proj stored (in, D) so a per-token gather of kept inputs is one
        embedding_bag that reads only the kept rows. Built on first DejaVu use; costs one
        extra copy of those two matrices per layer."""
        if self._dejavu_t is None:
            self._dejavu_t = [(ref.wo.t().contiguous(), ref.w_down.t().contiguous())
                              for ref in self.view.layers]
        return self._dejavu_t

    def _dejavu_layer(self, st: Sequence, layer: int, h: torch.Tensor, rope, pos: int | None = None) -> torch.Tensor:
        """DejaVu-style layer for one token h (1, D): the method picks the heads from the
        hidden state entering the layer, and the neurons from it too or from the hidden state
        after the attention block (the FFN block's input; method.ffn_units decides); all KV
        groups are computed and cached."""
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
        neurons = method.ffn_units(layer, h[0], kf, neurons)  # h: the FFN block's input now
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
            # the steps this composition has left, if no row stops early
            logits = self.decode([states[i] for i in active], toks[[j for j, _ in still]],
                                 horizon=max_new_tokens - len(out_ids[active[0]]))
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
