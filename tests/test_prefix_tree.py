"""T-SPMO's prefix tree against a brute-force enumeration of every prefix (DESIGN.md, "T-SPMO")."""

import doctest
import math
import random
import sys
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minirl.prefix_tree
from minirl.errors import InputError
from minirl.prefix_tree import Pair, active_pairs, tspmo_pairs

# Groups of 1..8 completions of length 0..6 over a 3-token alphabet: small enough that prefixes are
# shared and proper prefixes of other completions occur; rewards either {0, 1} or arbitrary floats.
rewards_01 = st.sampled_from([0.0, 1.0])
rewards_float = st.floats(-10, 10, allow_nan=False)


@st.composite
def groups(draw, prefix_free: bool = False):
    G = draw(st.integers(1, 8))
    completions = draw(st.lists(st.lists(st.integers(0, 2), max_size=6), min_size=G, max_size=G))
    if prefix_free:  # every completion ends with EOS (token 9), as sampled completions do
        completions = [c + [9] for c in completions]
    reward = draw(st.sampled_from([rewards_01, rewards_float]))
    rewards = draw(st.lists(reward, min_size=G, max_size=G))
    return completions, rewards


def brute_force(completions, rewards) -> dict[tuple[tuple[int, ...], int], tuple[int, Fraction]]:
    """{(p, v): (first witness, A(v | p))} straight from the definitions, in exact arithmetic."""
    R = [Fraction(r) for r in rewards]

    def mu(p):
        S = [i for i, c in enumerate(completions) if tuple(c[:len(p)]) == p]
        return sum(R[i] for i in S) / len(S)

    out = {}
    for i, c in enumerate(completions):
        for t in range(len(c)):
            key = (tuple(c[:t]), c[t])
            if key not in out:
                out[key] = (i, mu(tuple(c[:t + 1])) - mu(tuple(c[:t])))
    return out


def by_prefix(completions, pairs) -> dict[tuple[tuple[int, ...], int], Pair]:
    return {(tuple(completions[q.completion][:q.position]), q.token): q for q in pairs}


def test_docstring_example():
    assert doctest.testmod(minirl.prefix_tree).failed == 0
    # the same example checked against fractions worked out by hand
    pairs = tspmo_pairs([[5, 7, 9], [5, 7, 2], [5, 3]], [1.0, 0.0, 1.0])
    hand = [(0, 0, 5, Fraction(0)), (0, 1, 7, Fraction(-1, 6)), (0, 2, 9, Fraction(1, 2)),
            (1, 2, 2, Fraction(-1, 2)), (2, 1, 3, Fraction(1, 3))]
    assert [(p.completion, p.position, p.token) for p in pairs] == [h[:3] for h in hand]
    for p, h in zip(pairs, hand):
        assert p.advantage == pytest.approx(float(h[3]), abs=1e-15)


@settings(max_examples=300, deadline=None)
@given(groups())
def test_matches_brute_force(group):
    completions, rewards = group
    pairs = tspmo_pairs(completions, rewards)
    expected = brute_force(completions, rewards)
    got = by_prefix(completions, pairs)
    assert len(got) == len(pairs), "a (prefix, token) pair was reported twice"
    assert set(got) == set(expected)
    for key, pair in got.items():
        witness, A = expected[key]
        assert pair.completion == witness
        assert completions[pair.completion][pair.position] == pair.token
        assert pair.advantage == pytest.approx(float(A), abs=1e-12)
    # the list comes sorted by (completion, position): the order the trie created the nodes in
    assert [(p.completion, p.position) for p in pairs] == sorted((p.completion, p.position) for p in pairs)


@settings(max_examples=200, deadline=None)
@given(groups())
def test_no_split_gives_exact_zero(group):
    """Where S(p + [v]) = S(p) — one child and no completion ending at p — A is exactly 0.0."""
    completions, rewards = group
    pairs = tspmo_pairs(completions, rewards)
    for pair in pairs:
        p = completions[pair.completion][:pair.position]
        through = [c for c in completions if c[:len(p)] == p]
        children = {c[len(p)] for c in through if len(c) > len(p)}
        ends_here = any(len(c) == len(p) for c in through)
        if len(children) == 1 and not ends_here:
            assert pair.advantage == 0.0 and math.copysign(1.0, pair.advantage) == 1.0
    assert active_pairs(pairs) == [q for q in pairs if q.advantage != 0.0]


@settings(max_examples=200, deadline=None)
@given(groups(prefix_free=True))
def test_one_child_prefix_has_zero_advantage_when_completions_end_with_eos(group):
    """Sampled completions end with EOS, so none is a proper prefix of another: one child ⇒ A = 0."""
    completions, rewards = group
    pairs = tspmo_pairs(completions, rewards)
    children: dict[tuple, set] = {}
    for p in pairs:
        children.setdefault(tuple(completions[p.completion][:p.position]), set()).add(p.token)
    for p in pairs:
        if len(children[tuple(completions[p.completion][:p.position])]) == 1:
            assert p.advantage == 0.0
    # and conversely a pair with A ≠ 0 sits at a prefix with several children
    assert all(len(children[tuple(completions[p.completion][:p.position])]) > 1 for p in active_pairs(pairs))


