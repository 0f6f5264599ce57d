"""DejaVu with its neuron predictor on the FFN input (the hidden state after the attention
block), as DejaVu does: the traced field, the runtime's choice of neurons against a masked
dense reference built from the model's own modules, training, the artifact field, and the
shipped artifacts (no field) behaving as before."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, OPTConfig

from adapter.config import RuntimeConfig
from adapter.embedded import suite as tasks
from adapter.embedded.recipe import default_predictor_dir
from adapter.evaluation import scoring, sweep
from adapter.pipeline import criteria, traces
from adapter.pipeline import train as training
from adapter.pipeline.build import train_one
from adapter.pipeline.collect import collect, ffn_input_capture
from adapter.runtime.gated import GatedModel
from adapter.runtime.loading import load
from adapter.runtime.masks import keep_count
from adapter.runtime.model_view import ModelView
from adapter.selection import artifact
from adapter.selection import predictors as P
from adapter.selection.methods import dense, make_method
from adapter.pipeline.targets import TargetPolicy
from tests.support import tiny_llama

SPLITS = {"train": 3, "validation": 1, "test": 1}
FAST = training.TrainConfig(epochs=3, patience=3, hidden=32, neuron_rank=8, dejavu_rank=16)


@pytest.fixture(scope="module")
def default_llama():
    return load("default")


@pytest.fixture(scope="module")
def dataset(default_llama, tmp_path_factory):
    m = default_llama
    # every prompt position a target: per-token (DejaVu) rows beyond the answer
    return collect(m.runtime.model, m.tokenizer, tmp_path_factory.mktemp("traces"), SPLITS,
                   policy=TargetPolicy(prompt="all"))


@dataclass(frozen=True)
class Spy(P.DejaVu):
    """DejaVu that records what its ffn_units saw and chose: (layer, x (D,), neurons (K,))."""

    log: list = field(default_factory=list, compare=False)

    def ffn_units(self, layer, x, kf, neurons):
        out = super().ffn_units(layer, x, kf, neurons)
        self.log.append((layer, x.float().clone(), out.clone()))
        return out


def reference(model, ids: list[int], predictors: P.DejaVuPredictors, sparsity: float):
    """The masked dense model: its own forward, with each token's heads zeroed at the o_proj
    input and its neurons at the down_proj input, chosen by the predictors from the hidden
    state entering the layer (heads, and neurons of a layer_input predictor) or from the
    post-attention-norm input (neurons of an ffn_input predictor). Returns logits (T, V) and
    per layer >= 1 the kept neurons (T, K) and the post-attention hidden state (T, D)."""
    inner = model.model
    cfg = model.config
    h_, f_ = cfg.num_attention_heads, cfg.intermediate_size
    dh = cfg.hidden_size // h_
    kh, kf = keep_count(h_, sparsity), keep_count(f_, sparsity)
    keep_h, keep_n, mids, handles = {}, {}, {}, []

    def topk_mask(scores, k):
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k).indices, True)

    for i in range(1, len(inner.layers)):
        layer, pred = inner.layers[i], predictors.layers[i - 1]

        def on_layer(m, args, kwargs, i=i, pred=pred):
            h = (args[0] if args else kwargs["hidden_states"])[0].float()
            keep_h[i] = topk_mask(pred.head_scores(h), kh)
            if predictors.neuron_input == "layer_input":
                keep_n[i] = topk_mask(pred.neuron_scores(h), kf)

        def on_mid(m, args, i=i, pred=pred):
            mids[i] = args[0][0].float()
            if predictors.neuron_input == "ffn_input":
                keep_n[i] = topk_mask(pred.neuron_scores(mids[i]), kf)

        def on_o(m, args, i=i):
            x = args[0]
            return (x * keep_h[i].repeat_interleave(dh, -1)[None].to(x.dtype),)

        def on_down(m, args, i=i):
            return (args[0] * keep_n[i][None].to(args[0].dtype),)

        handles += [layer.register_forward_pre_hook(on_layer, with_kwargs=True),
                    layer.post_attention_layernorm.register_forward_pre_hook(on_mid),
                    layer.self_attn.o_proj.register_forward_pre_hook(on_o),
                    layer.mlp.down_proj.register_forward_pre_hook(on_down)]
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        for hd in handles:
            hd.remove()
    kept = {i: [set(row.nonzero().flatten().tolist()) for row in keep_n[i]] for i in keep_n}
    return logits, kept, mids


def test_traced_ffn_input_is_the_models_own_post_attention_state(default_llama, dataset):
    m = default_llama
    model, n_layers = m.runtime.model, m.runtime.shape.layers
    ts = traces.load_split(dataset, "train")
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert "ffn_inputs" in manifest["token_fields"]
    ffn_in, layer_in = ts.token_field("ffn_inputs"), ts.token_field("layer_inputs")
    assert ffn_in.shape == layer_in.shape == (ts.tensors["token_offsets"][-1], n_layers, m.runtime.shape.hidden)
    offsets = ts.tensors["token_offsets"]
    instances = tasks.split("train", SPLITS["train"])
    for j in (0, len(instances) - 1):  # the first and the last record of the batch (padding)
        prompt, answer = scoring.encode_pairs(m.tokenizer, [instances[j]])[0]
        answer = ts.metas[j]["label_ids"]  # the answer and its terminator, as the policy targets them
        seen, mlp_in, mlp_out = {}, {}, {}
        handles = []
        for i, layer in enumerate(model.model.layers):
            handles += [
                layer.post_attention_layernorm.register_forward_pre_hook(
                    lambda mod, a, i=i: seen.__setitem__(i, a[0][0].detach())),
                layer.mlp.register_forward_pre_hook(lambda mod, a, i=i: mlp_in.__setitem__(i, a[0][0].detach())),
                layer.mlp.register_forward_hook(lambda mod, a, o, i=i: mlp_out.__setitem__(i, o[0].detach()))]
        try:
            with torch.no_grad():
                hidden = model(input_ids=torch.tensor([prompt + answer]), output_hidden_states=True).hidden_states
        finally:
            for hd in handles:
                hd.remove()
        pos = ts.tensors["token_positions"][offsets[j]:offsets[j + 1]]
        assert pos.numel() > len(answer)  # the answers of the shots are targets too
        rec = ffn_in[offsets[j]:offsets[j + 1]]
        for i in range(n_layers):
            torch.testing.assert_close(rec[:, i], seen[i][pos], rtol=1e-4, atol=1e-4)
            # the MLP reads the post-attention norm of exactly this state ...
            norm = model.model.layers[i].post_attention_layernorm
            torch.testing.assert_close(norm(rec[:, i]), mlp_in[i][pos], rtol=1e-4, atol=1e-4)
            # ... and the next layer's input is this state plus the MLP's output
            if i + 1 < n_layers:
                torch.testing.assert_close(rec[:, i] + mlp_out[i][pos], hidden[i + 1][0, pos], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(layer_in[offsets[j]:offsets[j + 1], i + 1], hidden[i + 1][0, pos],
                                           rtol=1e-4, atol=1e-4)
        # it is not the layer input: attention added something at every layer
        assert ((rec - layer_in[offsets[j]:offsets[j + 1]]).abs().amax((0, 2)) > 1e-2).all()


@pytest.mark.parametrize("pre_norm", [True, False])
def test_ffn_input_capture_on_opt(pre_norm):
    """OPT: the FFN norm's input for a pre-norm layer, the attention norm's output for a
    post-norm one; either way the layer's output is (the norm of) it plus fc2's output."""
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=97, hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=64, do_layer_norm_before=pre_norm)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    view = ModelView(model)
    batch = criteria.make_batch([[2, 5, 9, 4], [2, 7]], [[3, 8], [6, 1, 4]], 0)
    fc2_out, final_in = {}, {}
    handles = []
    for i, layer in enumerate(model.model.decoder.layers):
        handles += [layer.fc2.register_forward_hook(lambda mod, a, o, i=i: fc2_out.__setitem__(i, o.detach())),
                    layer.final_layer_norm.register_forward_pre_hook(
                        lambda mod, a, i=i: final_in.__setitem__(i, a[0].detach()))]
    try:
        with ffn_input_capture(view) as captured, torch.no_grad():
            out = model(input_ids=batch.ids, attention_mask=batch.attention, output_hidden_states=True)
    finally:
        for hd in handles:
            hd.remove()
    b, t = batch.ids.shape
    for i in range(3):
        mid, ffn = captured[i].reshape(b, t, -1), fc2_out[i].reshape(b, t, -1)
        if pre_norm:
            if i + 1 < 3:
                torch.testing.assert_close(mid + ffn, out.hidden_states[i + 1], rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(mid + ffn, final_in[i].reshape(b, t, -1), rtol=1e-5, atol=1e-5)


def test_ffn_input_dejavu_at_sparsity_0_is_dense(default_llama):
    rt = default_llama.runtime
    method = make_method("dejavu", 0.0, rt.shape, P.random_dejavu(rt.shape, 16, seed=3, neuron_input="ffn_input"))
    prompt, cont = [1, 5, 9, 12, 7, 3, 22], [4, 8, 2, 30]
    torch.testing.assert_close(rt.score(prompt, cont, method), rt.score(prompt, cont, dense()), rtol=1e-4, atol=1e-4)
    assert rt.generate([prompt], method, 5)[0].token_ids == rt.generate([prompt], dense(), 5)[0].token_ids


@pytest.mark.parametrize("neuron_input", ["ffn_input", "layer_input"])
def test_neurons_are_the_predictors_top_k_on_its_input(default_llama, neuron_input):
    """At 0.5 the runtime (prompt token by token, then decode steps) equals the masked dense
    model, and the neurons it keeps at every layer and token are the predictor's top-k on
    the post-attention state (ffn_input) or on the layer's input (layer_input)."""
    rt = default_llama.runtime
    preds = P.random_dejavu(rt.shape, 16, seed=5, neuron_input=neuron_input)
    prompt, cont = [1, 5, 9, 12, 7, 3, 22], [4, 8, 2]
    ids = prompt + cont
    spy = Spy(preds, 0.5)
    got = rt.score(prompt, cont, spy)  # prefill (per token) + decode steps
    ref_logits, kept, mids = reference(rt.model, ids, preds, 0.5)
    torch.testing.assert_close(got, ref_logits[len(prompt) - 1: len(ids) - 1], rtol=1e-4, atol=1e-4)
    # the spy's log: prefill runs layer by layer over the prompt's tokens, each decode step
    # token by token over the layers
    t, n = len(prompt), rt.shape.layers - 1
    order = [(layer, pos) for layer in range(1, n + 1) for pos in range(t)]
    order += [(layer, t + s) for s in range(len(cont) - 1) for layer in range(1, n + 1)]
    assert [e[0] for e in spy.log] == [layer for layer, _ in order]
    kf = keep_count(rt.shape.ffn, 0.5)
    differ = 0
    for (layer, pos), (_, x, neurons) in zip(order, spy.log):
        assert neurons.numel() == kf and set(neurons.tolist()) == kept[layer][pos]
        torch.testing.assert_close(x, mids[layer][pos], rtol=1e-4, atol=1e-4)
        from_x = set(preds.layers[layer - 1].neuron_scores(mids[layer][pos][None])[0].topk(kf).indices.tolist())
        differ += from_x != kept[layer][pos]
    # an ffn_input predictor's neurons are its top-k on the post-attention state; a
    # layer_input one's are not (its branch reads another state)
    assert differ == 0 if neuron_input == "ffn_input" else differ == len(order)


