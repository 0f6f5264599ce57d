"""Predictor training (`shadowgate predictor train`).

Targets are normalised per example and per layer to [0, 1] (min-max), the loss is MSE,
the optimiser AdamW with a cosine schedule, and training stops early on the validation
Spearman rho (mean over examples and layers of the rank correlation between predicted and
true scores of one layer's units: the ranking that per-layer selection uses).
TrainConfig.smooth_k > 0 trains the shadowllm predictor on targets averaged over each
example's nearest neighbours in input space (neighbour_mean); the validation rho stays
against the unsmoothed targets.

What is trained here is saved and loaded by adapter.selection.artifact.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from adapter.selection import predictors as P
from adapter.runtime.model_view import Shape
from adapter.pipeline.traces import TraceSet



@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 80
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    patience: int = 12
    hidden: int = 512
    neuron_rank: int = 64
    dejavu_rank: int = 64
    dejavu_neuron_input: str = "layer_input"  # or "ffn_input" (P.NEURON_INPUTS)
    seed: int = 0
    smooth_k: int = 0  # shadowllm: > 0 trains on targets averaged over k neighbours (neighbour_mean)


def normalise(t: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] over the last dim (units of one layer of one example)."""
    lo, hi = t.amin(-1, keepdim=True), t.amax(-1, keepdim=True)
    return (t - lo) / (hi - lo).clamp_min(1e-12)


