"""Importance criteria against direct reference computations on tiny models."""

import pytest
import torch

from adapter.pipeline import criteria
from tests.support import tiny_llama, tiny_opt


def modules(model):
    if model.config.model_type == "opt":
        layers = model.model.decoder.layers
        return [l.self_attn.out_proj for l in layers], [l.fc2 for l in layers]
    layers = model.model.layers
    return [l.self_attn.o_proj for l in layers], [l.mlp.down_proj for l in layers]


def gated_loss(model, batch, head_gates, neuron_gates, heads, head_dim):
    """Loss with multiplicative gates (L, T, H) on head outputs and (L, T, F) on neuron
    activations: dLoss/dgate is the first-order effect of scaling that unit at that position."""
    o_projs, downs = modules(model)
    handles = []
    for i, (o, d) in enumerate(zip(o_projs, downs)):
        def head_hook(m, args, i=i):
            x = args[0]
            b, t, _ = x.shape
            return ((x.view(b, t, heads, head_dim) * head_gates[i][None, :, :, None]).view(b, t, -1),)

        handles.append(o.register_forward_pre_hook(head_hook))
        handles.append(d.register_forward_pre_hook(lambda m, args, i=i: (args[0] * neuron_gates[i][None],)))
    try:
        logits = model(input_ids=batch.ids, attention_mask=batch.attention).logits
        logp = torch.log_softmax(logits[:, :-1], -1)
        nll = -logp.gather(-1, batch.ids[:, 1:, None])[..., 0]
        return (nll * batch.targets[:, 1:]).sum()
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_criteria_match_reference(make):
    model = make().double()
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    ffn = getattr(cfg, "intermediate_size", None) or cfg.ffn_dim
    n_layers = cfg.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, 97, (12,), generator=g).tolist()
    cont = torch.randint(4, 97, (3,), generator=g).tolist()
    batch = criteria.make_batch([prompt], [cont], pad_id=0, extra_targets=[[5]])
    got = criteria.compute(model, batch, heads, head_dim)

    t = batch.ids.shape[1]
    hg = [torch.ones(t, heads, dtype=torch.double, requires_grad=True) for _ in range(n_layers)]
    ng = [torch.ones(t, ffn, dtype=torch.double, requires_grad=True) for _ in range(n_layers)]
    loss = gated_loss(model, batch, hg, ng, heads, head_dim)
    dh = torch.autograd.grad(loss, hg + ng)
    ref_heads = torch.stack([d.abs().sum(0) for d in dh[:n_layers]])  # (L, H)
    ref_neurons = torch.stack([d.abs().sum(0) for d in dh[n_layers:]])  # (L, F)
    torch.testing.assert_close(got.heads["plainact"][0].double(), ref_heads, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(got.neurons["plainact"][0].double(), ref_neurons, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(got.loss.double(), loss.detach().double().reshape(1), rtol=1e-5, atol=1e-6)

    # plainact's signed first-order estimate predicts the loss change of scaling a head by (1 - eps)
    # (central difference; the model's norms compute in float32, so a loose tolerance)
    layer, head, eps = 1, 2, 1e-2
    with torch.no_grad():
        ones_n = [torch.ones(t, ffn, dtype=torch.double) for _ in range(n_layers)]

        def loss_at(scale):
            gates = [torch.ones(t, heads, dtype=torch.double) for _ in range(n_layers)]
            gates[layer][:, head] = scale
            return float(gated_loss(model, batch, gates, ones_n, heads, head_dim))

        delta = (loss_at(1 + eps) - loss_at(1 - eps)) / (2 * eps)
    assert delta == pytest.approx(float(dh[layer][:, head].sum()), rel=2e-2, abs=1e-6)

    # norms by hand from the captured activations and gradients
    o_projs, downs = modules(model)
    cap = {}
    hs = [o_projs[1].register_forward_pre_hook(lambda m, a: cap.__setitem__("a", a[0].detach())),
          downs[2].register_forward_pre_hook(lambda m, a: cap.__setitem__("z", a[0].detach()))]
    with torch.no_grad():
        model(input_ids=batch.ids, attention_mask=batch.attention)
    for h in hs:
        h.remove()
    a = cap["a"][0].view(t, heads, head_dim)
    assert float(got.heads["l2norm"][0, 1, 3]) == pytest.approx(float(a[:, 3].norm()), rel=1e-5)
    assert float(got.neurons["l2norm"][0, 2, 7]) == pytest.approx(float(cap["z"].reshape(t, -1)[:, 7].norm()), rel=1e-5)
    # grad_norm of a head equals the norm of dLoss/dA, i.e. (dLoss/dgate) / A per element
    assert float(got.heads["grad_norm"][0, 1].min()) > 0
    # fisher: mean over positions of the squared per-position estimate, summed over elements
    # (a head's elements gated one by one: the gated loss with H*head_dim "heads" of size 1)
    eg = [torch.ones(t, heads * head_dim, dtype=torch.double, requires_grad=True) for _ in range(n_layers)]
    de = torch.autograd.grad(gated_loss(model, batch, eg, ones_n, heads * head_dim, 1), eg)
    ref_fisher_h = torch.stack([(d ** 2).mean(0).view(heads, head_dim).sum(-1) for d in de])  # (L, H)
    ref_fisher_n = torch.stack([(d ** 2).mean(0) for d in dh[n_layers:]])  # (L, F)
    torch.testing.assert_close(got.heads["fisher"][0].double(), ref_fisher_h, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(got.neurons["fisher"][0].double(), ref_fisher_n, rtol=1e-4, atol=1e-10)
    # DejaVu per-token targets at the target positions
    assert got.token_positions[0].tolist() == [5, 12, 13, 14]
    assert got.layer_inputs[0].shape == (4, n_layers, cfg.hidden_size)
    assert float(got.token_heads_l2[0][1, 1, 3]) == pytest.approx(float(a[12, 3].norm()), rel=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_batched_scores_equal_single_example_scores(make):
    model = make()
    heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // heads
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 97, (n,), generator=g).tolist() for n in (9, 14, 11)]
    conts = [torch.randint(4, 97, (n,), generator=g).tolist() for n in (2, 1, 3)]
    together = criteria.compute(model, criteria.make_batch(prompts, conts, 0), heads, head_dim)
    for i in range(3):
        alone = criteria.compute(model, criteria.make_batch(prompts[i:i + 1], conts[i:i + 1], 0), heads, head_dim)
        for c in criteria.CRITERIA:
            torch.testing.assert_close(together.heads[c][i], alone.heads[c][0], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(together.neurons[c][i], alone.neurons[c][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(together.token_neurons_l2[i], alone.token_neurons_l2[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together.predictor_input[i], alone.predictor_input[0], rtol=1e-5, atol=1e-6)


def test_equalize_divides_each_targets_gradient_by_one_minus_its_probability():
    """One target token of probability p: the equalized gradient criteria are the plain ones
    divided by (1 - p), the magnitude criteria do not change, nor does the reported loss."""
    model = tiny_llama()
    cfg = model.config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    batch = criteria.make_batch([[1, 5, 7, 9, 4]], [[6]], 0)
    plain = criteria.compute(model, batch, heads, head_dim)
    eq = criteria.compute(model, batch, heads, head_dim, equalize=True)
    p = float((-plain.loss).exp())
    assert 0 < p < 1
    for c in ("plainact", "grad_norm"):
        torch.testing.assert_close(eq.heads[c], plain.heads[c] / (1 - p), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(eq.neurons[c], plain.neurons[c] / (1 - p), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(eq.heads["fisher"], plain.heads["fisher"] / (1 - p) ** 2, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(eq.heads["l2norm"], plain.heads["l2norm"])
    torch.testing.assert_close(eq.loss, plain.loss)