def test_ffn_input_decode_of_a_batch_equals_each_row_alone(default_llama):
    rt = default_llama.runtime
    method = make_method("dejavu", 0.5, rt.shape, P.random_dejavu(rt.shape, 16, seed=2, neuron_input="ffn_input"))
    prompts = [[1, 5, 9, 12, 7], [1, 22, 3, 8]]
    alone = [rt.generate([p], method, 4)[0].token_ids for p in prompts]
    assert [g.token_ids for g in rt.generate(prompts, method, 4)] == alone


def test_training_on_the_ffn_input_and_the_artifact(default_llama, dataset, tmp_path):
    rt = default_llama.runtime
    fp = traces.model_fingerprint(rt.model)
    cfg = training.TrainConfig(**{**FAST.__dict__, "dejavu_neuron_input": "ffn_input"})
    metrics = train_one("dejavu", "l2norm", dataset, tmp_path / "dejavu-l2norm-ffn", rt, cfg)
    train_one("dejavu", "l2norm", dataset, tmp_path / "dejavu-l2norm", rt, FAST)
    assert sorted(p.name for p in (tmp_path / "dejavu-l2norm-ffn").iterdir()) == ["predictor.json",
                                                                                   "predictor.safetensors"]
    config = json.loads((tmp_path / "dejavu-l2norm-ffn" / "predictor.json").read_text())
    assert config["neuron_input"] == "ffn_input" and config["train_config"]["dejavu_neuron_input"] == "ffn_input"
    assert json.loads((tmp_path / "dejavu-l2norm" / "predictor.json").read_text())["neuron_input"] == "layer_input"
    ffn = artifact.load_predictor(tmp_path / "dejavu-l2norm-ffn", rt.shape, fp)
    assert ffn.module.neuron_input == "ffn_input" and ffn.module.layers[0].rank == 16
    # the saved metric is the neuron branch on the FFN input of the validation tokens
    val = traces.load_split(dataset, "validation")
    x, yh, yn = training._token_targets(val, "ffn_input")
    ph, pn = training.dejavu_scores(ffn.module, x)
    assert abs(float(training.spearman(pn, yn).mean()) - metrics["rho_neurons"]) < 1e-5
    assert abs(float(training.spearman(ph, yh).mean()) - metrics["rho_heads"]) < 1e-5
    # eval finds both folders and tells them apart, with rho on the test traces for each
    preds = sweep.load_set(tmp_path, rt.shape, fp)
    configs = sweep._configs(preds, (0.5,), ("per_layer",), dejavu_variants=("all_tokens", "decode_only"))
    assert sorted((c[5], c[2]) for c in configs) == [
        ("dejavu-l2norm", "decode_only"), ("dejavu-l2norm", "per_layer"),
        ("dejavu-l2norm-ffn", "decode_only"), ("dejavu-l2norm-ffn", "per_layer")]
    assert {c[5]: c[4].predictors.neuron_input for c in configs} == {"dejavu-l2norm": "layer_input",
                                                                     "dejavu-l2norm-ffn": "ffn_input"}
    rho = sweep.spearman_table(preds, traces.load_split(dataset, "test"))
    assert set(rho) == {"dejavu-l2norm", "dejavu-l2norm-ffn"}
    assert rho["dejavu-l2norm"] != rho["dejavu-l2norm-ffn"]
    with pytest.raises(ValueError, match="applies to dejavu predictors only"):
        train_one("shadowllm", "plainact", dataset, tmp_path / "x", rt, cfg)
    with pytest.raises(ValueError, match="neuron input 'attention'"):
        train_one("dejavu", "l2norm", dataset, tmp_path / "x", rt,
                  training.TrainConfig(dejavu_neuron_input="attention"))


