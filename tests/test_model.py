"""The Qwen2 forward pass, loading and saving, against transformers' Qwen2ForCausalLM on the same weights;
end-of-sequence ids as real folders give them (tests/test_families.py covers Qwen3 and Llama)."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_model, write_hf_folder
from minirl import generate, load_pretrained, save_pretrained
from minirl.errors import InputError
from minirl.model_config import ModelConfig
from minirl.tiny import char_tokenizer

CONFIGS = {
    "gqa-untied": dict(),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa4-head10": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=10),
    "three-layers-head6": dict(num_hidden_layers=3, hidden_size=24, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=40),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    hf = write_hf_folder(tmp_path / "m", seed=len(name), **CONFIGS[name])
    model, _ = load_pretrained(tmp_path / "m")
    ids = torch.randint(0, model.config.vocab_size, (3, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert theirs.abs().max() > 0.1  # the comparison is not between two zero tensors
    assert (ours - theirs).abs().max().item() <= 1e-4
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_hidden_states_are_the_final_norm_output():
    model = random_model(seed=3)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        assert torch.equal(model.lm_head(model.hidden_states(ids)), model(ids))


def test_bf16_forward_is_close_to_fp32(hf_folder):
    fp32, _ = load_pretrained(hf_folder)
    bf16, _ = load_pretrained(hf_folder, dtype="bf16")
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        a, b = fp32(ids), bf16(ids).float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_greedy_generation_matches_transformers(tmp_path):
    hf = write_hf_folder(tmp_path / "m", seed=5, num_key_value_heads=2)
    model, tokenizer = load_pretrained(tmp_path / "m")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 90, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    ours = generate(model, prompts, max_new_tokens=12, temperature=0.0)
    for prompt, new in zip(prompts, ours):  # one at a time: transformers' reference needs no padding logic
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert new == out[0, len(prompt):].tolist()


def test_generation_stops_at_eos_per_sequence():
    model = random_model(seed=7)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12]]
    free = generate(model, prompts, max_new_tokens=10, temperature=0.0)
    eos = free[0][-1]  # the last token of row 0 becomes the stop token
    stopped = generate(model, prompts, max_new_tokens=10, temperature=0.0, eos_token_id=eos)
    for full, cut in zip(free, stopped):
        end = full.index(eos) + 1 if eos in full else len(full)
        assert cut == full[:end]
    assert any(len(row) < 10 for row in stopped)  # at least one row really stopped early


def test_generation_stops_at_any_id_of_an_eos_list():
    model = random_model(seed=7)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12]]
    free = generate(model, prompts, max_new_tokens=10, temperature=0.0)
    stops = [free[0][3], free[1][1]]
    assert stops[0] != stops[1] and stops[0] not in free[1][:2]
    stopped = generate(model, prompts, max_new_tokens=10, temperature=0.0, eos_token_id=stops)
    for full, cut in zip(free, stopped):
        end = next((j + 1 for j, tok in enumerate(full) if tok in stops), len(full))
        assert cut == full[:end]
    assert stopped[0][-1] == stops[0] and stopped[1][-1] == stops[1]  # each row on a different id of the list


def eos_folder(hf_folder, config_eos="keep", generation_eos=None, tokenizer=None):
    """hf_folder with config.json's eos_token_id replaced, an optional generation_config.json, a tokenizer."""
    config = json.loads((hf_folder / "config.json").read_text())
    if config_eos != "keep":
        config["eos_token_id"] = config_eos
    (hf_folder / "config.json").write_text(json.dumps(config))
    (hf_folder / "generation_config.json").unlink(missing_ok=True)
    if generation_eos is not None:
        (hf_folder / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    if tokenizer is not None:
        tokenizer.save(str(hf_folder / "tokenizer.json"))
    return hf_folder


def test_an_eos_list_is_read_whole_and_saved_back(tmp_path, hf_folder):
    folder = eos_folder(hf_folder, config_eos=3, generation_eos=[85, 86, 85])
    model, tokenizer = load_pretrained(folder)
    assert tokenizer.eos_token_ids == [85, 86] and tokenizer.eos_token_id == 85  # generation_config.json first
    save_pretrained(model, tokenizer, tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["eos_token_id"] == [85, 86]
    assert load_pretrained(tmp_path / "copy")[1].eos_token_ids == [85, 86]


@pytest.mark.parametrize("bad, expected", [("2", "field 'eos_token_id' is '2'"), ([1, -1], "[1, -1]"),
                                           (96, "token id 96 is outside the vocabulary")])
def test_bad_eos_ids_are_errors(hf_folder, bad, expected):
    with pytest.raises(InputError, match=re.escape(expected)) as e:
        load_pretrained(eos_folder(hf_folder, generation_eos=bad))
    assert "\n" not in str(e.value)


def test_a_folder_without_eos_warns_once_and_generation_runs_to_max_new_tokens(hf_folder, capsys):
    from tokenizers import Tokenizer as HFTokenizer, models

    plain = HFTokenizer(models.BPE(vocab={"<unk>": 0, **{str(d): d + 1 for d in range(10)}}, merges=[], unk_token="<unk>"))
    folder = eos_folder(hf_folder, config_eos=None, tokenizer=plain)
    capsys.readouterr()
    model, tokenizer = load_pretrained(folder)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ") and "max_new_tokens" in err
    assert tokenizer.eos_token_ids == [] and tokenizer.eos_token_id is None
    out = generate(model, [[1, 2], [3]], max_new_tokens=12, temperature=0.0, eos_token_id=tokenizer.eos_token_ids)
    assert [len(row) for row in out] == [12, 12]
    # With the character tokenizer's <|endoftext|> back, the same folder names an EOS and loads silently.
    char_tokenizer().save(folder)
    assert load_pretrained(folder)[1].eos_token_ids == [char_tokenizer().eos_token_id]
    assert capsys.readouterr().err == ""


def test_padded_batch_equals_each_prefix_alone():
    model = random_model(seed=11)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    batch = generate(model, prompts, max_new_tokens=8, temperature=0.0)
    assert batch == [generate(model, [p], max_new_tokens=8, temperature=0.0)[0] for p in prompts]


def test_sampling_is_reproducible_with_a_generator_and_follows_the_distribution():
    model = random_model(seed=13)
    prompts = [[3, 4], [5]] * 4
    a = generate(model, prompts, 6, temperature=1.0, generator=torch.Generator().manual_seed(42))
    b = generate(model, prompts, 6, temperature=1.0, generator=torch.Generator().manual_seed(42))
    c = generate(model, prompts, 6, temperature=1.0, generator=torch.Generator().manual_seed(43))
    assert a == b and a != c
    # The first sampled token's frequencies follow softmax(logits / τ).
    n, tau = 4000, 0.7
    draws = generate(model, [[3, 4]] * n, 1, temperature=tau, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=96).float() / n
    with torch.no_grad():
        expected = torch.softmax(model(torch.tensor([[3, 4]]))[0, -1] / tau, dim=-1)
    assert (counts - expected).abs().max() < 0.03


def test_top_p_keeps_only_the_nucleus():
    model = random_model(seed=17)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([[3, 4]]))[0, -1], dim=-1)
    order = probs.argsort(descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.5).sum()) + 1].tolist())
    draws = generate(model, [[3, 4]] * 500, 1, temperature=1.0, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert {d[0] for d in draws} <= nucleus


def test_generation_from_a_prefix_continues_the_completion():
    """Replay restarts from prompt + part of a completion; greedy decoding must carry on the same way."""
    model = random_model(seed=19)
    prompt = [4, 5, 6]
    full = generate(model, [prompt], 10, temperature=0.0)[0]
    rest = generate(model, [prompt + full[:4]], 6, temperature=0.0)[0]
    assert rest == full[4:]


def test_save_then_load_gives_identical_tensors(tmp_path, hf_folder):
    model, tokenizer = load_pretrained(hf_folder)
    save_pretrained(model, tokenizer, tmp_path / "copy")
    again, tok2 = load_pretrained(tmp_path / "copy")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert tok2.encode("12*34=") == tokenizer.encode("12*34=") and tok2.eos_token_id == tokenizer.eos_token_id


def test_sharded_folder_loads(tmp_path, hf_folder):
    model, _ = load_pretrained(hf_folder)
    tensors = load_file(hf_folder / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for extra in ("config.json", "tokenizer.json"):
        (folder / extra).write_text((hf_folder / extra).read_text())
    sharded, _ = load_pretrained(folder)
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        assert torch.equal(sharded(ids), model(ids))


def rewrite_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_and_misshaped_tensors_are_listed_in_one_error(hf_folder):
    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(3)
        t["model.layers.0.extra.weight"] = torch.zeros(2)

    rewrite_weights(hf_folder, edit)
    with pytest.raises(InputError) as e:
        load_pretrained(hf_folder)
    msg = str(e.value)
    assert "missing: model.layers.1.mlp.up_proj.weight" in msg
    assert "model.layers.0.self_attn.q_proj.bias has shape (3,), expected (32,)" in msg
    assert "unexpected: model.layers.0.extra.weight" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("field, value, expected", [
    ("model_type", "mistral", "expected one of 'qwen2', 'qwen3', 'llama'"),
    ("use_sliding_window", True, "sliding-window"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}, "RoPE type 'yarn'"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("hidden_size", -4, "hidden_size"),
])
def test_unsupported_config_settings_are_refused(hf_folder, field, value, expected):
    config = json.loads((hf_folder / "config.json").read_text())
    config[field] = value
    (hf_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=expected) as e:
        load_pretrained(hf_folder)
    assert "config.json" in str(e.value)


def test_out_of_range_token_ids_and_positions_are_errors():
    model = random_model()
    with pytest.raises(InputError, match="token id 96 is outside the vocabulary"):
        model(torch.tensor([[1, 96]]))
    with pytest.raises(InputError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(InputError, match="max_position_embeddings"):
        generate(model, [[1] * 250], max_new_tokens=10)


def test_config_defaults_follow_hugging_face():
    c = ModelConfig.from_hf_dict({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                                  "num_hidden_layers": 1, "num_attention_heads": 2})
    assert (c.num_key_value_heads, c.head_dim, c.tie_word_embeddings) == (2, 4, False)
