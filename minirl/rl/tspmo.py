"""T-SPMO: token-specific prefix matching optimisation, with its replay (DESIGN.md, "T-SPMO"; the paper's §2.2).

A group of G completions from one root prefix P forms a prefix tree. For every unique pair (p, v)
in it — a prefix p of some completion and the token v that follows it there —

    A(v | p) = μ(p + [v]) − μ(p),     μ(p) = mean reward of the completions that start with p,

    J(θ) = (1/|U|) Σ_{(p,v)∈U} π_θ(v | P + p) · A(v | p) − λ Σ_{W ∈ LoRA} ‖W‖²,    loss = −J.

The objective uses π, not log π, as the paper writes it. A prefix with one child has A = 0, so
only pairs at branch points carry gradient: only their log-probs are computed (by the fused kernel,
one row per pair), while |U| still counts every pair. No clipping, no old policy, one update a tree
with a signal; a tree whose rewards all tie has none.

λ is not in the backpropagated loss: train.py gives AdamW a decoupled weight decay of 2λ, so each
update also takes W ← W − lr · 2λ · W, the plain gradient step of the penalty (its gradient is 2λW).
Through Adam the penalty's gradient would be normalised like any other: on a tree with no reward
difference, or on A while B is still zero, it is the whole gradient, and Adam turns it into a step of
size lr toward zero for every entry, whatever λ is. On SmolLM2-135M at the paper's lr 1e-4 and λ 0.01
that emptied the adapter within 450 steps (‖A‖ from 1.63 to 0.12; README, "Limits").

Replay. Completions already generated are kept per problem, split into successes (R ≥ r) and
failures (R < r). Each step:
  1. samples a fresh group from each problem's prompt, scores it, and takes one optimizer step (if any
     of its trees has a signal);
  2. adds those answers to the buffer, then draws up to C_success successes and C_failure failures of
     the problem from it (so a first success is replayed at once), each cut at a position t drawn
     uniformly from the prompt's end to the answer's end (its final EOS excluded);
  3. samples G continuations of each cut answer — at most what is left of the max_new_tokens cap, so
     a replayed answer is never longer than a fresh one — and scores each as the whole answer, the
     replayed part followed by the continuation; each such tree is one more optimizer step (with a signal).
Under torchrun the buffer is one logical buffer: every rank adds every rank's groups in the same
order (distributed.gather_json), so W ranks hold what one process with W problems per step holds.
"""

import random
from collections import defaultdict

import torch

from minirl.distributed import all_max, gather_json
from minirl.logprobs import selected_logprobs
from minirl.prefix_tree import active_pairs, tspmo_pairs
from minirl.rl import GroupStats, StepStats
from minirl.tree_pack import tree_logprobs


def accumulate_gradients(model, prefix: list[int], completions: list[list[int]], rewards: list[float], *,
                         temperature: float, train_batch: int = 8, tree_pack: bool = False) -> GroupStats:
    """Add ∇loss of one tree to the LoRA gradients (λ's term is the optimizer's weight decay: above)."""
    pairs = tspmo_pairs(completions, rewards)
    active = active_pairs(pairs)
    stats = GroupStats(n_loss_terms=len(pairs), n_computed=len(active), has_signal=bool(active))
    if active and tree_pack:  # the whole tree in one forward (minirl/tree_pack.py)
        logp = tree_logprobs(model, prefix, completions, active, temperature)  # (n_active,)
        stats.loss += backward_pi_a(logp, [pair.advantage for pair in active], len(pairs))
    elif active:  # the completions that hold an active pair, train_batch of them per forward
        by_completion = defaultdict(list)
        for pair in active:
            by_completion[pair.completion].append(pair)
        order = sorted(by_completion)
        for start in range(0, len(order), train_batch):
            batch = order[start:start + train_batch]
            sequences = [prefix + completions[c] for c in batch]
            picks = [(row, len(prefix) + pair.position) for row, c in enumerate(batch) for pair in by_completion[c]]
            advantages = [pair.advantage for c in batch for pair in by_completion[c]]
            logp = selected_logprobs(model, sequences, picks, temperature)  # (n_pairs,)
            stats.loss += backward_pi_a(logp, advantages, len(pairs))
    return stats