def test_old_traces_without_the_field(default_llama, dataset, tmp_path):
    """A dataset written before the field: everything else loads and trains; an ffn_input
    dejavu is refused with the missing field's name."""
    rt = default_llama.runtime
    old = tmp_path / "old" / "v1"
    shutil.copytree(dataset, old)
    for split in SPLITS:
        tensors = load_file(str(old / f"{split}.safetensors"))
        del tensors["ffn_inputs"]
        save_file(tensors, str(old / f"{split}.safetensors"))
    ts = traces.load_split(old, "train")
    assert "ffn_inputs" not in ts.tensors and ts.token_field("layer_inputs").shape[0] == ts.tensors["token_offsets"][-1]
    train_one("dejavu", "l2norm", old, tmp_path / "d", rt, FAST)
    train_one("shadowllm", "plainact", old, tmp_path / "s", rt, FAST)
    cfg = training.TrainConfig(**{**FAST.__dict__, "dejavu_neuron_input": "ffn_input"})
    with pytest.raises(ValueError, match="no per-token field 'ffn_inputs'"):
        train_one("dejavu", "l2norm", old, tmp_path / "f", rt, cfg)
    # records without it (shadow records) still make a split, without the field
    recs = [traces.TraceRecord(meta={"schema": traces.SCHEMA},
                               tensors={k: v for k, v in r.items()})
            for r in _records(ts, 2)]
    traces.write_split(tmp_path, "mixed", recs)
    assert "ffn_inputs" not in load_file(str(tmp_path / "mixed.safetensors"))


