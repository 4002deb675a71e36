"""The three losses against hand-written per-token references built from the model's full logits."""

import random
from itertools import product

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_model
from minirl.lora import add_lora, disable_adapters, lora_parameters
from minirl.rl import grpo, sgrpo, tspmo
from minirl.rl.sgrpo import sample_token_subset

PREFIX = [5, 9, 2]
COMPLETIONS = [[7, 7, 3, 1], [7, 7, 4], [7, 8, 3, 1, 6], [2]]
REWARDS = [1.0, 0.0, 1.0, 0.0]


def lora_model(seed=0):
    model = random_model(seed)
    add_lora(model, targets=("q_proj", "v_proj"), layers=[1], rank=4, alpha=8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # B = 0 would make the adapted and the reference policy equal; move away from it
        for p in lora_parameters(model):
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed + 1))
    return model


def token_logprobs(model, prefix, completion, temperature):
    """log π(c_t | P + c_<t) for every t, from the full logits: the naive reference."""
    ids = torch.tensor([prefix + completion])
    logp = torch.log_softmax(model(ids)[0].float() / temperature, dim=-1)  # (T, V)
    rows = torch.arange(len(prefix) - 1, len(prefix) + len(completion) - 1)
    return logp[rows, torch.tensor(completion)]


def grads_of(model, loss_fn):
    params = lora_parameters(model)
    for p in params:
        p.grad = None
    loss_fn()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def reference_grpo(model, keep, beta, tau):
    r = torch.tensor(REWARDS, dtype=torch.float64)
    A = (r - r.mean()) / (r.std() + 1e-4)
    total = 0.0
    for i, c in enumerate(COMPLETIONS):
        logp = token_logprobs(model, PREFIX, c, tau)
        with torch.no_grad(), disable_adapters(model):
            ref = token_logprobs(model, PREFIX, c, tau)
        idx = torch.tensor(keep[i] if keep else list(range(len(c))))
        delta = ref[idx] - logp[idx]
        total = total + (-float(A[i]) * logp[idx] + beta * (delta.exp() - delta - 1)).mean()
    (total / len(COMPLETIONS)).backward()


@pytest.mark.parametrize("beta, tau, train_batch", [(0.0, 1.0, 1), (0.04, 0.7, 1), (0.04, 0.7, 3), (0.04, 0.7, 8)])
def test_grpo_gradient_matches_the_per_token_reference(beta, tau, train_batch):
    """One completion per forward (the paper's accumulation), or several: the same gradient."""
    model = lora_model()
    ours = grads_of(model, lambda: grpo.accumulate_gradients(model, PREFIX, COMPLETIONS, REWARDS, beta=beta,
                                                             temperature=tau, train_batch=train_batch))
    expected = grads_of(model, lambda: reference_grpo(model, None, beta, tau))
    assert any(g.abs().max() > 1e-4 for g in expected)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sgrpo_gradient_matches_the_reference_on_its_token_subset():
    model = lora_model(1)
    g = torch.Generator().manual_seed(3)
    keep = [sample_token_subset(len(c), 1, 2, 0.5, g) for c in COMPLETIONS]
    ours = grads_of(model, lambda: grpo.accumulate_gradients(model, PREFIX, COMPLETIONS, REWARDS, beta=0.02,
                                                             temperature=0.9, train_batch=2, keep=keep))
    assert any(len(k) < len(c) for k, c in zip(keep, COMPLETIONS))  # the subset really drops tokens
    expected = grads_of(model, lambda: reference_grpo(model, keep, 0.02, 0.9))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def brute_force_pairs(completions, rewards):
    """{(prefix, token): A} straight from the definition: S(p), μ(p), A(v|p) = μ(p+v) − μ(p)."""
    def mu(p):
        members = [r for c, r in zip(completions, rewards) if tuple(c[:len(p)]) == p]
        return sum(members) / len(members)
    pairs = {}
    for c in completions:
        for t in range(len(c)):
            p = tuple(c[:t])
            pairs[(p, c[t])] = mu(p + (c[t],)) - mu(p)
    return pairs


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_tspmo_gradient_matches_the_pairwise_reference(tau):
    model = lora_model(2)
    stats = None

    def ours_fn():
        nonlocal stats
        stats = tspmo.accumulate_gradients(model, PREFIX, COMPLETIONS, REWARDS, temperature=tau, train_batch=2)

    ours = grads_of(model, ours_fn)

    def reference():
        pairs = brute_force_pairs(COMPLETIONS, REWARDS)
        total = 0.0
        for (p, v), A in pairs.items():
            ids = torch.tensor([PREFIX + list(p)])
            prob = torch.softmax(model(ids)[0, -1] / tau, dim=-1)[v]
            total = total + prob * A
        loss = -total / len(pairs)  # λ is the optimizer's weight decay, never a gradient (train.make_optimizer)
        loss.backward()

    expected = grads_of(model, reference)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    pairs = brute_force_pairs(COMPLETIONS, REWARDS)
    assert stats.n_loss_terms == len(pairs)
    assert stats.n_computed == sum(1 for A in pairs.values() if A != 0) < len(pairs)


