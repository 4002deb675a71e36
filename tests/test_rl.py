"""The three losses against hand-written per-token references built from the model's full logits."""

from itertools import product

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_model
from minirl.lora import add_lora, disable_adapters, lora_parameters
from minirl.rl import grpo, sgrpo, tspmo
from minirl.rl.sgrpo import sample_token_subset
from minirl.train import TrainConfig

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


@pytest.mark.parametrize("beta, tau", [(0.0, 1.0), (0.04, 0.7)])
def test_grpo_gradient_matches_the_per_token_reference(beta, tau):
    model = lora_model()
    cfg = TrainConfig(beta=beta, temperature=tau)
    ours = grads_of(model, lambda: grpo.update(model, PREFIX, COMPLETIONS, REWARDS, cfg))
    expected = grads_of(model, lambda: reference_grpo(model, None, beta, tau))
    assert any(g.abs().max() > 1e-4 for g in expected)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sgrpo_gradient_matches_the_reference_on_its_token_subset():
    model = lora_model(1)
    cfg = TrainConfig(beta=0.02, temperature=0.9, alpha=1, k=2, p=0.5)
    ours = grads_of(model, lambda: sgrpo.update(model, PREFIX, COMPLETIONS, REWARDS, cfg, torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(3)
    keep = [sample_token_subset(len(c), 1, 2, 0.5, g) for c in COMPLETIONS]
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


@pytest.mark.parametrize("lam, tau", [(0.0, 1.0), (0.01, 0.3)])
def test_tspmo_gradient_matches_the_pairwise_reference(lam, tau):
    model = lora_model(2)
    cfg = TrainConfig(lam=lam, temperature=tau, train_batch=2)
    stats = None

    def ours_fn():
        nonlocal stats
        stats = tspmo.update(model, PREFIX, COMPLETIONS, REWARDS, cfg)

    ours = grads_of(model, ours_fn)

    def reference():
        pairs = brute_force_pairs(COMPLETIONS, REWARDS)
        total = 0.0
        for (p, v), A in pairs.items():
            ids = torch.tensor([PREFIX + list(p)])
            prob = torch.softmax(model(ids)[0, -1] / tau, dim=-1)[v]
            total = total + prob * A
        loss = -total / len(pairs) + lam * sum((w ** 2).sum() for w in lora_parameters(model))
        loss.backward()

    expected = grads_of(model, reference)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    pairs = brute_force_pairs(COMPLETIONS, REWARDS)
    assert stats.n_loss_terms == len(pairs)
    assert stats.n_computed == sum(1 for A in pairs.values() if A != 0) < len(pairs)


@pytest.mark.parametrize("update", [grpo.update, sgrpo.update])
def test_equal_rewards_give_no_update(update):
    model = lora_model(3)
    stats = None

    def run():
        nonlocal stats
        stats = update(model, PREFIX, COMPLETIONS, [1.0] * 4, TrainConfig(beta=0.04), torch.Generator().manual_seed(0))

    grads = grads_of(model, run)
    assert stats.skipped and all(float(g.abs().max()) == 0.0 for g in grads)


def test_tspmo_with_equal_rewards_only_applies_the_l2_term():
    model = lora_model(4)
    cfg = TrainConfig(lam=0.01)
    grads = grads_of(model, lambda: tspmo.update(model, PREFIX, COMPLETIONS, [0.0] * 4, cfg))
    for g, w in zip(grads, lora_parameters(model)):
        torch.testing.assert_close(g, 2 * 0.01 * w.detach())


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
        roots = buffer.roots("7", prompt, ns, nf, eos, random.Random(seed))
        assert len(roots) == ns + nf
        for root in roots:
            assert root[:2] == prompt and eos not in root
            seen.add(tuple(root[2:]))
    assert (1, 2, 3) in seen and () in seen and (4, 5) in seen
    assert buffer.roots("unknown", prompt, 2, 2, eos, random.Random(0)) == []