def _records(ts: traces.TraceSet, n: int) -> list[dict]:
    """The first n records of a split as per-record tensors."""
    off = ts.tensors["token_offsets"]
    out = []
    for j in range(n):
        rec = {k: v[j] for k, v in ts.tensors.items() if k not in traces.TOKEN_FIELDS and k != "token_offsets"}
        rec.update({k: ts.tensors[k][off[j]:off[j + 1]] for k in traces.TOKEN_FIELDS if k in ts.tensors})
        out.append(rec)
    return out


def test_shipped_artifact_without_the_field_behaves_as_before(default_llama):
    rt = default_llama.runtime
    folder = default_predictor_dir("default") / "dejavu-l2norm"
    assert "neuron_input" not in json.loads((folder / "predictor.json").read_text())
    lp = artifact.load_predictor(folder, rt.shape, traces.model_fingerprint(rt.model))
    assert lp.module.neuron_input == "layer_input"
    method = lp.method(0.5)
    kh, kf = method.counts(rt.shape)
    # units gives what it gave before: heads and neurons from the one trunk product on h
    h = torch.randn(rt.shape.hidden, generator=torch.Generator().manual_seed(0))
    heads, neurons = method.units(2, h, kh, kf)
    ph, pn = lp.module.layers[1](h[None])
    assert torch.equal(heads, ph[0].topk(kh).indices.sort().values)
    assert torch.equal(neurons, pn[0].topk(kf).indices.sort().values)
    assert method.ffn_units(2, torch.randn(rt.shape.hidden), kf, neurons) is neurons
    # and the runtime equals the masked dense model with every unit chosen from the layer input
    prompt, cont = [1, 5, 9, 12, 7, 3], [4, 8]
    ref_logits, _, _ = reference(rt.model, prompt + cont, lp.module, 0.5)
    torch.testing.assert_close(rt.score(prompt, cont, method), ref_logits[len(prompt) - 1:-1], rtol=1e-4, atol=1e-4)


