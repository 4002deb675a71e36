"""The shipped tiny model (minirl/data/tiny/) and the tool that builds it (tools/make_tiny_model.py).

The shipped folder must be what its recipe.json says: a Qwen2 folder that transformers reads to the
same logits, with exactly the character tokenizer, whose greedy accuracy on the held-out split is the
recorded one. The tool is checked on a few steps: its labels, that its training lowers the answer
loss, that a build is a loadable folder and is reproducible from its seed.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from minirl import generate, load_pretrained
from minirl.errors import InputError
from minirl.evaluate import accuracy
from minirl.model import Decoder, init_weights
from minirl.model_config import ModelConfig
from minirl.tasks import multiplication
from minirl.tiny import TINY_MODEL_DIR, char_tokenizer, tiny_model_path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_tiny_model.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("make_tiny_model", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return load_tool()


@pytest.fixture(scope="module")
def shipped():
    folder = tiny_model_path()
    model, tokenizer = load_pretrained(folder)
    return folder, model, tokenizer, json.loads((folder / "recipe.json").read_text())


def test_shipped_folder_is_small_and_matches_its_recipe(shipped):
    folder, model, tokenizer, record = shipped
    assert folder == TINY_MODEL_DIR
    assert sum(f.stat().st_size for f in folder.iterdir()) < 4_000_000
    r, c = record["recipe"], model.config
    shape = {k: getattr(c, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                        "num_key_value_heads", "intermediate_size", "max_position_embeddings")}
    assert shape == {k: r[k] for k in shape}
    assert c.vocab_size == char_tokenizer().vocab_size
    assert sum(p.numel() for p in model.parameters()) == record["results"]["parameters"]
    assert record["digits"] == r["digits"]
    longest = max(len(tokenizer.encode(p.question)) for p in multiplication("test", digits=r["digits"]))
    assert longest + record["train_defaults"]["max_new_tokens"] <= c.max_position_embeddings


def test_shipped_config_round_trips(shipped):
    folder = shipped[0]
    written = json.loads((folder / "config.json").read_text())
    assert ModelConfig.from_json(folder / "config.json").to_hf_dict() == written


def test_shipped_tokenizer_is_the_char_tokenizer(shipped):
    _, _, tokenizer, _ = shipped
    reference = char_tokenizer()
    assert tokenizer.tokenizer.get_vocab(with_added_tokens=True) == reference.tokenizer.get_vocab(with_added_tokens=True)
    assert tokenizer.eos_token_id == reference.eos_token_id == tokenizer.tokenizer.token_to_id("<|endoftext|>")
    for p in multiplication("test", n=50, digits=2):
        text = f"{p.question}{p.answer}"
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text) and len(ids) == len(text)  # one token per character
        assert tokenizer.decode(ids + [tokenizer.eos_token_id]) == text


def test_shipped_model_matches_transformers(shipped):
    """The folder is a valid Hugging Face Qwen2 folder: transformers computes the same logits from it."""
    transformers = pytest.importorskip("transformers")
    folder, model, tokenizer, _ = shipped
    hf = transformers.Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(p.question + str(p.answer)) for p in multiplication("test", n=8, digits=2)
                        if p.answer >= 1000])  # (B, 10): 4-digit products, one length
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert theirs.std() > 1.0
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_shipped_accuracy_is_the_recorded_one(shipped):
    """Greedy accuracy on the recorded test problems is the recipe's (±5 points), inside the target band."""
    _, model, tokenizer, record = shipped
    results = record["results"]
    low, high = record["target_band"]
    assert low <= results["accuracy"] <= high
    problems = multiplication("test", n=results["n_test"], digits=record["digits"])
    acc = accuracy(model, tokenizer, problems, "plain", record["train_defaults"]["max_new_tokens"], batch_size=512)
    assert abs(acc - results["accuracy"]) <= 0.05, (acc, results["accuracy"])


def test_greedy_generate_matches_argmax_without_cache(shipped):
    """The accuracy above rests on generate; on the tiny model it must equal plain argmax decoding."""
    _, model, tokenizer, record = shipped
    prompts = [tokenizer.encode(p.question) for p in multiplication("test", n=24, digits=2)]
    new_tokens = record["train_defaults"]["max_new_tokens"]
    out = generate(model, prompts, new_tokens, temperature=0.0, eos_token_id=tokenizer.eos_token_id)
    for prompt, got in zip(prompts, out):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(new_tokens):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
                if seq[-1] == tokenizer.eos_token_id:
                    break
        assert got == seq[len(prompt):]


def test_batch_labels_cover_the_answer_and_eos_only(tool):
    tokenizer = char_tokenizer()
    problems = multiplication("train", n=16, digits=2, seed=3)
    prompts, answers = tool.encode_examples(tokenizer, problems)
    ids, labels = tool.batch_tensors(prompts, answers, tokenizer.eos_token_id)
    for b, p in enumerate(problems):
        # brute force: the tokens predicted at labelled positions are the next ones, and read back as the answer
        kept = [(t, int(labels[b, t])) for t in range(labels.shape[1]) if labels[b, t] != -100]
        assert all(int(ids[b, t + 1]) == token for t, token in kept)
        assert tokenizer.decode([token for _, token in kept]) == str(p.answer)
        assert kept[-1][1] == tokenizer.eos_token_id
        assert kept[0][0] == len(p.question) - 1  # the first label sits on "=", predicting the first digit


def test_supervised_steps_lower_the_answer_loss(tool):
    recipe = tool.Recipe(steps=40, n_test=16)
    model, tokenizer, results = tool.build(recipe, log=lambda *_: None)
    untrained = init_weights(Decoder(tool.tiny_config(recipe, tokenizer.vocab_size, tokenizer.eos_token_id)),
                             generator=torch.Generator().manual_seed(recipe.seed))
    problems = multiplication("train", n=256, digits=2, seed=7)
    ids, labels = tool.batch_tensors(*tool.encode_examples(tokenizer, problems), tokenizer.eos_token_id)
    with torch.no_grad():
        before, after = tool.answer_loss(untrained, ids, labels), tool.answer_loss(model, ids, labels)
    assert before > 4.0  # about log(87): uniform over the vocabulary
    assert after < 0.75 * before


def test_tool_writes_a_loadable_reproducible_folder(tool, tmp_path):
    args = ["--steps", "5", "--n-test", "16", "--hidden-size", "64", "--intermediate-size", "128"]
    tool.main(args + ["--out", str(tmp_path / "a")])
    tool.main(args + ["--out", str(tmp_path / "b")])
    tool.main(args + ["--seed", "1", "--out", str(tmp_path / "c")])
    model, tokenizer = load_pretrained(tmp_path / "a")
    assert model.config.hidden_size == 64 and tokenizer.eos_token_id == char_tokenizer().eos_token_id
    record = json.loads((tmp_path / "a" / "recipe.json").read_text())
    assert record["recipe"]["steps"] == 5 and record["results"]["n_test"] == 16
    assert "--steps 5" in record["rebuild"] and "--hidden-size 64" in record["rebuild"]
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in "abc"]
    assert weights[0] == weights[1]  # same seed, same bytes
    assert weights[0] != weights[2]


def test_tool_rejects_bad_arguments(tool, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--steps", "0", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --steps is 0") and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_missing_tiny_model_says_how_to_rebuild(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="make_tiny_model.py") as e:
        tiny_model_path(tmp_path)
    assert "model.safetensors" in str(e.value) and "config.json" not in str(e.value).split("missing")[1]
