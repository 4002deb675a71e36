"""Issue 10, memory: what the training forward keeps, activation checkpointing, and generation's buffers.

- layers below the first adapted one run under no_grad and keep nothing, yet the LoRA gradients are
  those of a forward where every layer runs with grad (minirl/model.py, Qwen2.hidden_states);
- `model.checkpoint_layers` (train.py --checkpoint-layers) gives the same gradients while autograd
  keeps fewer tensors, and stays off for cached forwards;
- generate's KV cache is gone once it returns, and sample_group's --gen-batch chunks make a full group.
"""

import collections
import json
import weakref

import pytest
import torch

from conftest import random_model
from minirl import train
from minirl.pretrained import load_pretrained
from minirl.generate import generate
from minirl.lora import add_lora, lora_parameters
from minirl.model import rope_cos_sin
from minirl.tiny import tiny_model_path

B, T = 2, 16


def adapted_model(layers: list[int], checkpoint_layers: bool = False):
    """Four random layers, LoRA on `layers`, B random too (a zero B would hide A's gradient)."""
    model = random_model(0, num_hidden_layers=4)
    add_lora(model, targets=("q_proj", "v_proj"), layers=layers, rank=4, alpha=8,
             generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0.0, 0.1, generator=g)
    model.checkpoint_layers = checkpoint_layers
    return model


def inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 96, (B, T), generator=g), torch.randn(B, T, 32, generator=g)  # ids, loss weights


def lora_grads(model, hidden, weights):
    (hidden * weights).sum().backward()
    return [p.grad.clone() for p in lora_parameters(model)]