def spearman(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Rank correlation over the last dim; returns one rho per leading index."""
    def ranks(x):
        return x.argsort(-1).argsort(-1).float()

    a, b = ranks(pred), ranks(true)
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


def _fit(model: torch.nn.Module, inputs: torch.Tensor, targets: tuple[torch.Tensor, ...], forward,
         evaluate, cfg: TrainConfig, desc: str) -> tuple[torch.nn.Module, dict]:
    """Shared loop: minibatch MSE over every target, early stopping on evaluate() -> score."""
    torch.manual_seed(cfg.seed)
    n = inputs.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    best, best_state, best_metrics, stale = -2.0, None, {}, 0
    bar = tqdm(range(cfg.epochs), desc=desc, unit="epoch")
    for epoch in bar:
        model.train()
        order = torch.randperm(n)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            outs = forward(inputs[idx])
            loss = sum(torch.nn.functional.mse_loss(o, t[idx]) for o, t in zip(outs, targets))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            metrics = evaluate()
        score = metrics["select"] if "select" in metrics else sum(metrics.values()) / len(metrics)
        bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items()})
        if score > best:
            best, best_state, best_metrics, stale = score, copy.deepcopy(model.state_dict()), metrics, 0
            best_metrics["epoch"] = epoch
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    return model.eval().requires_grad_(False), best_metrics


def _unified_targets(ts: TraceSet, criterion: str):
    return normalise(ts.heads(criterion)[:, 1:]), normalise(ts.neurons(criterion)[:, 1:])


def neighbour_mean(x: torch.Tensor, ys: tuple[torch.Tensor, ...], k: int, chunk: int = 1024) -> tuple[torch.Tensor, ...]:
    """Each example's targets replaced by their mean over the k examples whose predictor
    inputs are nearest to its own, itself included. x (N, D) raw predictor inputs; each y
    (N, ...). Nearness: cosine of the min-max normalised (as the predictor reads them) and
    centred inputs.

    Why: one prompt's first-order importance is a poor mask on its own. On the embedded
    default's test prompts the masks of each prompt's own plainact (the oracle of the
    criterion) keep less accuracy at 0.7 than the mean importance of the prompt's task
    family (docs/RESULTS.md, "The ceiling of the criterion"). Averaging over neighbours in
    input space keeps what prompts of a kind share, without labels."""
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"smooth_k must be in [1, {x.shape[0]}] (the training examples), got {k}")
    z = P.minmax(x.float())
    z = torch.nn.functional.normalize(z - z.mean(-1, keepdim=True), dim=-1)
    n = z.shape[0]
    out = [torch.empty_like(y) for y in ys]
    for start in range(0, n, chunk):
        nearest = (z[start:start + chunk] @ z.T).topk(k, dim=1).indices  # (C, k)
        weights = torch.zeros(nearest.shape[0], n).scatter_(1, nearest, 1.0 / k)  # (C, N)
        for o, y in zip(out, ys):
            o[start:start + chunk] = (weights @ y.reshape(n, -1)).view(-1, *y.shape[1:])
    return tuple(out)


def train_shadowllm(train: TraceSet, val: TraceSet, shape: Shape, criterion: str, cfg: TrainConfig):
    x, yh, yn = train.tensors["predictor_input"], *_unified_targets(train, criterion)
    if cfg.smooth_k:
        yh, yn = neighbour_mean(x, (yh, yn), cfg.smooth_k)
    vx, vh, vn = val.tensors["predictor_input"], *_unified_targets(val, criterion)
    rank = cfg.neuron_rank if (shape.layers - 1) * shape.ffn > 4 * cfg.hidden else 0
    torch.manual_seed(cfg.seed)  # the initial weights too: the same data and config train the same predictor
    model = P.UnifiedPredictor(shape, cfg.hidden, rank)

    def evaluate():
        ph, pn = model(vx)
        return {"rho_heads": float(spearman(ph, vh).mean()), "rho_neurons": float(spearman(pn, vn).mean())}

    return _fit(model, x, (yh, yn), model, evaluate, cfg, f"train shadowllm/{criterion}")


def unified_targets(heads: torch.Tensor, neurons: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw importance (N, L, H) / (N, L, F) -> normalised targets of layers 1..L-1."""
    return normalise(heads[:, 1:]), normalise(neurons[:, 1:])


def finetune_shadowllm(module: "P.UnifiedPredictor", x: torch.Tensor, heads: torch.Tensor, neurons: torch.Tensor,
                       vx: torch.Tensor, vheads: torch.Tensor, vneurons: torch.Tensor, cfg: TrainConfig,
                       select=None):
    """Continue training a copy of `module` (a champion's weights, not a fresh start) on raw
    importance targets; early stopping on the validation rho, or on `select(model)` -> a
    score (higher is better) when given: what the weights are for (the fidelity of the masks
    they choose) rather than how well they rank every unit. Returns (module, metrics)."""
    model = copy.deepcopy(module).train().requires_grad_(True)
    yh, yn = unified_targets(heads, neurons)
    vh, vn = unified_targets(vheads, vneurons)

    def evaluate():
        ph, pn = model(vx)
        out = {"rho_heads": float(spearman(ph, vh).mean()), "rho_neurons": float(spearman(pn, vn).mean())}
        return out if select is None else {**out, "select": float(select(model))}

    return _fit(model, x, (yh, yn), model, evaluate, cfg, "fine-tune shadowllm")


def _token_targets(ts: TraceSet, neuron_input: str = "layer_input"):
    """Per-token inputs/targets of layers 1..L-1: x (N, L-1, D), or (N, 2, L-1, D) with the
    FFN inputs beside the layer inputs for an ffn_input predictor; heads (N, L-1, H), neurons."""
    x = ts.token_field("layer_inputs")[:, 1:]
    if neuron_input == "ffn_input":
        x = torch.stack([x, ts.token_field("ffn_inputs")[:, 1:]], 1)
    return (x, normalise(ts.token_field("token_heads_l2")[:, 1:]),
            normalise(ts.token_field("token_neurons_l2")[:, 1:]))


def dejavu_scores(model: "P.DejaVuPredictors", xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of every gated layer for a batch of tokens: heads (N, L-1, H), neurons (N, L-1, F).
    xb as _token_targets gives it for model.neuron_input."""
    if model.neuron_input == "ffn_input":
        heads = [layer.head_scores(xb[:, 0, i]) for i, layer in enumerate(model.layers)]
        neurons = [layer.neuron_scores(xb[:, 1, i]) for i, layer in enumerate(model.layers)]
        return torch.stack(heads, 1), torch.stack(neurons, 1)
    outs = [layer(xb[:, i]) for i, layer in enumerate(model.layers)]
    return torch.stack([o[0] for o in outs], 1), torch.stack([o[1] for o in outs], 1)


def train_dejavu(train: TraceSet, val: TraceSet, shape: Shape, cfg: TrainConfig):
    """Magnitude (l2norm) targets per token, one predictor per layer, trained jointly. The
    neuron branch reads cfg.dejavu_neuron_input: the layer's input, or its FFN input (the
    traces must carry ffn_inputs)."""
    torch.manual_seed(cfg.seed)
    model = P.DejaVuPredictors(shape, cfg.dejavu_rank, cfg.dejavu_neuron_input)
    x, yh, yn = _token_targets(train, model.neuron_input)
    vx, vh, vn = _token_targets(val, model.neuron_input)

    def forward(xb):
        return dejavu_scores(model, xb)

    def evaluate():
        ph, pn = forward(vx)
        return {"rho_heads": float(spearman(ph, vh).mean()), "rho_neurons": float(spearman(pn, vn).mean())}

    return _fit(model, x, (yh, yn), forward, evaluate, cfg, f"train dejavu/l2norm ({model.neuron_input})")


def static_scores(train: TraceSet, criterion: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean normalised importance over the training traces: one score per unit."""
    yh, yn = _unified_targets(train, criterion)
    return yh.mean(0), yn.mean(0)


def static_metrics(val: TraceSet, criterion: str, scores) -> dict:
    vh, vn = _unified_targets(val, criterion)
    return {"rho_heads": float(spearman(scores[0].expand_as(vh), vh).mean()),
            "rho_neurons": float(spearman(scores[1].expand_as(vn), vn).mean())}
