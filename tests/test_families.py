"""Qwen3 and Llama beside Qwen2: the forward, greedy generation, loading and saving against transformers' own
Qwen3ForCausalLM and LlamaForCausalLM on the same random weights, and the settings that are refused."""

import json
import math

import pytest
import torch

from conftest import TINY, random_model, write_hf_folder
from minirl import generate, load_pretrained, save_pretrained
from minirl.errors import InputError
from minirl.model import rope_inv_freq
from minirl.model_config import ModelConfig

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

# (family, overrides of conftest.TINY): tied and untied, GQA ratio 1, 2 and 4, head_dim 6 and 10 (an odd
# number of RoPE pairs, 10 ≠ hidden/heads), biases where the family allows them, Llama 3 RoPE scaling.
CASES = {
    "llama-gqa2-untied": ("llama", dict()),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-gqa4-head6": ("llama", dict(hidden_size=24, intermediate_size=40, num_key_value_heads=1, head_dim=6)),
    "llama-biases-head10": ("llama", dict(head_dim=10, qkv_bias=True, o_bias=True, mlp_bias=True)),
    "llama-llama3-rope": ("llama", dict(hidden_size=64, head_dim=16, tie_word_embeddings=True, rope_scaling=LLAMA3)),
    "qwen3-gqa2-untied": ("qwen3", dict()),
    "qwen3-mha-tied": ("qwen3", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen3-gqa4-head10": ("qwen3", dict(num_key_value_heads=1, head_dim=10)),
    "qwen3-bias-head6-3layers": ("qwen3", dict(num_hidden_layers=3, hidden_size=24, intermediate_size=40, head_dim=6,
                                               qkv_bias=True, o_bias=True)),
}
SEQ = 80  # longer than LLAMA3's original_max_position_embeddings (64)


def family_folder(tmp_path, name, **kwargs):
    family, overrides = CASES[name]
    hf = write_hf_folder(tmp_path / name, seed=len(name), model_type=family, **overrides, **kwargs)
    return tmp_path / name, hf


@pytest.mark.parametrize("name", CASES)
def test_logits_and_greedy_generation_match_transformers(tmp_path, name):
    folder, hf = family_folder(tmp_path, name)
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[CASES[name][0]]
    model, _ = load_pretrained(folder)
    assert model.config.model_type == CASES[name][0]
    ids = torch.randint(0, model.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert theirs.abs().max() > 0.1
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == model.config.tie_word_embeddings

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 90, (n,), generator=g).tolist() for n in (3, 9, 1, 60)]
    new = generate(model, prompts, max_new_tokens=10, temperature=0.0)
    for prompt, row in zip(prompts, new):  # the 60-token prompt decodes past position 64
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert row == out[0, len(prompt):].tolist()


def test_family_modules_are_those_of_hugging_face():
    names = lambda **kw: {n for n, _ in random_model(**kw).named_parameters() if ".layers.0." in n}  # noqa: E731
    qwen2, qwen3, llama = names(), names(model_type="qwen3"), names(model_type="llama", mlp_bias=True)
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias"} <= qwen2
    assert "model.layers.0.self_attn.o_proj.bias" not in qwen2
    assert not any(n.endswith(".bias") for n in qwen3)
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= qwen3
    assert {n for n in llama if n.endswith(".bias")} == {f"model.layers.0.mlp.{m}.bias"
                                                         for m in ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("scaling", [LLAMA3, {**LLAMA3, "factor": 32.0, "original_max_position_embeddings": 8192},
                                     {**LLAMA3, "low_freq_factor": 2.0, "high_freq_factor": 8.0}])
@pytest.mark.parametrize("head_dim, theta", [(16, 10000.0), (128, 500000.0), (6, 100.0)])
def test_llama3_frequencies_are_those_of_transformers(scaling, head_dim, theta):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                     rope_parameters={**scaling, "rope_theta": theta})
    want, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf)
    ours = rope_inv_freq(head_dim, theta, scaling)
    assert attention_factor == 1.0 and ours.shape == want.shape
    assert torch.equal(ours, want)


