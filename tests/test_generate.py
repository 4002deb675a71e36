"""generate's fast paths against its plain one: packed prefill, the inverse-CDF sampler, the static-shape
(compiled) decode step and its fallback, and oneDNN's matmuls. Parity with transformers is in test_model.py."""

import importlib
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import random_model
from minirl import generate
from minirl.errors import InputError
from minirl.model import grouped_query_attention

gen = importlib.import_module("minirl.generate")  # the module: `minirl.generate` itself names the function

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13], [8, 9]]


def test_inverse_cdf_takes_the_first_token_whose_cumulative_mass_reaches_u():
    logits = torch.tensor([[-math.inf, math.log(0.25), -math.inf, math.log(0.75), -math.inf]]).expand(6, 5)
    u = torch.tensor([1e-12, 0.2, 0.25, 0.2500001, 0.9, 1.0], dtype=torch.float64)
    # Tokens 0, 2 and 4 have probability 0 and are never drawn, not even at the ends of (0, 1].
    assert gen.sample_next(logits.clone(), 1.0, 1.0, u).tolist() == [1, 1, 1, 3, 3, 3]  # it overwrites them
    assert gen.sample_next(logits, 0.0, 1.0, u).tolist() == [3] * 6  # τ = 0: argmax


def test_inverse_cdf_across_blocks_lands_on_the_right_token():
    weights = torch.zeros(7, 1024)  # four blocks of 256; the mass at the end of one, the start of the next
    weights[:, 255], weights[:, 256], weights[:, 700] = 1.0, 1.0, 2.0
    u = torch.tensor([1e-12, 0.25, 0.2500001, 0.5, 0.5000001, 0.99, 1.0], dtype=torch.float64)
    assert gen.inverse_cdf(weights, u).tolist() == [255, 255, 256, 256, 700, 700, 700]


def test_one_block_and_two_levels_draw_the_same_tokens():
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(1, 200, generator=g) * (torch.rand(1, 200, generator=g) > 0.3)  # some of probability 0
    u = torch.linspace(1e-9, 1.0, 5000, dtype=torch.float64)
    one = gen.inverse_cdf(weights.expand(5000, 200), u)  # V = 200: one block
    two = gen.inverse_cdf(F.pad(weights, (0, 824)).expand(5000, 1024), u)  # zeros to V = 1024: four blocks
    assert gen.cdf_block(200) == 200 and gen.cdf_block(1024) == 256
    assert torch.equal(one, two) and bool((weights[0, one] > 0).all())
    assert len(set(one.tolist())) > 100  # the grid reaches most tokens, not a few


def test_grouped_query_attention_equals_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 6, 1, 8, generator=g), torch.randn(3, 2, 10, 8, generator=g), torch.randn(3, 2, 10, 8, generator=g)
    mask = torch.rand(3, 1, 1, 10, generator=g) > 0.4
    mask[..., -1] = True  # a decode step always sees its own token
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(grouped_query_attention(q, k, v, mask), expected, atol=1e-6)


def test_top_p_cut_tokens_are_never_drawn_at_any_u():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]])).expand(1000, 4)
    u = torch.linspace(1e-9, 1.0, 1000, dtype=torch.float64)
    drawn = gen.sample_next(logits, 1.0, 0.7, u)  # nucleus: 0.5 then 0.25 (mass before 0.15 is 0.75 ≥ 0.7)
    assert set(drawn.tolist()) == {1, 3}
    assert (drawn == 1).float().mean().item() == pytest.approx(0.5 / 0.75, abs=0.002)


def test_prompt_token_ids_are_checked_once_before_decoding():
    model = random_model()
    with pytest.raises(InputError, match="token id 96 is outside the vocabulary"):
        generate(model, [[1, 2], [3, 96]], 4)


def test_prefill_runs_each_distinct_prefix_once_and_packs_them(monkeypatch):
    model = random_model(seed=2)
    alone = {tuple(p): generate(model, [p], 6, temperature=0.0)[0] for p in PROMPTS}
    forwards = []
    hidden_states = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda ids, **kw: forwards.append(ids.shape) or hidden_states(ids, **kw))
    out = generate(model, PROMPTS, 6, temperature=0.0)
    assert out == [alone[tuple(p)] for p in PROMPTS]
    # One packed prefill forward of the three distinct prefixes (7 + 2 + 4 tokens), then 5 decode steps.
    assert forwards == [(1, 13)] + [(4, 1)] * 5
    # Prefixes of about one length: one padded batch of the distinct ones.
    near = [[1, 2, 3, 4], [5, 6, 7], [1, 2, 3, 4], [8, 9, 10, 11]]
    alone = [generate(model, [p], 6, temperature=0.0)[0] for p in near]
    forwards.clear()
    assert generate(model, near, 6, temperature=0.0) == alone
    assert forwards == [(3, 4)] + [(4, 1)] * 5


def test_prefill_in_several_packs_equals_each_prefix_alone(monkeypatch):
    model = random_model(seed=4)
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16], [17]]
    alone = [generate(model, [p], 5, temperature=0.0)[0] for p in prompts]
    monkeypatch.setattr(gen, "pack_tokens", lambda config: 6)  # packs of lengths [3], [4, 2], [7] (longer than a pack), [1]
    assert generate(model, prompts, 5, temperature=0.0) == alone