def backward_pi_a(logp, advantages: list[float], n_pairs: int) -> float:
    """Backpropagates this part of −(1/|U|) Σ π(v | p)·A(v | p), |U| = n_pairs; returns its value."""
    A = torch.tensor(advantages, dtype=logp.dtype, device=logp.device)
    loss = -(torch.exp(logp) * A).sum() / n_pairs
    loss.backward()
    return loss.item()


def train_step(model, draws, sample, score, optimizer_step, replay: "ReplayBuffer", *, temperature: float,
               train_batch: int, tree_pack: bool, replay_success: int, replay_failure: int, max_new_tokens: int,
               stop_ids: list[int]) -> StepStats:
    """One T-SPMO step with replay: steps 1–3 of the module docstring. The callables: rl/__init__.py."""
    step = StepStats()

    def tree(draw, root) -> tuple[list, list, GroupStats]:
        """Sample and score a group from `root`, accumulate its tree's gradients."""
        replayed = root[len(draw.prompt):]
        continuations = sample(draw, root, max_new_tokens - len(replayed))
        answers = [replayed + c for c in continuations]
        rewards = [score(draw, answer) for answer in answers]
        group = accumulate_gradients(model, root, continuations, rewards, temperature=temperature,
                                     train_batch=train_batch, tree_pack=tree_pack)
        step.add(group)
        return answers, rewards, group

    def update_and_remember(trees):
        """One optimizer step over these trees, then their answers join every rank's buffer, in one order."""
        optimizer_step(any(group.has_signal for _, (_, _, group) in trees),
                       sum(group.loss for _, (_, _, group) in trees))
        for key, answers, rewards in gather_json([[draw.key, answers, rewards] for draw, (answers, rewards, _) in trees]):
            replay.add(key, answers, rewards)

    fresh = [(draw, tree(draw, draw.prompt)) for draw in draws]
    step.rewards = [r for _, (_, rewards, _) in fresh for r in rewards]
    update_and_remember(fresh)
    roots = [replay.roots(draw.key, draw.prompt, replay_success, replay_failure, stop_ids, max_new_tokens, draw.rng)
             for draw in draws]
    for r in range(all_max(max((len(rs) for rs in roots), default=0))):  # every rank takes the same rounds
        update_and_remember([(draw, tree(draw, rs[r])) for draw, rs in zip(draws, roots) if r < len(rs)])
    return step


class ReplayBuffer:
    """Answers per problem (token ids after the prompt), split by reward; JSON-serialisable."""

    def __init__(self, threshold: float, capacity: int = 64):
        self.threshold, self.capacity = threshold, capacity
        self.store: dict[str, dict[str, list[list[int]]]] = {}

    def add(self, problem: str, answers: list[list[int]], rewards: list[float]):
        entry = self.store.setdefault(problem, {"success": [], "failure": []})
        for answer, reward in zip(answers, rewards):
            kind = "success" if reward >= self.threshold else "failure"
            if answer and answer not in entry[kind]:
                entry[kind].append(list(answer))
                del entry[kind][:-self.capacity]  # keep the newest `capacity`

    def roots(self, problem: str, prompt: list[int], n_success: int, n_failure: int, stop_ids: list[int],
              max_new_tokens: int, rng: random.Random) -> list[list[int]]:
        """Root prefixes for replayed groups: the prompt plus a uniformly cut part of stored answers.

        The cut keeps at most max_new_tokens − 1 answer tokens, so at least one token is left to sample.
        """
        entry = self.store.get(problem, {"success": [], "failure": []})
        roots = []
        for kind, budget in (("success", n_success), ("failure", n_failure)):
            for answer in rng.sample(entry[kind], min(budget, len(entry[kind]))):
                end = len(answer) - (1 if answer[-1] in stop_ids else 0)
                roots.append(prompt + answer[:rng.randint(0, min(end, max_new_tokens - 1))])
        return roots

    def state_dict(self) -> dict:
        """A copy: what a checkpoint writes must not change as training goes on."""
        return {"threshold": self.threshold, "capacity": self.capacity,
                "store": {key: {kind: [list(a) for a in answers] for kind, answers in entry.items()}
                          for key, entry in self.store.items()}}

    def load_state_dict(self, state: dict):
        self.threshold, self.capacity = state["threshold"], state["capacity"]
        self.store = {key: {kind: [list(a) for a in answers] for kind, answers in entry.items()}
                      for key, entry in state["store"].items()}