@settings(max_examples=200, deadline=None)
@given(groups())
def test_advantages_balance_at_every_prefix(group):
    """Σ_v |S(p+v)|·A(v|p) + Σ_{i ends at p} (R_i − μ(p)) = 0 at every prefix p.

    Where no completion ends at p (always, once completions end with EOS) this is Σ_v |S(p+v)|·A(v|p) = 0.
    """
    completions, rewards = group
    pairs = tspmo_pairs(completions, rewards)
    prefixes = {tuple(c[:t]) for c in completions for t in range(len(c) + 1)}
    for p in prefixes:
        S = [i for i, c in enumerate(completions) if tuple(c[:len(p)]) == p]
        mu = sum(rewards[i] for i in S) / len(S)
        total = sum(rewards[i] - mu for i in S if len(completions[i]) == len(p))
        for q in pairs:
            c = completions[q.completion]
            if q.position == len(p) and tuple(c[:len(p)]) == p:
                size = sum(1 for d in completions if d[:len(p) + 1] == c[:len(p) + 1])
                total += size * q.advantage
        assert abs(total) <= 1e-9 * max(1, len(completions))


@settings(max_examples=200, deadline=None)
@given(groups(), st.randoms(use_true_random=False))
def test_shuffling_completions_changes_nothing_but_the_witnesses(group, rnd):
    completions, rewards = group
    order = list(range(len(completions)))
    rnd.shuffle(order)
    shuffled = [completions[i] for i in order], [rewards[i] for i in order]

    def content(cs, rs):
        return {(tuple(cs[p.completion][:p.position]), p.token, p.advantage) for p in tspmo_pairs(cs, rs)}

    # fsum rounds once, so the advantages are bit-identical, not merely close
    assert content(completions, rewards) == content(*shuffled)


def test_empty_completions_count_in_the_group_mean_only():
    pairs = tspmo_pairs([[], [4], [4, 6]], [1.0, 0.0, 0.0])
    # μ(∅) = 1/3 includes the empty completion; it gives no pair of its own
    assert [(p.completion, p.position, p.token) for p in pairs] == [(1, 0, 4), (2, 1, 6)]
    assert pairs[0].advantage == pytest.approx(0.0 - 1 / 3)
    assert pairs[1].advantage == 0.0  # μ([4, 6]) = μ([4]) = 0, though S differs
    assert tspmo_pairs([[], []], [1.0, 0.0]) == []
    assert tspmo_pairs([], []) == []


def test_tokens_of_any_integer_type_hash_by_value():
    # 0-d tensors hash by identity; they must still share their prefixes
    as_tensors = [list(torch.tensor(c)) for c in ([1, 2, 3], [1, 2, 4])]
    assert tspmo_pairs(as_tensors, [1.0, 0.0]) == tspmo_pairs([[1, 2, 3], [1, 2, 4]], [1.0, 0.0])


def test_bad_input_is_named():
    with pytest.raises(InputError, match="rewards"):
        tspmo_pairs([[1], [2]], [1.0])
    with pytest.raises(InputError, match=r"rewards\[1\]"):
        tspmo_pairs([[1], [2]], [1.0, float("nan")])
    with pytest.raises(InputError, match=r"completions\[1\]\[2\].*float"):
        tspmo_pairs([[1], [2, 3, 4.0]], [1.0, 0.0])


def shared_prefix_group(G: int, L: int, shared: int, seed: int = 0):
    """G completions of length L that agree on their first `shared` tokens, then go their own way."""
    rng = random.Random(seed)
    stem = [rng.randrange(1000) for _ in range(shared)]
    completions = [stem + [rng.randrange(10**9) for _ in range(L - shared)] for _ in range(G)]
    rewards = [float(i % 2) for i in range(G)]
    return completions, rewards


def test_size_of_the_tree_on_a_long_shared_prefix():
    completions, rewards = shared_prefix_group(G=50, L=300, shared=250)
    assert len({c[250] for c in completions}) == 50  # the tails part at once
    pairs = tspmo_pairs(completions, rewards)
    # one pair per shared position, then 50 separate tails of 50 tokens
    assert len(pairs) == 250 + 50 * 50
    # only the branch point carries an advantage, R_i − 1/2; the stem and the tails have one child each
    active = active_pairs(pairs)
    assert [(p.completion, p.position) for p in active] == [(i, 250) for i in range(50)]
    assert [p.advantage for p in active] == [r - 0.5 for r in rewards]


def bytecodes_executed(fn, *args) -> int:
    """How many Python bytecode instructions fn(*args) runs: a measure of work that machine load cannot skew."""
    count = 0

    def trace(frame, event, arg):
        nonlocal count
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        fn(*args)
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize("small, large", [((20, 100), (20, 1000)), ((10, 60), (100, 60))])
def test_work_is_linear_in_the_number_of_tokens(small, large):
    def work(G, L):
        return bytecodes_executed(tspmo_pairs, *shared_prefix_group(G=G, L=L, shared=L - 10))

    # Ten times the tokens (ten times as long, or ten times as many completions): about ten times the
    # instructions, plus a fixed start-up. Walking every prefix again for each token, or every completion
    # for each prefix, would run about a hundred times as many.
    assert 6 < work(*large) / work(*small) < 12
