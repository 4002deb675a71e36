"""T-SPMO: token-specific prefix matching optimisation, and its replay (DESIGN.md, "T-SPMO").

A group of G completions from one root prefix P forms a prefix tree. For every unique pair (p, v)
in it — a prefix p of some completion and the token v that follows it there —

    A(v | p) = μ(p + [v]) − μ(p),     μ(p) = mean reward of the completions that start with p,

    J(θ) = (1/|U|) Σ_{(p,v)∈U} π_θ(v | P + p) · A(v | p) − λ Σ_{W ∈ LoRA} ‖W‖²,    loss = −J.

The objective uses π, not log π, as the paper writes it. A prefix with one child has A = 0, so
only pairs at branch points carry gradient: only their log-probs are computed (by the fused kernel,
one row per pair), while |U| still counts every pair. No clipping, no old policy, one update a group.

Replay: completions already generated are kept per problem, split into successes (R ≥ r) and
failures (R < r). Each step restarts from up to C_success successes and C_failure failures of the
current problem, each cut at a position t drawn uniformly from the prompt's end to the completion's
end (its final EOS excluded, so there is something left to sample); G fresh continuations from that
root make one more tree and one more update. Completions of the current step join the buffer before
the draw, so a first success is replayed at once.
"""

import random
from collections import defaultdict

import torch

from minirl.logprobs import selected_logprobs
from minirl.lora import lora_l2
from minirl.prefix_tree import tspmo_pairs
from minirl.rl.grpo import StepStats
from minirl.tree_pack import tree_logprobs


def update(model, prefix, completions, rewards, cfg, generator=None) -> StepStats:
    """One T-SPMO update of one tree; `cfg` supplies lam, temperature, train_batch and tree_pack."""
    pairs = tspmo_pairs(completions, rewards)
    active = [pair for pair in pairs if pair.advantage != 0.0]
    stats = StepStats(n_loss_terms=len(pairs), n_computed=len(active))
    if cfg.tree_pack:
        if active:  # the whole tree in one forward (minirl/tree_pack.py)
            logp = tree_logprobs(model, prefix, completions, active, cfg.temperature)  # (n_active,)
            stats.loss += backward_pi_a(logp, [pair.advantage for pair in active], len(pairs))
    else:  # the completions that hold an active pair, train_batch of them per forward
        by_completion = defaultdict(list)
        for pair in active:
            by_completion[pair.completion].append(pair)
        order = sorted(by_completion)
        for start in range(0, len(order), cfg.train_batch):
            chunk = order[start:start + cfg.train_batch]
            sequences = [prefix + completions[c] for c in chunk]
            picks, advantages = [], []
            for row, c in enumerate(chunk):
                for pair in by_completion[c]:
                    picks.append((row, len(prefix) + pair.position))
                    advantages.append(pair.advantage)
            logp = selected_logprobs(model, sequences, picks, cfg.temperature)  # (n_pairs,)
            stats.loss += backward_pi_a(logp, advantages, len(pairs))
    if cfg.lam > 0:
        penalty = cfg.lam * lora_l2(model)
        penalty.backward()
        stats.loss += penalty.item()
    stats.skipped = not active
    return stats


def backward_pi_a(logp, advantages: list[float], n_pairs: int) -> float:
    """Backpropagates this part of −(1/|U|) Σ π(v | p)·A(v | p), |U| = n_pairs; returns its value."""
    A = torch.tensor(advantages, dtype=logp.dtype, device=logp.device)
    loss = -(torch.exp(logp) * A).sum() / n_pairs
    loss.backward()
    return loss.item()


class ReplayBuffer:
    """Completions per problem (token ids after the prompt), split by reward; JSON-serialisable."""

    def __init__(self, threshold: float, capacity: int = 64):
        self.threshold, self.capacity = threshold, capacity
        self.store: dict[str, dict[str, list[list[int]]]] = {}

    def add(self, problem: str, completions: list[list[int]], rewards: list[float]):
        entry = self.store.setdefault(problem, {"success": [], "failure": []})
        for completion, reward in zip(completions, rewards):
            kind = "success" if reward >= self.threshold else "failure"
            if completion and completion not in entry[kind]:
                entry[kind].append(completion)
                del entry[kind][:-self.capacity]  # keep the newest `capacity`

    def roots(self, problem: str, prompt: list[int], n_success: int, n_failure: int, eos_token_id: int | None,
              rng: random.Random) -> list[list[int]]:
        """Root prefixes for replayed groups: the prompt plus a uniformly cut part of stored completions."""
        entry = self.store.get(problem, {"success": [], "failure": []})
        roots = []
        for kind, budget in (("success", n_success), ("failure", n_failure)):
            for completion in rng.sample(entry[kind], min(budget, len(entry[kind]))):
                end = len(completion) - (1 if completion[-1] == eos_token_id else 0)
                roots.append(prompt + completion[:rng.randint(0, end)])
        return roots

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "capacity": self.capacity, "store": self.store}

    def load_state_dict(self, state: dict):
        self.threshold, self.capacity, self.store = state["threshold"], state["capacity"], state["store"]