@pytest.mark.parametrize("accumulate", [
    lambda model, rewards: grpo.accumulate_gradients(model, PREFIX, COMPLETIONS, rewards, beta=0.04, temperature=1.0),
    lambda model, rewards: tspmo.accumulate_gradients(model, PREFIX, COMPLETIONS, rewards, temperature=1.0),
], ids=["grpo", "tspmo"])
def test_equal_rewards_carry_no_signal(accumulate):
    model = lora_model(3)
    stats = {}
    grads = grads_of(model, lambda: stats.update(equal=accumulate(model, [1.0] * 4)))
    assert not stats["equal"].has_signal and all(float(g.abs().max()) == 0.0 for g in grads)
    grads_of(model, lambda: stats.update(mixed=accumulate(model, REWARDS)))
    assert stats["mixed"].has_signal


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 80), st.integers(0, 10), st.integers(1, 20), st.floats(0, 1), st.integers(0, 2**31))
def test_sgrpo_never_keeps_more_than_max_alpha_k(length, alpha, k, p, seed):
    kept = sample_token_subset(length, alpha, k, p, torch.Generator().manual_seed(seed))
    assert len(kept) <= max(alpha, k) <= alpha + k
    assert kept == sorted(set(kept)) and all(0 <= t < length for t in kept)
    assert kept[:min(alpha, length)] == list(range(min(alpha, length)))  # the first α are always there


def test_replay_roots_cut_stored_completions_within_bounds():
    import random

    buffer = tspmo.ReplayBuffer(threshold=1.0)
    eos = 99
    buffer.add("7", [[1, 2, 3, eos], [4, 5], [6]], [1.0, 0.0, 1.0])
    prompt = [10, 11]
    seen = set()
    for seed, (ns, nf) in product(range(30), [(1, 0), (2, 1)]):
        roots = buffer.roots("7", prompt, ns, nf, [eos], 8, random.Random(seed))
        assert len(roots) == ns + nf
        for root in roots:
            assert root[:2] == prompt and eos not in root
            seen.add(tuple(root[2:]))
    assert (1, 2, 3) in seen and () in seen and (4, 5) in seen
    assert buffer.roots("unknown", prompt, 2, 2, [eos], 8, random.Random(0)) == []


# ----------------------------------------------------------------------------- S-GRPO's token subset


def reference_subset(length, alpha, k, p, seed):
    """The walk of rl/sgrpo.py written out from its definition, on the same coins."""
    coins = torch.rand(length, generator=torch.Generator().manual_seed(seed))
    kept = []
    for t in range(length):
        if len(kept) >= max(k, alpha) or (t >= alpha and len(kept) >= k):
            break
        if t < alpha or coins[t] < p:
            kept.append(t)
    return kept


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 60), st.integers(0, 6), st.integers(1, 12), st.sampled_from([0.0, 0.3, 0.5, 1.0]),
       st.integers(0, 2**31))
def test_sgrpo_subset_is_the_walk_of_its_definition(length, alpha, k, p, seed):
    assert sample_token_subset(length, alpha, k, p, torch.Generator().manual_seed(seed)) == \
        reference_subset(length, alpha, k, p, seed)


def test_sgrpo_keeps_each_later_token_with_probability_p():
    # α = 2, k never reached: each of the 98 later tokens is a coin with P(keep) = p. Over 200 subsets
    # that is 19,600 coins, whose kept fraction has a standard deviation of at most 0.0036.
    for p in (0.2, 0.5, 0.8):
        kept = [len(sample_token_subset(100, 2, 1000, p, torch.Generator().manual_seed(s))) - 2 for s in range(200)]
        assert abs(sum(kept) / (200 * 98) - p) < 0.02, p


def test_sgrpo_stops_exactly_at_k():
    assert sample_token_subset(50, 2, 7, 1.0) == list(range(7))  # every coin keeps: the first k, then stop
    for seed in range(50):
        kept = sample_token_subset(400, 3, 9, 0.5, torch.Generator().manual_seed(seed))
        assert len(kept) == 9 and kept[:3] == [0, 1, 2]  # long enough that k is always reached
    assert sample_token_subset(20, 6, 3, 1.0) == list(range(6))  # α > k: the first α are kept all the same


# ----------------------------------------------------------------------------- T-SPMO's step and its replay


class Draw:
    def __init__(self, key, prompt, seed=0):
        self.key, self.prompt, self.rng = key, prompt, random.Random(seed)


