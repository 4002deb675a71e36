"""GRPO: one group, one update (DESIGN.md, "GRPO").

A group: G completions c_1..c_G sampled from one root prefix P, rewards R_1..R_G.

    A_i    = (R_i − mean R) / (std R + ε)                 (std unbiased, as TRL computes it; ε = 1e-4)
    KL_t   = exp(ref_t − logp_t) − (ref_t − logp_t) − 1     (k3 estimator; ref = base model, adapters off)
    loss_i = (1/|T_i|) Σ_{t∈T_i} [ −A_i · logp_t + β · KL_t ]
    loss   = (1/G) Σ_i loss_i

With one update per group the PPO ratio π/π_old is 1 and clipping never acts, so the policy-gradient
term is just −A·log π. Full GRPO takes every token (T_i = all of c_i); S-GRPO passes a subset.
A group whose rewards are all equal has every A_i = 0 and gives no update.

The backward runs `train_batch` completions at a time: their loss terms are backpropagated together
and the graph is freed before the next batch, so memory grows with train_batch sequences, not with G
(train_batch = 1 is the paper's one-at-a-time accumulation; the gradients are the same sum either way).
The reference log-probs come from the same model with its adapters off, so the reference policy costs
no memory, and from the same forward below the first adapter (logprobs.selected_logprobs), so it costs
only the adapted layers' forward.
"""

import torch

from minirl.logprobs import selected_logprobs
from minirl.rl import GroupStats, StepStats

EPS = 1e-4


def group_advantages(rewards: list[float]) -> torch.Tensor:
    """A_i = (R_i − mean R) / (std R + ε); zeros when G = 1 or all rewards are equal."""
    r = torch.tensor(rewards, dtype=torch.float64)
    if len(rewards) < 2 or bool((r == r[0]).all()):
        return torch.zeros_like(r)
    return (r - r.mean()) / (r.std() + EPS)


def accumulate_gradients(model, prefix: list[int], completions: list[list[int]], rewards: list[float], *,
                         beta: float, temperature: float, train_batch: int = 8,
                         keep: list[list[int]] | None = None) -> GroupStats:
    """Add ∇loss of one group to the LoRA gradients; `keep[i]` lists the token indices T_i of c_i (None: all)."""
    advantages = group_advantages(rewards)
    if not bool(advantages.any()):
        return GroupStats()
    G = len(completions)
    tokens = [list(range(len(c))) if keep is None else keep[i] for i, c in enumerate(completions)]
    # A completion with A_i = 0 and β = 0 adds nothing: its forward is skipped.
    rows = [i for i in range(G) if tokens[i] and (advantages[i] != 0 or beta > 0)]
    stats = GroupStats(has_signal=True)
    for start in range(0, len(rows), train_batch):
        batch = rows[start:start + train_batch]
        sequences = [prefix + completions[i] for i in batch]
        picks = [(row, len(prefix) + t) for row, i in enumerate(batch) for t in tokens[i]]
        A = torch.tensor([float(advantages[i]) for i in batch for _ in tokens[i]])  # (N,)
        weight = torch.tensor([1.0 / (len(tokens[i]) * G) for i in batch for _ in tokens[i]])  # (N,) 1/(|T_i| G)
        if beta > 0:  # π_ref shares the layers below the first adapter with π_θ: they run once
            logp, ref = selected_logprobs(model, sequences, picks, temperature, reference=True)  # (N,) each
        else:
            logp, ref = selected_logprobs(model, sequences, picks, temperature), None  # (N,)
        terms = -A.to(logp.device) * logp
        if ref is not None:
            delta = ref - logp
            terms = terms + beta * (torch.exp(delta) - delta - 1)
        loss = (terms * weight.to(logp.device)).sum()
        loss.backward()
        stats.loss += loss.item()
        stats.n_loss_terms += len(picks)
        stats.n_computed += len(picks)
    return stats


def train_step(model, draws, sample, score, optimizer_step, *, beta: float, temperature: float, train_batch: int,
               max_new_tokens: int, token_subset=None) -> StepStats:
    """One GRPO step: a group per problem, each group's loss accumulated, then one optimizer step.

    `token_subset(length, generator) -> T_i` picks the tokens each completion is trained on (S-GRPO);
    None trains on all of them (GRPO). The callables are described in rl/__init__.py.
    """
    step, signal = StepStats(), False
    for draw in draws:
        completions = sample(draw, draw.prompt, max_new_tokens)
        rewards = [score(draw, c) for c in completions]
        keep = None if token_subset is None else [token_subset(len(c), draw.subsets) for c in completions]
        group = accumulate_gradients(model, draw.prompt, completions, rewards, beta=beta, temperature=temperature,
                                     train_batch=train_batch, keep=keep)
        step.rewards += rewards
        step.add(group)
        signal |= group.has_signal
    optimizer_step(signal, step.loss)
    return step
