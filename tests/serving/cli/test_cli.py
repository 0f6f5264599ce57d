"""The `shadowgate` CLI and its settings, run as a user runs them (subprocess)."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from adapter.embedded.recipe import default_model_path
from serving.settings import ConfigError, load_settings
from tests.support import shadowgate, tiny_llama

KEYS = {"text", "token_ids", "sparsity", "effective_sparsity", "method"}


@pytest.mark.parametrize("method", ["dense", "shadowllm", "dejavu", "static"])
def test_generate_json_on_default_model(method):
    proc = shadowgate("generate", "--model", "default", "--prompt", "3 + 4 = 7 ; 2 + 2 =",
                   "--max-tokens", "3", "--sparsity", "0.5", "--method", method, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert KEYS <= out.keys()
    assert out["method"] == method and len(out["token_ids"]) <= 3
    if method == "dense":
        assert out["sparsity"] == 0.0 and out["effective_sparsity"] == 0.0
    else:
        assert out["sparsity"] == 0.5 and out["effective_sparsity"] > 0.2


def test_default_model_solves_an_easy_prompt_densely():
    proc = shadowgate("generate", "--prompt", "3 + 4 = 7 ; 1 + 1 = 2 ; 5 + 2 = 7 ; 0 + 6 = 6 ; 2 + 3 = 5 ; 4 + 4 =",
                   "--max-tokens", "1", "--method", "dense", "--json")
    assert json.loads(proc.stdout)["text"] == "8"


def test_user_checkpoint_saved_with_save_pretrained_loads_and_runs(tmp_path):
    model = tiny_llama()
    tokenizer = AutoTokenizer.from_pretrained(default_model_path("llama"))
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    proc = shadowgate("generate", "--model", str(tmp_path), "--prompt", "the cat sees", "--max-tokens", "5",
                   "--method", "shadowllm", "--sparsity", "0.3", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["token_ids"]) >= 1 and out["effective_sparsity"] > 0.0
    # the dense path through the CLI equals transformers' own greedy generate
    proc = shadowgate("generate", "--model", str(tmp_path), "--prompt", "the cat sees", "--max-tokens", "5",
                   "--method", "dense", "--json")
    ids = tokenizer.encode("the cat sees")
    want = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=0)[0, len(ids):].tolist()
    assert json.loads(proc.stdout)["token_ids"] == want


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
    (["--method", "magic"], "unknown method 'magic'"),
    (["--model", "/nonexistent/model"], "does not exist"),
])
def test_bad_input_gets_a_clear_message(args, message):
    proc = shadowgate("generate", "--prompt", "1 + 1 =", *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--resume-stage", "2"], "go together"),
    (["--resume-from", "/nonexistent/stage2", "--resume-stage", "2"], "no saved model there"),
    (["--family", "llama", "--family", "opt", "--resume-from", ".", "--resume-stage", "2"],
     "exactly one --family"),
])
def test_model_build_resume_needs_a_saved_model_and_one_family(args, message, tmp_path):
    family = [] if "--family" in args else ["--family", "llama"]
    proc = shadowgate("model", "build", "--out", str(tmp_path), *family, *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was trained or written


def test_settings_yaml_and_env_overrides(tmp_path, monkeypatch):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("runtime:\n  dtype: bfloat16\n  gather_cache_mb: 64\nmodel:\n  name: default-opt\n")
    s = load_settings(cfg)
    assert s.runtime.dtype == "bfloat16" and s.runtime.gather_cache_mb == 64 and s.model.name == "default-opt"
    monkeypatch.setenv("SHADOWGATE_RUNTIME__GATHER_CACHE_MB", "128")
    assert load_settings(cfg).runtime.gather_cache_mb == 128
    monkeypatch.setenv("SHADOWGATE_RUNTIME__DTYPE", "float16")
    with pytest.raises(ConfigError, match="runtime.dtype"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")


def test_bad_config_file_is_reported_without_traceback(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("runtime:\n  gather_cache_mb: -5\n")
    proc = shadowgate("generate", "--prompt", "1 + 1 =", "--config", str(cfg))
    assert proc.returncode == 2 and "gather_cache_mb" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["bench", "serve", "--units", "heads"], "--units needs --model"),
    (["bench", "serve", "--units", "all", "--model", "default"], "--units 'all': use per_request, heads, heads_neurons"),
    (["bench", "batch-quality", "--batch", "1,x"], "give batch sizes as a comma list"),
    (["bench", "batch-quality", "--predictor", "nope"], "--predictor 'nope': not among"),
    (["bench", "speed", "--units", "all", "--quick"], "unknown units 'all'"),
    (["bench", "step-profile", "--units", "all"], "unknown units 'all'"),
    (["bench", "step-profile", "--sparsity", "1.5"], "sparsity must be in (0, 1)"),
    (["bench", "attention", "--spread", "5,1"], "spread: at most 4 groups of 1-4 kept heads"),
    (["bench", "attention", "--cache-tokens", "0"], "every cache length must be in [1, 32768]"),
    (["bench", "speed", "--prompt-tokens", "0"], "--prompt-tokens"),
])
def test_batch_unit_options_refuse_bad_values_with_a_message(args, message):
    proc = shadowgate(*args)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