def run_tspmo_step(model, draws, continuations, scores, replay, max_new_tokens=6, **kw):
    """tspmo.train_step with scripted samples and rewards; returns (stats, what each callable was given)."""
    calls = {"sample": [], "score": [], "step": []}

    def sample(draw, root, max_new):
        calls["sample"].append((draw.key, list(root), max_new))
        return [c[:max_new] for c in continuations(root)]

    def score(draw, answer):
        calls["score"].append((draw.key, list(answer)))
        return scores(answer)

    def optimizer_step(has_signal, loss):
        calls["step"].append(has_signal)
        for p in lora_parameters(model):
            p.grad = None

    settings_ = dict(temperature=1.0, train_batch=4, tree_pack=False, replay_success=1, replay_failure=0,
                     max_new_tokens=max_new_tokens, stop_ids=[99])
    settings_.update(kw)
    stats = tspmo.train_step(model, draws, sample, score, optimizer_step, replay, **settings_)
    return stats, calls


def test_replay_round_samples_from_a_cut_answer_and_scores_the_whole_answer():
    """A first success is replayed in the same step: cut, continued within the cap, scored with its tail."""
    model = lora_model(5)
    prompt = [5, 9, 2]
    fresh = [[7, 7, 3, 99], [7, 8, 99], [4, 99]]
    replay = tspmo.ReplayBuffer(threshold=1.0)
    success = lambda answer: float(3 in answer and 8 not in answer and answer[-1] == 99)  # noqa: E731
    groups = iter([fresh, [[3, 99], [8, 1, 99], [1, 1, 1, 1, 1, 1]]])
    seed = next(s for s in range(100) if random.Random(s).randint(0, 3) > 0)  # a cut that keeps part of the answer
    stats, calls = run_tspmo_step(model, [Draw("3", prompt, seed=seed)], lambda root: next(groups), success, replay)
    # Two groups: the fresh one and one replayed from the only success, [7, 7, 3, 99], cut before its EOS.
    assert len(calls["sample"]) == 2 and calls["step"] == [True, True]
    (_, root0, cap0), (_, root1, cap1) = calls["sample"]
    assert (root0, cap0) == (prompt, 6)
    tail = root1[len(prompt):]
    assert root1[:len(prompt)] == prompt and tail and tail == [7, 7, 3][:len(tail)]
    assert cap1 == 6 - len(tail)  # what is left of the cap
    # The replayed group is scored as whole answers: the tail, then each continuation (cut to the cap).
    scored = [answer for _, answer in calls["score"][3:]]
    assert scored == [tail + c[:cap1] for c in [[3, 99], [8, 1, 99], [1, 1, 1, 1, 1, 1]]]
    assert all(len(answer) <= 6 for answer in scored)
    # The buffer holds every answer of both groups, whole, split by reward.
    stored = replay.store["3"]["success"] + replay.store["3"]["failure"]
    assert sorted(map(tuple, stored)) == sorted({tuple(a) for a in fresh + scored if a})
    assert replay.store["3"]["success"] == [a for a in [fresh[0]] + scored if success(a)]
    assert stats.rewards == [1.0, 0.0, 0.0]  # the fresh group's rewards only


def test_tspmo_step_takes_no_optimizer_step_on_groups_without_signal():
    model = lora_model(6)
    replay = tspmo.ReplayBuffer(threshold=1.0)
    _, calls = run_tspmo_step(model, [Draw("0", [5, 9])], lambda root: [[7, 99], [8, 99]], lambda a: 0.0, replay)
    assert calls["step"] == [False]  # no success: nothing to replay, and the tied group carries nothing


def test_replay_roots_leave_room_under_the_cap():
    buffer = tspmo.ReplayBuffer(threshold=1.0)
    buffer.add("1", [[1, 2, 3, 4]], [1.0])  # an answer that reached the cap of 4 without an EOS
    cuts = {len(buffer.roots("1", [9], 1, 0, [99], 4, random.Random(s))) and
            len(buffer.roots("1", [9], 1, 0, [99], 4, random.Random(s))[0]) - 1 for s in range(200)}
    assert cuts == {0, 1, 2, 3}  # uniform over 0..3 tokens of it: never all 4, which would leave nothing


def test_replay_state_is_a_copy():
    buffer = tspmo.ReplayBuffer(threshold=1.0)
    buffer.add("1", [[1, 2]], [1.0])
    state = buffer.state_dict()
    buffer.add("1", [[3]], [1.0])
    buffer.add("2", [[4]], [0.0])
    assert state["store"] == {"1": {"success": [[1, 2]], "failure": []}}
    other = tspmo.ReplayBuffer(threshold=0.5)
    other.load_state_dict(state)
    state["store"]["1"]["success"].append([9])
    assert other.store == {"1": {"success": [[1, 2]], "failure": []}} and other.threshold == 1.0