def traced_forward(model, ids, **kwargs):
    """hidden_states(ids), recording per decoder layer: grad mode inside it, whether its output has a
    graph, and the tensors autograd saved while it ran (count, bytes; parameters not counted)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where, grad_mode, has_graph, saved = [None], {}, {}, collections.Counter()

    def enter(i):
        def hook(module, args):
            where[0], grad_mode[i] = i, torch.is_grad_enabled()
        return hook

    def leave(i):
        def hook(module, args, output):
            has_graph[i], where[0] = output.requires_grad and output.grad_fn is not None, "outside"
        return hook

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[where[0]] += 1
            saved["bytes"] += t.untyped_storage().nbytes()
        return t

    handles = [h for i, layer in enumerate(model.model.layers)
               for h in (layer.register_forward_pre_hook(enter(i)), layer.register_forward_hook(leave(i)))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = model.hidden_states(ids, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return hidden, grad_mode, has_graph, saved


@pytest.mark.parametrize("layers", [[3], [2, 3], [1, 3]])
def test_layers_below_the_first_adapter_keep_no_graph(layers):
    model = adapted_model(layers)
    ids, _ = inputs()
    hidden, grad_mode, has_graph, saved = traced_forward(model, ids)
    first = layers[0]
    for i in range(4):
        below = i < first
        assert grad_mode[i] is not below, f"layer {i}: grad enabled = {grad_mode[i]}"
        assert has_graph[i] is not below, f"layer {i}: output graph = {has_graph[i]}"
        assert (saved[i] == 0) is below, f"layer {i}: {saved[i]} tensors saved"
    assert hidden.requires_grad


@pytest.mark.parametrize("layers", [[3], [2, 3], [1, 3]])
def test_lora_gradients_equal_those_of_a_forward_with_every_layer_under_grad(layers):
    model = adapted_model(layers)
    ids, weights = inputs()
    fast = lora_grads(model, model.hidden_states(ids), weights)
    model.zero_grad(set_to_none=True)

    # The reference by hand: the embedding output requires grad, so every layer records its graph.
    x = model.model.embed_tokens(ids).detach().requires_grad_()  # (B, T, D)
    positions = torch.arange(T).expand(B, T)
    cos, sin = rope_cos_sin(positions, model.config.head_dim, model.config.rope_theta, x.dtype)
    h = x
    for layer in model.model.layers:
        h = layer(h, cos, sin, None)
    reference = lora_grads(model, model.model.norm(h), weights)
    assert x.grad is not None and x.grad.abs().max() > 0  # the reference did run the backward through layer 0
    assert all(g.abs().max() > 0 for g in reference)
    for got, want in zip(fast, reference):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layers", [[2, 3], [1, 3]])
@pytest.mark.parametrize("masked", [False, True])
def test_checkpoint_layers_same_gradients_fewer_saved_tensors(layers, masked):
    ids, weights = inputs()
    kwargs = {}
    if masked:  # an explicit bool mask, as tree packing passes: row 1 sees only the even positions before it
        mask = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T).clone()
        mask[1, 0] &= (torch.arange(T) % 2 == 0) | torch.eye(T, dtype=torch.bool)
        kwargs["mask"] = mask
    results = {}
    for on in (False, True):
        model = adapted_model(layers, checkpoint_layers=on)
        hidden, _, _, saved = traced_forward(model, ids, **kwargs)
        results[on] = saved, lora_grads(model, hidden, weights)
    (plain, g_plain), (ckpt, g_ckpt) = results[False], results[True]
    for a, b in zip(g_plain, g_ckpt):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    count = lambda s: sum(v for k, v in s.items() if k != "bytes")  # noqa: E731
    assert count(ckpt) < count(plain) and ckpt["bytes"] < plain["bytes"], (ckpt, plain)
    # What the layers keep is now held by the checkpoint (their inputs), none of it saved the usual way.
    assert all(ckpt[i] == 0 for i in range(4)), ckpt
    assert all(plain[i] > 0 for i in range(layers[0], 4))


def test_checkpoint_layers_is_off_for_a_cached_forward():
    """A cached forward with grad (never done in training, but allowed) must not be recomputed: the
    recomputation would write the cache again. It keeps what an uncheckpointed forward keeps."""
    ids, _ = inputs()
    saved = {}
    for on in (False, True):
        model = adapted_model([2, 3], checkpoint_layers=on)
        hidden, _, _, saved[on] = traced_forward(model, ids, cache=model.new_cache(B, T))
    assert saved[True] == saved[False] and saved[True]["bytes"] > 0


def test_train_flag_sets_checkpointing_and_changes_no_update(tmp_path, capsys, monkeypatch):
    seen = []
    real_train = train.train

    def spy(cfg, model, *args, **kwargs):
        result = real_train(cfg, model, *args, **kwargs)
        seen.append(model.checkpoint_layers)
        return result

    monkeypatch.setattr(train, "train", spy)
    run = ["--method", "tspmo", "--steps", "4", "--group-size", "8", "--eval-n", "5", "--eval-every", "100"]
    assert train.main([*run, "--out", str(tmp_path / "plain")]) == 0
    assert train.main([*run, "--checkpoint-layers", "--out", str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    assert seen == [False, True]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["checkpoint_layers"] is True
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors")) for name in ("plain", "ckpt"))
    assert any(bool(v.abs().max() > 0) for k, v in a.items() if "lora_B" in k)  # an update was taken
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- generation


def test_generate_frees_its_kv_cache():
    model, tokenizer = load_pretrained(tiny_model_path())
    buffers = []
    new_cache = model.new_cache

    def tracked(*args):
        cache = new_cache(*args)
        buffers.extend(weakref.ref(t) for kv in cache for t in kv)
        return cache

    model.new_cache = tracked
    prompt = tokenizer.encode("12*34=")
    out = generate(model, [prompt] * 4, 6, 0.3, tokenizer.eos_token_id, torch.Generator().manual_seed(0))
    # The cache, and the prefill's buffers for the one distinct prefix before they are copied into it.
    assert len(out) == 4 and len(buffers) == 2 * 2 * model.config.num_hidden_layers
    assert all(ref() is None for ref in buffers), "a KV cache buffer outlived generate"


@pytest.mark.parametrize("gen_batch", [0, 3, 8, 20])
def test_sample_group_in_chunks(gen_batch, monkeypatch):
    model, tokenizer = load_pretrained(tiny_model_path())
    calls = []

    def counting(model, prompts, *args):
        calls.append(len(prompts))
        return generate(model, prompts, *args)

    monkeypatch.setattr(train, "generate", counting)
    G, max_new = 8, 6
    cfg = train.TrainConfig(group_size=G, gen_batch=gen_batch, max_new_tokens=max_new, temperature=0.3)
    root = tokenizer.encode("12*34=")
    completions = train.sample_group(model, root, cfg, max_new, tokenizer.eos_token_ids, torch.Generator().manual_seed(0))
    assert calls == {0: [8], 3: [3, 3, 2], 8: [8], 20: [8]}[gen_batch]
    assert len(completions) == G
    eos = tokenizer.eos_token_id
    for c in completions:
        assert 1 <= len(c) <= max_new
        assert eos not in c[:-1]  # each ends at its first EOS
        assert c[-1] == eos or len(c) == max_new
    assert sum(c[-1] == eos for c in completions) > 0  # the tiny model does finish its answers
