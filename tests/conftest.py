"""Shared fixtures: tiny random Hugging Face folders (Qwen2, Qwen3, Llama), written the way transformers writes them.

TRITON_INTERPRET must be set before anything imports triton (transformers can, through torch._dynamo),
so it is set here, at the very top, before any other import.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from minirl.model import Decoder, init_weights  # noqa: E402
from minirl.model_config import ModelConfig  # noqa: E402
from minirl.tiny import char_tokenizer  # noqa: E402

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False)


def random_model(seed: int = 0, **overrides) -> Decoder:
    """A decoder (Qwen2 unless model_type says otherwise) with every parameter (biases and norms too) random,
    so that nothing is tested at zero."""
    config = ModelConfig(**{**TINY, **overrides})
    model = init_weights(Decoder(config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name else 0.0))
            else:
                p.normal_(0.0, 0.1, generator=g)
    return model.eval()


def hf_model(c: ModelConfig, eos_token_id=None):
    """transformers' own model class for our config's family, with random weights."""
    import transformers

    names = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
             "llama": ("LlamaConfig", "LlamaForCausalLM")}[c.model_type]
    config_class, model_class = (getattr(transformers, n) for n in names)
    family = dict(qwen2={}, qwen3=dict(attention_bias=c.o_bias),
                  llama=dict(attention_bias=c.o_bias, mlp_bias=c.mlp_bias))[c.model_type]
    rope = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta}
    config = config_class(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                          num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                          num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                          max_position_embeddings=c.max_position_embeddings, rope_parameters=rope,
                          rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
                          eos_token_id=eos_token_id, **family)
    return model_class(config).eval()


def write_hf_folder(folder, seed: int = 0, max_shard_size=None, **overrides):
    """A random model saved by transformers' own save_pretrained, plus the character tokenizer.

    overrides are ModelConfig fields over TINY (model_type="llama" for a Llama folder); max_shard_size
    (e.g. "20KB") makes transformers write a sharded folder with an index.
    """
    ours = random_model(seed, **overrides)
    hf = hf_model(ours.config, eos_token_id=char_tokenizer().eos_token_id)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.save_pretrained(folder, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    char_tokenizer().save(folder)
    return hf


@pytest.fixture
def hf_folder(tmp_path):
    write_hf_folder(tmp_path / "model")
    return tmp_path / "model"
