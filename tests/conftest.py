import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

torch.set_num_threads(2)


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


@pytest.fixture(params=["llama-gqa", "llama-mha", "opt"])
def tiny_model(request):
    if request.param == "llama-gqa":
        return tiny_llama(kv_heads=2)
    if request.param == "llama-mha":
        return tiny_llama(kv_heads=8)
    return tiny_opt()