def test_the_sampled_stream_does_not_depend_on_when_rows_stop():
    model = random_model(seed=13)
    prompts = [[3, 4], [5], [3, 4]]
    free = generate(model, prompts, 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert free[0] != free[2]  # identical prefixes, independent draws
    eos = free[1][2]
    stopped = generate(model, prompts, 10, temperature=1.0, eos_token_id=[eos, 95],
                       generator=torch.Generator().manual_seed(7))
    for full, cut in zip(free, stopped):
        end = next((j + 1 for j, tok in enumerate(full) if tok in (eos, 95)), len(full))
        assert cut == full[:end]


@pytest.fixture
def fresh_compile_state(monkeypatch):
    monkeypatch.setattr(gen, "_compiled", {})
    monkeypatch.setattr(gen, "_warned", set())


def test_static_shape_decode_step_matches_the_plain_one(monkeypatch, fresh_compile_state):
    """What torch.compile traces, run eagerly: tensor slots, the whole (bucketed) cache attended."""
    calls = []

    def fake_compile(fn, **kwargs):
        return lambda *args: calls.append(args[3]) or fn(*args)

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = random_model(seed=5)
    for kwargs in (dict(temperature=0.0, eos_token_id=7), dict(temperature=0.8)):
        plain = generate(model, PROMPTS, 9, generator=torch.Generator().manual_seed(1), compile=False, **kwargs)
        static = generate(model, PROMPTS, 9, generator=torch.Generator().manual_seed(1), compile=True, **kwargs)
        assert static == plain
    assert calls and all(isinstance(slot, torch.Tensor) and slot.shape == (1,) for slot in calls)


@pytest.mark.parametrize("where", ["compile", "first call"])
def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch, fresh_compile_state, where):
    def broken(*args, **kwargs):
        raise RuntimeError("no working C compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken if where == "compile" else lambda fn, **kw: broken)
    model = random_model(seed=6)
    expected = generate(model, PROMPTS, 6, temperature=0.0, compile=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert generate(model, PROMPTS, 6, temperature=0.0, compile=True) == expected
        assert generate(model, PROMPTS[:2], 6, temperature=0.0, compile=True) == expected[:2]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "no working C compiler found" in messages[0] and "\n" not in messages[0]


@pytest.mark.slow
def test_compiled_decode_matches_eager(fresh_compile_state):
    model = random_model(seed=8)
    for kwargs in (dict(temperature=0.0, eos_token_id=7), dict(temperature=0.8)):
        plain = generate(model, PROMPTS, 9, generator=torch.Generator().manual_seed(1), compile=False, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = generate(model, PROMPTS, 9, generator=torch.Generator().manual_seed(1), compile=True, **kwargs)
        assert not [w for w in caught if "minirl.generate" in str(w.message)]  # it really compiled
        assert compiled == plain


@pytest.mark.skipif(not gen.onednn_available(torch.device("cpu")), reason="oneDNN's matmul needs an x86 CPU")
def test_onednn_decode_matches_nn_linear_and_leaves_the_model_as_it_was(monkeypatch):
    model = random_model(seed=9, vocab_size=2 ** 19 // 32)  # lm_head 16,384 × 32: just large enough
    used = []
    forward = gen._onednn_forward
    monkeypatch.setattr(gen, "_onednn_forward", lambda m, packed, x: used.append(m) or forward(m, packed, x))
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0)):
        plain = generate(model, PROMPTS, 6, generator=torch.Generator().manual_seed(2), onednn=False, **kwargs)
        fast = generate(model, PROMPTS, 6, generator=torch.Generator().manual_seed(2), onednn=True, **kwargs)
        assert fast == plain
    assert used and set(used) == {model.lm_head}  # the layers' matrices are below the threshold
    assert "forward" not in vars(model.lm_head)

    # The reordered copy follows the weight: written in place (a new version), or replaced by another tensor.
    for change in (lambda w: w.mul_(-1.5), lambda w: setattr(model.lm_head, "weight", nn.Parameter(w.flip(0)))):
        with torch.no_grad():
            change(model.lm_head.weight)
        plain = generate(model, PROMPTS, 6, temperature=0.0, onednn=False)
        assert generate(model, PROMPTS, 6, temperature=0.0, onednn=True) == plain

    # Past REORDER_MAX_BYTES no copy is made or kept: oneDNN multiplies on the plain weight.
    gen.reordered_weights.clear()
    monkeypatch.setattr(gen, "REORDER_MAX_BYTES", 0)
    plain = generate(model, PROMPTS, 6, temperature=0.0, onednn=False)
    assert generate(model, PROMPTS, 6, temperature=0.0, onednn=True) == plain
    assert model.lm_head not in gen.reordered_weights

    def fail(*args):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(gen, "sample_next", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        generate(model, PROMPTS, 6, onednn=True)
    assert "forward" not in vars(model.lm_head)  # restored on the way out of an error too
