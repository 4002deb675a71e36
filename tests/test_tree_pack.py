"""The packed prefix-tree forward against the per-completion one: log-probs, T-SPMO gradients, size, mask."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_model
from minirl.errors import InputError
from minirl.logprobs import selected_logprobs
from minirl.lora import add_lora, lora_parameters
from minirl.prefix_tree import Pair, tspmo_pairs
from minirl.rl import tspmo
from minirl.tree_pack import pack_tree, tree_logprobs

TAU = 0.7
MODEL = random_model(0)


@st.composite
def groups(draw):
    """A root prefix and G completions that share random parts of a common stem, with rewards."""
    vocab = draw(st.integers(2, 96))  # small vocabularies also make completions meet again after parting
    token = st.integers(0, vocab - 1)
    prefix = draw(st.lists(token, min_size=1, max_size=5))
    stem = draw(st.lists(token, max_size=8))
    completions = [stem[:draw(st.integers(0, len(stem)))] + draw(st.lists(token, max_size=6))
                   for _ in range(draw(st.integers(1, 8)))]
    rewards = [draw(st.sampled_from([0.0, 0.25, 1.0])) for _ in completions]
    return prefix, completions, rewards


def unpacked_logprobs(model, prefix, completions, pairs):
    sequences = [prefix + c for c in completions]
    return selected_logprobs(model, sequences, [(p.completion, len(prefix) + p.position) for p in pairs], TAU)


@settings(max_examples=60, deadline=None)
@given(groups())
def test_packed_logprobs_match_unpacked_and_the_sequence_is_shorter(group):
    prefix, completions, rewards = group
    pairs = tspmo_pairs(completions, rewards)  # every pair, not only the active ones
    packed = pack_tree(prefix, completions, pairs)
    with torch.no_grad():
        ours = tree_logprobs(MODEL, prefix, completions, pairs, TAU, packed)  # (N,)
        ref = unpacked_logprobs(MODEL, prefix, completions, pairs)  # (N,)
    assert ours.shape == (len(pairs),)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # One position per distinct non-empty prefix p (the empty one is P's last token), nothing else.
    prefixes = {tuple(completions[p.completion][:p.position]) for p in pairs} - {()}
    assert len(packed.ids) == len(prefix) + len(prefixes)
    assert len(packed.ids) <= sum(len(prefix) + len(c) for c in completions)


@settings(max_examples=25, deadline=None)
@given(groups())
def test_tspmo_gradients_match_unpacked(group):
    prefix, completions, rewards = group
    model = random_model(1)
    add_lora(model, layers=[0, 1], rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
    params = lora_parameters(model)
    with torch.no_grad():  # B = 0 would leave A without gradient
        for p in params:
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))
    grads, losses = {}, {}
    for pack in (False, True):
        for p in params:
            p.grad = None
        losses[pack] = tspmo.accumulate_gradients(model, prefix, completions, rewards, temperature=TAU,
                                                  train_batch=3, tree_pack=pack).loss
        grads[pack] = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    assert losses[True] == pytest.approx(losses[False], abs=1e-6)
    for packed, unpacked in zip(grads[True], grads[False]):
        torch.testing.assert_close(packed, unpacked, atol=1e-5, rtol=1e-4)


def test_mask_is_the_tree_and_positions_are_depths():
    prefix, completions = [3, 1], [[5, 6, 7], [8, 9]]
    pairs = tspmo_pairs(completions, [1.0, 0.0])
    packed = pack_tree(prefix, completions, pairs)
    assert packed.ids.tolist() == [3, 1, 5, 6, 8]  # 7 and 9 are only predicted, never read
    assert packed.positions.tolist() == [0, 1, 2, 3, 2]
    assert packed.mask[4].tolist() == [True, True, False, False, True]  # 8 does not see the other branch
    assert packed.rows.tolist() == [1, 2, 3, 1, 4]
    with torch.no_grad():
        ref = unpacked_logprobs(MODEL, prefix, completions, pairs)
        good = tree_logprobs(MODEL, prefix, completions, pairs, TAU, packed)
        causal = tree_logprobs(MODEL, prefix, completions, pairs, TAU, packed._replace(mask=torch.ones(5, 5).tril().bool()))
        flat = tree_logprobs(MODEL, prefix, completions, pairs, TAU, packed._replace(positions=torch.arange(5)))
    torch.testing.assert_close(good, ref, atol=1e-5, rtol=0)
    assert (causal - ref).abs()[4] > 1e-3  # P(9 | 3 1 8) would also see 5 and 6
    assert (flat - ref).abs()[4] > 1e-3  # 8 would sit two positions too far from the prompt


def test_bad_input():
    with pytest.raises(InputError, match="prefix"):
        pack_tree([], [[1, 2]], [Pair(0, 0, 1, 0.5)])
    with pytest.raises(InputError, match=r"pairs\[0\]"):
        pack_tree([4], [[1, 2]], [Pair(0, 1, 7, 0.5)])