def test_ffn_input_dejavu_in_bfloat16_on_cpu():
    fp32 = GatedModel(tiny_llama())
    bf16 = GatedModel(tiny_llama(), RuntimeConfig(dtype="bfloat16"))
    preds = P.random_dejavu(fp32.shape, 8, seed=4, neuron_input="ffn_input")
    ids = list(range(5, 25))
    zero = make_method("dejavu", 0.0, bf16.shape, preds)
    _, lz = bf16.prefill(ids, zero, 0, all_logits=True)
    _, ld = bf16.prefill(ids, dense(), 0, all_logits=True)
    torch.testing.assert_close(lz.float(), ld.float(), rtol=0.05, atol=0.05)
    spy_bf, spy_fp = Spy(preds, 0.5), Spy(preds, 0.5)
    st, _ = bf16.prefill(ids, spy_bf, 4)
    fp32.prefill(ids, spy_fp, 4)
    assert next(st.method.predictors.parameters()).dtype == torch.bfloat16
    assert st.method.predictors.neuron_input == "ffn_input"
    gen = bf16.generate([ids], P.DejaVu(preds, 0.5), 4)[0]
    # greedy in bfloat16: each token is the argmax of the same method's teacher-forced logits
    assert len(gen.token_ids) == 4
    assert bf16.score(ids, gen.token_ids, P.DejaVu(preds, 0.5)).argmax(-1).tolist() == gen.token_ids
    # layer 1, first token: the same post-attention state up to bf16 rounding, mostly the
    # same neurons (the bf16 predictor's top-k on it)
    (_, x_bf, n_bf), (_, x_fp, n_fp) = spy_bf.log[0], spy_fp.log[0]
    torch.testing.assert_close(x_bf, x_fp, rtol=0.05, atol=0.05)
    placed = st.method.predictors.layers[0]
    assert set(n_bf.tolist()) == set(placed.neuron_scores(x_bf.bfloat16()[None])[0].topk(n_bf.numel()).indices.tolist())
    assert len(set(n_bf.tolist()) & set(n_fp.tolist())) / n_fp.numel() > 0.8
