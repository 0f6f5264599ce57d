"""Importance criteria for every head and FFN neuron of every layer, from one forward and
one backward pass per batch of examples (hooks on the model's own modules; no per-unit
Python loops).

Units and what is measured (A: a head's output, the o_proj input slice (T, Dh);
z: a neuron's activation, the down_proj/fc2 input, i.e. exactly the value the runtime
drops when it skips the neuron; g = dLoss/dA, gz = dLoss/dz):

  plainact   head: sum_t |sum_i A[t,i] g[t,i]|     neuron: sum_t |z[t] gz[t]|
  fisher     head: sum_i mean_t (A g)[t,i]^2       neuron: mean_t (z gz)[t]^2
  l2norm     head: ||A||_F                          neuron: ||z||_2
  grad_norm  head: ||g||_F                          neuron: ||gz||_2

sum_i A g is the first-order change of the loss when the head's output at position t is
scaled to zero, so plainact is the first-order ablation effect summed over positions.
The loss is the causal-LM loss summed over the target tokens of each example; examples in
a batch are independent (right padding, attention mask), so one backward gives every
example's scores. Sums over t run over the example's real (non-padding) positions.

Shapes: B batch, T tokens, L layers, H heads, Dh head dim, F neurons, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CRITERIA = ("plainact", "fisher", "l2norm", "grad_norm")


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) right-padded
    attention: torch.Tensor  # (B, T) 1 for real tokens
    targets: torch.Tensor  # (B, T) bool: token t is a loss target (predicted from t-1)
    prompt_len: torch.Tensor  # (B,) tokens of the prompt; the predictor reads position len-1


@dataclass
class Scores:
    heads: dict[str, torch.Tensor]  # criterion -> (B, L, H)
    neurons: dict[str, torch.Tensor]  # criterion -> (B, L, F)
    predictor_input: torch.Tensor  # (B, D) layer-0 attention block output at prompt_len-1
    loss: torch.Tensor  # (B,) summed target NLL
    token_positions: list[torch.Tensor]  # per example: the target positions (P_b,)
    layer_inputs: list[torch.Tensor]  # per example (P_b, L, D): hidden entering each layer
    token_heads_l2: list[torch.Tensor]  # per example (P_b, L, H): ||A[t]|| (DejaVu targets)
    token_neurons_l2: list[torch.Tensor]  # per example (P_b, L, F): |z[t]|


def _modules(model):
    kind = model.config.model_type
    if kind == "opt":
        layers = model.model.decoder.layers
        return layers, [l.self_attn.out_proj for l in layers], [l.fc2 for l in layers], \
            model.model.decoder.embed_tokens
    layers = model.model.layers
    return layers, [l.self_attn.o_proj for l in layers], [l.mlp.down_proj for l in layers], \
        model.model.embed_tokens


def compute(model, batch: Batch, heads: int, head_dim: int, equalize: bool = False) -> Scores:
    """All criteria for a batch. The model's parameters need not require grad.

    equalize: each target token's NLL is divided by (1 - p), p the model's probability of
    it (no gradient through the weight). The gradient at the logits of a target is
    (softmax - onehot), of size about (1 - p): a token the model is sure of (a few-shot
    answer's terminator, a template token) would otherwise add almost nothing to the
    gradient criteria, and the units that predict it would look unimportant."""
    layers, o_projs, downs, embed = _modules(model)
    acts: dict[tuple[str, int], torch.Tensor] = {}
    grads: dict[tuple[str, int], torch.Tensor] = {}
    layer_in: dict[int, torch.Tensor] = {}
    handles = []

    def capture(key):
        def hook(module, args):
            x = args[0]
            acts[key] = x.detach()
            x.register_hook(lambda g: grads.__setitem__(key, g.detach()))
        return hook

    def capture_input(idx):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            layer_in[idx] = h.detach()
        return hook

    out0 = {}
    handles.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    handles.append(o_projs[0].register_forward_hook(lambda m, a, out: out0.__setitem__("o", out.detach())))
    for i, (o, d, layer) in enumerate(zip(o_projs, downs, layers)):
        handles.append(o.register_forward_pre_hook(capture(("head", i))))
        handles.append(d.register_forward_pre_hook(capture(("neuron", i))))
        handles.append(layer.register_forward_pre_hook(capture_input(i), with_kwargs=True))
    try:
        with torch.enable_grad():
            logits = model(input_ids=batch.ids, attention_mask=batch.attention).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, batch.ids[:, 1:, None])[..., 0]  # (B, T-1): predicts token t+1
            weight = batch.targets[:, 1:].float()
            if equalize:
                weight = weight / (1 - (-nll.detach()).exp()).clamp_min(1e-3)
            loss = (nll * batch.targets[:, 1:]).sum(-1)  # (B,)
            (nll * weight).sum().backward()
    finally:
        for h in handles:
            h.remove()

    b, t = batch.ids.shape
    for key in list(acts):  # OPT flattens (B, T) before fc2
        acts[key], grads[key] = acts[key].reshape(b, t, -1), grads[key].reshape(b, t, -1)
    real = batch.attention.float()  # (B, T)
    n_real = real.sum(-1).clamp_min(1)
    n_layers = len(layers)
    out_h = {c: [] for c in CRITERIA}
    out_n = {c: [] for c in CRITERIA}
    for i in range(n_layers):
        a = acts[("head", i)].float().view(b, t, heads, head_dim)
        g = grads[("head", i)].float().view(b, t, heads, head_dim)
        ag = a * g
        m = real[:, :, None]
        out_h["plainact"].append((ag.sum(-1).abs() * m).sum(1))
        out_h["fisher"].append(((ag ** 2) * m[..., None]).sum(1).sum(-1) / n_real[:, None])
        out_h["l2norm"].append(((a ** 2) * m[..., None]).sum((1, 3)).sqrt())
        out_h["grad_norm"].append(((g ** 2) * m[..., None]).sum((1, 3)).sqrt())
        z, gz = acts[("neuron", i)].float(), grads[("neuron", i)].float()
        zg = z * gz
        out_n["plainact"].append((zg.abs() * m).sum(1))
        out_n["fisher"].append(((zg ** 2) * m).sum(1) / n_real[:, None])
        out_n["l2norm"].append(((z ** 2) * m).sum(1).sqrt())
        out_n["grad_norm"].append(((gz ** 2) * m).sum(1).sqrt())
    heads_out = {c: torch.stack(v, 1) for c, v in out_h.items()}
    neurons_out = {c: torch.stack(v, 1) for c, v in out_n.items()}

    rows = torch.arange(b)
    pred_in = out0["o"][rows, batch.prompt_len - 1].float()
    positions, inputs, tok_h, tok_n = [], [], [], []
    stacked_in = torch.stack([layer_in[i] for i in range(n_layers)], 2).float()  # (B, T, L, D)
    for j in range(b):
        pos = batch.targets[j].nonzero().flatten()
        positions.append(pos)
        inputs.append(stacked_in[j, pos])
        tok_h.append(torch.stack([acts[("head", i)][j, pos].float().view(-1, heads, head_dim).norm(dim=-1)
                                  for i in range(n_layers)], 1))
        tok_n.append(torch.stack([acts[("neuron", i)][j, pos].float().abs() for i in range(n_layers)], 1))
    return Scores(heads=heads_out, neurons=neurons_out, predictor_input=pred_in, loss=loss.detach(),
                  token_positions=positions, layer_inputs=inputs, token_heads_l2=tok_h,
                  token_neurons_l2=tok_n)


def make_batch(prompts: list[list[int]], continuations: list[list[int]], pad_id: int,
               extra_targets: list[list[int]] | None = None) -> Batch:
    """Right-padded batch; targets are the continuation tokens plus any extra target
    positions (e.g. the answers of the in-context shots)."""
    seqs = [p + c for p, c in zip(prompts, continuations)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros(len(seqs), width, dtype=torch.long)
    targets = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        targets[i, len(p): len(s)] = True
        for pos in (extra_targets[i] if extra_targets else []):
            targets[i, pos] = True
    targets[:, 0] = False  # nothing predicts the first token
    return Batch(ids=ids, attention=attention, targets=targets,
                 prompt_len=torch.tensor([len(p) for p in prompts]))


@torch.no_grad()
def pseudo_continuations(model, prompts: list[list[int]], length: int, eos_id: int | None) -> list[list[int]]:
    """The dense model's own greedy continuations: labels for unlabelled traffic."""
    out = []
    for p in prompts:
        gen = model.generate(torch.tensor([p]), max_new_tokens=length, do_sample=False,
                             pad_token_id=eos_id if eos_id is not None else 0)[0, len(p):].tolist()
        out.append(gen or [p[-1]])
    return out


@torch.no_grad()
def sampled_continuations(model, prompts: list[list[int]], lengths: list[int], temperature: float,
                          generator: torch.Generator | None = None) -> list[list[int]]:
    """For each prompt, lengths[i] tokens sampled from the dense model at `temperature`
    (batched: one forward per token step over the right-padded batch)."""
    seqs = [list(p) for p in prompts]
    for step in range(max(lengths)):
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attention = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            attention[i, : len(s)] = 1
        logits = model(input_ids=ids, attention_mask=attention).logits
        last = logits[torch.arange(len(seqs)), attention.sum(-1) - 1].float()  # (B, V)
        toks = torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=generator)[:, 0]
        for i, s in enumerate(seqs):
            if step < lengths[i]:
                s.append(int(toks[i]))
    return [s[len(p):] for s, p in zip(seqs, prompts)]