def test_llama3_scaling_reaches_all_three_regions_and_changes_the_logits(tmp_path):
    """The case above is only a test of the scaling if some pairs are kept, some slowed and some blended."""
    base = rope_inv_freq(16, 10000.0)
    scaled = rope_inv_freq(16, 10000.0, LLAMA3)
    kept, slowed = scaled == base, torch.isclose(scaled, base / LLAMA3["factor"])
    assert kept.any() and slowed.any() and (~kept & ~slowed).any()
    folder, _ = family_folder(tmp_path, "llama-llama3-rope")
    model, _ = load_pretrained(folder)
    ids = torch.randint(0, 96, (1, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        scaled_logits = model(ids)
        model.config.rope_scaling = None
        plain_logits = model(ids)
    assert (scaled_logits - plain_logits).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["llama-biases-head10", "qwen3-gqa4-head10"])
def test_sharded_folder_matches_transformers(tmp_path, name):
    folder, hf = family_folder(tmp_path, name, max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (folder / "model.safetensors").exists()
    model, _ = load_pretrained(folder)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["llama-biases-head10", "llama-llama3-rope", "qwen3-bias-head6-3layers"])
def test_save_pretrained_round_trips_through_transformers(tmp_path, name):
    from transformers import AutoModelForCausalLM

    folder, _ = family_folder(tmp_path, name)
    model, tokenizer = load_pretrained(folder)
    save_pretrained(model, tokenizer, tmp_path / "copy")
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    family = CASES[name][0]
    assert config["model_type"] == family
    again, _ = load_pretrained(tmp_path / "copy")
    assert again.config == model.config
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "copy").eval()
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    ids = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_config_defaults_follow_each_family():
    base = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2}
    qwen3 = ModelConfig.from_hf_dict({**base, "model_type": "qwen3"})
    assert (qwen3.head_dim, qwen3.qk_norm, qwen3.qkv_bias, qwen3.o_bias) == (128, True, False, False)
    llama = ModelConfig.from_hf_dict({**base, "model_type": "llama", "num_key_value_heads": None,
                                      "attention_bias": True, "mlp_bias": True})
    assert (llama.head_dim, llama.num_key_value_heads, llama.max_position_embeddings) == (4, 2, 2048)
    assert (llama.qkv_bias, llama.o_bias, llama.mlp_bias, llama.qk_norm) == (True, True, True, False)
    qwen2 = ModelConfig.from_hf_dict({**base, "model_type": "qwen2", "mlp_bias": True, "attention_bias": True})
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.mlp_bias) == (True, False, False)  # keys Qwen2 does not read
    v4 = ModelConfig.from_hf_dict({**base, "model_type": "llama", "rope_theta": 5e5, "rope_scaling": LLAMA3})
    assert v4.rope_theta == 5e5 and v4.rope_scaling == LLAMA3
    v5 = ModelConfig.from_hf_dict({**base, "model_type": "llama", "rope_parameters": {**LLAMA3, "rope_theta": 5e5}})
    assert v5 == v4


@pytest.mark.parametrize("family, field, value, expected", [
    ("llama", "model_type", "mistral", "field 'model_type' is 'mistral', expected one of 'qwen2', 'qwen3', 'llama'"),
    ("qwen3", "use_sliding_window", True, "sliding-window attention is not implemented"),
    ("qwen3", "layer_types", ["full_attention", "sliding_attention"], "'sliding_attention'"),
    ("qwen2", "layer_types", ["sliding_attention", "full_attention"], "'sliding_attention'"),
    ("llama", "rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "RoPE type 'yarn'"),
    ("llama", "rope_scaling", {"type": "linear", "factor": 2.0}, "RoPE type 'linear'"),
    ("qwen3", "rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, "RoPE type 'dynamic'"),
    ("llama", "rope_parameters", {**LLAMA3, "factor": None, "rope_theta": 1e4}, "'factor' is None"),
    ("llama", "rope_parameters", {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}, "needs field"),
    ("llama", "rope_parameters", {**LLAMA3, "high_freq_factor": 1.0, "rope_theta": 1e4}, "high_freq_factor"),
    ("llama", "partial_rotary_factor", 0.5, "partial_rotary_factor"),
    ("llama", "hidden_act", "gelu", "field 'hidden_act' is 'gelu', expected 'silu'"),
    ("qwen3", "hidden_act", "relu", "hidden_act"),
    ("llama", "attention_bias", "yes", "field 'attention_bias' is 'yes'"),
    ("llama", "rope_parameters", [1, 2], "field 'rope_parameters'"),
])
def test_unsupported_family_settings_are_one_line_errors(tmp_path, family, field, value, expected):
    folder = tmp_path / "m"
    write_hf_folder(folder, model_type=family)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    if field == "rope_scaling":
        config.pop("rope_parameters", None)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as e:
        load_pretrained(folder)
    message = str(e.value)
    assert expected in message and str(folder / "config.json") in message and "\n" not in message, message


@pytest.mark.parametrize("overrides, named", [
    (dict(model_type="gemma"), "model_type"), (dict(model_type="qwen2", o_bias=True), "o_bias"),
    (dict(model_type="llama", qk_norm=True), "qk_norm"), (dict(model_type="qwen3", mlp_bias=True), "mlp_bias"),
    (dict(model_type="llama", qkv_bias=True), "o_bias"), (dict(rope_scaling={"rope_type": "yarn"}), "rope_scaling"),
])
def test_configs_a_family_cannot_write_back_are_refused(overrides, named):
    with pytest.raises(InputError, match=named):
        ModelConfig(**{**TINY, **overrides})


def test_real_config_files_load():
    """Fields as the released configs write them (Qwen2.5, Qwen3, Llama 3.2, SmolLM2), sliding windows off."""
    common = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu"}
    qwen25 = {**common, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 131072,
              "max_window_layers": 21, "rope_scaling": None, "rope_theta": 1e6}
    qwen3 = {**common, "model_type": "qwen3", "head_dim": 16, "attention_bias": False, "use_sliding_window": False,
             "sliding_window": None, "layer_types": ["full_attention"] * 2, "rope_theta": 1e6}
    llama32 = {**common, "model_type": "llama", "head_dim": 16, "attention_bias": False, "mlp_bias": False,
               "pretraining_tp": 1, "rope_theta": 5e5, "rope_scaling": {**LLAMA3, "factor": 32.0,
                                                                         "original_max_position_embeddings": 8192}}
    smollm2 = {**common, "model_type": "llama", "rope_theta": 1e5, "rope_scaling": None, "tie_word_embeddings": True}
    for d in (qwen25, qwen3, llama32, smollm2):
        c = ModelConfig.from_hf_dict(d)
        assert c.model_type == d["model_type"] and math.isclose(c.rope_theta, d["rope_theta"])
    assert ModelConfig.from_hf_dict(llama32).rope_scaling["factor"] == 32.0
