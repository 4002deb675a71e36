"""LoRA against a merged-weight Qwen2 built by hand, against PEFT on transformers, and its own round trips."""

import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minirl.files
from conftest import random_model, write_hf_folder
from minirl import load_pretrained
from minirl.errors import InputError
from minirl.lora import (TARGETS, LoRALinear, add_lora, disable_adapters, load_adapter, lora_modules,
                         lora_parameters, parse_layers, parse_targets, save_adapter)

IDS = torch.tensor([[3, 17, 42, 5, 60, 11, 2], [8, 8, 90, 1, 33, 4, 70]])  # (B, T)
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def randomize(params, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def lora_model(seed=0, n_layers=4, **kwargs):
    """(base copy, adapted model with random A and B)."""
    base = random_model(seed, num_hidden_layers=n_layers)
    model = add_lora(copy.deepcopy(base), generator=torch.Generator().manual_seed(seed), **kwargs)
    randomize(lora_parameters(model), seed + 100)
    return base, model


def merged_reference(base, model, scale):
    """The adapted model as a plain Qwen2: W + scale · B A written into a copy of the base, module by module."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, m in lora_modules(model):
            ref.get_submodule(name).weight += scale * m.lora_B @ m.lora_A
    return ref


def expected_names(targets, layers):
    return {f"model.layers.{i}.{PARENT[t]}.{t}" for i in layers for t in targets}


# --- the layer itself ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_adapter_leaves_the_model_unchanged_exactly(dtype):
    base = random_model(0, num_hidden_layers=3).to(dtype)
    want = base(IDS)
    model = add_lora(base, targets=TARGETS, rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(IDS), want)
    for _, m in lora_modules(model):
        assert m.lora_A.dtype == m.lora_B.dtype == torch.float32 and m.base.weight.dtype == dtype
        assert not m.lora_B.any()
        bound = 1 / math.sqrt(m.base.in_features)  # kaiming_uniform(a=√5) on fan_in = in, as PEFT
        assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.9 * bound


def test_lora_linear_bf16_base_fp32_adapter_matches_the_formula():
    g = torch.Generator().manual_seed(1)
    base = torch.nn.Linear(24, 40, bias=True).to(torch.bfloat16)
    layer = LoRALinear(base, rank=3, alpha=6.0, generator=g)
    randomize([layer.lora_B], 2)
    x = torch.randn(2, 5, 24, generator=g).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    want = (base(x).float() + 2.0 * (x.float() @ layer.lora_A.T @ layer.lora_B.T)).to(torch.bfloat16)
    torch.testing.assert_close(y, want, atol=0, rtol=0.008)  # at most one bf16 rounding apart
    y.float().square().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    assert base.weight.grad is None and base.bias.grad is None


# --- add_lora over ranks, targets and layers ----------------------------------------------------------

SPECS_OF_3_LAYERS = {"all": [0, 1, 2], "last-half": [1, 2], "last-third": [2], "0.25": [2], "0.5": [1, 2],
                     "last:2": [1, 2], "2,0": [0, 2]}  # ⌈3 · fraction⌉ of the last layers, at least one


@settings(max_examples=8, deadline=None)
@given(rank=st.integers(1, 6), targets=st.sets(st.sampled_from(TARGETS), min_size=1),
       layers=st.one_of(st.none(), st.lists(st.integers(0, 2), min_size=1, max_size=3),
                        st.sampled_from(sorted(SPECS_OF_3_LAYERS))), seed=st.integers(0, 1000))
def test_add_lora_adapts_exactly_the_chosen_modules(rank, targets, layers, seed):
    n = 3
    base, model = lora_model(seed, n_layers=n, targets=tuple(targets), layers=layers, rank=rank, alpha=2.0 * rank)
    chosen = (range(n) if layers is None else sorted(set(layers)) if isinstance(layers, list)
              else SPECS_OF_3_LAYERS[layers])
    assert {name for name, _ in lora_modules(model)} == expected_names(targets, chosen)
    assert model.lora_config.layers == tuple(chosen) and set(model.lora_config.targets) == targets

    logits = model(IDS)
    torch.testing.assert_close(logits, merged_reference(base, model, 2.0)(IDS), atol=1e-5, rtol=1e-5)

    logits.square().mean().backward()
    lora = lora_parameters(model)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in lora}
    assert len(lora) == 2 * len(targets) * len(chosen)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert all(p.grad is None for name, p in model.named_parameters() if "lora_" not in name)


def test_optimizer_holds_only_lora_tensors_and_base_stays_frozen():
    _, model = lora_model(1, targets=("q_proj", "v_proj", "up_proj"), layers=[2, 3], rank=4, alpha=8)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model(IDS).square().mean().backward()
    optimizer.step()
    lora_ids = {id(p) for p in lora_parameters(model)}
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == lora_ids
    assert {id(p) for p in optimizer.state} == lora_ids
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if "lora_" not in k)


# --- disable -----------------------------------------------------------------------------------------

def test_disable_adapters_gives_the_base_model_and_restores_the_adapters():
    base, model = lora_model(3, rank=4, alpha=8)
    base_logits, adapted = base(IDS), model(IDS)
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapters do something
    with disable_adapters(model):
        assert torch.equal(model(IDS), base_logits)
        with disable_adapters(model):
            assert torch.equal(model(IDS), base_logits)
        assert torch.equal(model(IDS), base_logits)
    assert torch.equal(model(IDS), adapted)
    with pytest.raises(KeyError), disable_adapters(model):
        raise KeyError
    assert torch.equal(model(IDS), adapted)


# --- files --------------------------------------------------------------------------------------------

def test_save_then_load_gives_identical_tensors(tmp_path):
    _, model = lora_model(6, targets="gate_proj,k_proj", layers="last-half", rank=3, alpha=5)
    save_adapter(model, tmp_path / "a" / "adapter", base_model_name_or_path="some/base")
    config = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["layers_to_transform"]) == ("LORA", 3, 5, [2, 3])
    assert config["base_model_name_or_path"] == "some/base" and sorted(config["target_modules"]) == ["gate_proj", "k_proj"]

    fresh = load_adapter(random_model(6, num_hidden_layers=4), tmp_path / "a" / "adapter")
    assert fresh.lora_config == model.lora_config
    assert fresh.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(fresh(IDS), model(IDS))

    # into a model that has adapters already: filled in place, so an optimizer's references stay valid
    _, other = lora_model(7, targets=("k_proj", "gate_proj"), layers=[2, 3], rank=3, alpha=5)
    params = lora_parameters(other)
    load_adapter(other, tmp_path / "a" / "adapter")
    assert all(p is q for p, q in zip(params, lora_parameters(other)))
    assert all(torch.equal(p, q) for p, q in zip(params, lora_parameters(model)))
    save_adapter(other, tmp_path / "a" / "adapter")  # overwrites, leaves no temporary file
    assert sorted(p.name for p in (tmp_path / "a" / "adapter").iterdir()) == ["adapter_config.json",
                                                                            "adapter_model.safetensors"]


def test_failed_save_leaves_the_previous_adapter(tmp_path, monkeypatch):
    _, model = lora_model(8, n_layers=2, rank=2, alpha=4)
    save_adapter(model, tmp_path)
    saved = [p.clone() for p in lora_parameters(model)]
    randomize(lora_parameters(model), 9)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(minirl.files.os, "replace", crash)
    with pytest.raises(OSError):
        save_adapter(model, tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = load_adapter(random_model(8, num_hidden_layers=2), tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(lora_parameters(loaded), saved))


# Per family: Qwen2's q/k/v biases, Qwen3's q_norm/k_norm beside the adapted q_proj, Llama's o_proj and MLP biases.
FAMILIES = {"qwen2": dict(), "qwen3": dict(model_type="qwen3", head_dim=10),
            "llama": dict(model_type="llama", qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True)}


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_reads_a_minirl_adapter(tmp_path, family):
    from peft import PeftModel

    hf = write_hf_folder(tmp_path / "model", seed=1, num_hidden_layers=3, **FAMILIES[family])
    ours, _ = load_pretrained(tmp_path / "model")
    add_lora(ours, targets=("q_proj", "v_proj", "down_proj"), layers=[1, 2], rank=4, alpha=12)
    randomize(lora_parameters(ours), 10)
    save_adapter(ours, tmp_path / "adapter")
    with torch.no_grad():
        base_logits = hf(IDS).logits
        peft_logits = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()(IDS).logits
        our_logits = ours(IDS)
    assert (peft_logits - base_logits).abs().max() > 1e-2  # PEFT did apply the adapter
    assert (our_logits - peft_logits).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets, layers", [(["k_proj", "o_proj", "gate_proj"], [0, 2]),
                                             (r".*layers\.[12]\.self_attn\.(q_proj|v_proj)", None)])
def test_minirl_reads_a_peft_adapter(tmp_path, targets, layers, family):
    from peft import LoraConfig, get_peft_model

    hf = write_hf_folder(tmp_path / "model", seed=2, num_hidden_layers=3, **FAMILIES[family])
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=targets, layers_to_transform=layers,
                                               lora_dropout=0.1, task_type="CAUSAL_LM")).eval()  # dropout: training only
    randomize([p for n, p in peft_model.named_parameters() if "lora_" in n], 11)
    peft_model.save_pretrained(tmp_path / "adapter")
    ours, _ = load_pretrained(tmp_path / "model")
    with torch.no_grad():
        base_logits = ours(IDS)
        load_adapter(ours, tmp_path / "adapter")
        peft_logits, our_logits = peft_model(IDS).logits, ours(IDS)
    want = ({"k_proj", "o_proj", "gate_proj"}, (0, 2)) if layers else ({"q_proj", "v_proj"}, (1, 2))
    assert (set(ours.lora_config.targets), ours.lora_config.layers) == want
    assert (our_logits - base_logits).abs().max() > 1e-2
    assert (our_logits - peft_logits).abs().max() <= 1e-4


# --- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, n, want", [
    ("all", 4, [0, 1, 2, 3]), ("last-half", 5, [2, 3, 4]), ("last-third", 28, list(range(18, 28))),
    ("last-third", 27, list(range(18, 27))), ("last-quarter", 28, list(range(21, 28))),
    ("last-quarter", 2, [1]), ("last:1", 4, [3]), ("last:4", 4, [0, 1, 2, 3]), ("0.25", 8, [6, 7]),
    ("0.1", 10, [9]), ("0.1", 11, [9, 10]), ("1.0", 3, [0, 1, 2]), ("0.01", 5, [4]), (" Last-Half ", 4, [2, 3]),
    ("0,3,5", 6, [0, 3, 5]), ("5,0,3,3", 6, [0, 3, 5]), ("2", 4, [2]),
])
def test_parse_layers(spec, n, want):
    assert parse_layers(spec, n) == want


@pytest.mark.parametrize("spec, named", [
    ("", "''"), ("first-third", "first-third"), ("last:0", "last:0"), ("last:9", "the model has 4"),
    ("last:x", "last:x"), ("1.5", "1.5"), ("0.0", "0.0"), ("a,b", "a,b"), ("1,,2", "1,,2"),
    ("4", "layer 4 is out of range, the model has 4 layers"), ("-1", "layer -1"),
])
def test_parse_layers_errors(spec, named):
    with pytest.raises(InputError) as error:
        parse_layers(spec, 4)
    message = str(error.value)
    assert message.startswith("--lora-layers") and named in message and "\n" not in message
    if "out of range" not in message:
        assert "last-third" in message and "last:N" in message and "0,3,5" in message


@pytest.mark.parametrize("kwargs, named", [
    (dict(targets=("q_proj", "lm_head")), "--lora-targets: lm_head"), (dict(targets=()), "--lora-targets: empty"),
    (dict(targets="q_proj,,w_proj"), "--lora-targets: w_proj"),
    (dict(layers=[1, 4]), "--lora-layers: layer 4 is out of range, the model has 4 layers"),
    (dict(layers=[]), "--lora-layers"), (dict(layers=[1.0]), "--lora-layers"), (dict(layers=0.25), "--lora-layers"),
    (dict(layers=3), "--lora-layers"), (dict(layers="0.0"), "--lora-layers"), (dict(rank=0), "--lora-rank"),
    (dict(alpha=-1), "--lora-alpha"),
])
def test_add_lora_errors(kwargs, named):
    model = random_model(0, num_hidden_layers=4)
    with pytest.raises(InputError) as error:
        add_lora(model, **kwargs)
    assert str(error.value).startswith(named) and "\n" not in str(error.value)
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("text, want", [
    ("q_proj,v_proj", ("q_proj", "v_proj")), (" v_proj , q_proj ", ("q_proj", "v_proj")),
    ("down_proj,q_proj,down_proj", ("q_proj", "down_proj")), (["up_proj", "k_proj"], ("k_proj", "up_proj")),
    (",".join(reversed(TARGETS)), TARGETS),
])
def test_parse_targets_gives_one_canonical_order(text, want):
    assert parse_targets(text) == want


def test_add_lora_twice_and_save_without_adapters_are_refused(tmp_path):
    model = random_model(0)
    with pytest.raises(InputError, match="no LoRA"):
        save_adapter(model, tmp_path)
    add_lora(model)
    with pytest.raises(InputError, match="already"):
        add_lora(model)


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_load_adapter_errors_name_the_file_and_the_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    _, model = lora_model(12, n_layers=2, rank=2, alpha=4)
    good = tmp_path / "good"
    save_adapter(model, good)
    fresh = lambda: random_model(12, num_hidden_layers=2)  # noqa: E731
    config, weights = "adapter_config.json", "adapter_model.safetensors"

    def case(name, edit):
        folder = tmp_path / name
        folder.mkdir()
        for f in (config, weights):
            (folder / f).write_bytes((good / f).read_bytes())
        edit(folder)
        return folder

    checks = [
        (case("json", lambda f: (f / config).write_text("{not json")), config, "not valid JSON"),
        (case("dora", lambda f: edit_config(f, use_dora=True)), config, "use_dora"),
        (case("type", lambda f: edit_config(f, peft_type="IA3")), config, "peft_type"),
        (case("target", lambda f: edit_config(f, target_modules=["q_proj", "lm_head"])), config, "target_modules"),
        (case("layer", lambda f: edit_config(f, layers_to_transform=[1, 2])), config, "layers_to_transform"),
        (case("regex", lambda f: edit_config(f, layers_to_transform=None,  # q_proj in layer 0, v_proj in 1
                                             target_modules=r".*0\.self_attn\.q_proj|.*1\.self_attn\.v_proj")),
         config, "target_modules"),
        (case("rank", lambda f: edit_config(f, r=3)), weights, "lora_A.weight has shape (2, 32), expected (3, 32)"),
        (case("missing", lambda f: save_file({k: v for k, v in load_file(f / weights).items()
                                              if "layers.1.self_attn.v_proj.lora_B" not in k}, f / weights)),
         weights, "missing: base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"),
        (case("extra", lambda f: save_file({**load_file(f / weights), "base_model.model.lm_head.lora_A.weight":
                                            torch.zeros(2, 32)}, f / weights)), weights, "unexpected"),
        (case("noweights", lambda f: (f / weights).unlink()), weights, "file not found"),
        (tmp_path / "nowhere", config, "file not found"),
    ]
    for folder, file, named in checks:
        target = fresh()
        with pytest.raises(InputError) as error:
            load_adapter(target, folder)
        message = str(error.value)
        assert message.startswith(str(folder / file)) and named in message and "\n" not in message, message
        assert not lora_modules(target), "a failed load must leave the model as it was"

    _, other = lora_model(13, n_layers=2, rank=4, alpha=8)
    with pytest.raises(InputError, match="differs from the model's"):
        load_adapter(other, good)
