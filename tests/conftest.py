"""Shared fixtures: tiny random Hugging Face Qwen2 folders, written the way transformers writes them.

TRITON_INTERPRET must be set before anything imports triton (transformers can, through torch._dynamo),
so it is set here, at the very top, before any other import.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from minirl.model import Decoder, ModelConfig, init_weights  # noqa: E402
from minirl.tiny import char_tokenizer  # noqa: E402

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False)


def random_model(seed: int = 0, **overrides) -> Decoder:
    """A Qwen2 with every parameter (biases and norms too) random, so that nothing is tested at zero."""
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


def write_hf_folder(folder, seed: int = 0, **overrides):
    """A random model saved by transformers' own save_pretrained, plus the character tokenizer."""
    from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM

    ours = random_model(seed, **overrides)
    c = ours.config
    hf_config = HFConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                         max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta,
                         rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
                         eos_token_id=char_tokenizer().eos_token_id)
    hf = Qwen2ForCausalLM(hf_config).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.save_pretrained(folder)
    char_tokenizer().save(folder)
    return hf


@pytest.fixture
def hf_folder(tmp_path):
    write_hf_folder(tmp_path / "model")
    return tmp_path / "model"
