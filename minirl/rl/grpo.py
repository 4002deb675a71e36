"""GRPO, one group, one update (DESIGN.md, "GRPO").

A group: G completions c_1..c_G sampled from one root prefix P, rewards R_1..R_G.

    A_i    = (R_i − mean R) / (std R + ε)                 (std unbiased, as TRL computes it; ε = 1e-4)
    KL_t   = exp(ref_t − logp_t) − (ref_t − logp_t) − 1     (k3 estimator; ref = base model, adapters off)
    loss_i = (1/|T_i|) Σ_{t∈T_i} [ −A_i · logp_t + β · KL_t ]
    loss   = (1/G) Σ_i loss_i

With one update per group the PPO ratio π/π_old is 1 and clipping never acts, so the policy-gradient
term is just −A·log π. Full GRPO takes every token (T_i = all of c_i); S-GRPO passes a subset.
A group whose rewards are all equal has every A_i = 0 and gives no update.

The backward runs one completion at a time, as the paper does to fit in memory: loss_i / G is
backpropagated and its graph freed before the next completion's forward. The reference log-probs
come from the same model inside `disable_adapters`, so the reference policy costs no memory.
"""

from dataclasses import dataclass

import torch

from minirl.logprobs import selected_logprobs
from minirl.lora import disable_adapters

EPS = 1e-4


@dataclass
class StepStats:
    """What one update did: the loss value, how many tokens or pairs it counted, how many it computed."""
    loss: float = 0.0
    n_loss_terms: int = 0
    n_computed: int = 0
    skipped: bool = False  # True when the group carried no signal (all rewards equal)


def group_advantages(rewards: list[float]) -> torch.Tensor:
    """A_i = (R_i − mean R) / (std R + ε); zeros when G = 1 or all rewards are equal."""
    r = torch.tensor(rewards, dtype=torch.float64)
    if len(rewards) < 2 or bool((r == r[0]).all()):
        return torch.zeros_like(r)
    return (r - r.mean()) / (r.std() + EPS)


def grpo_backward(model, prefix: list[int], completions: list[list[int]], rewards: list[float], beta: float,
                  temperature: float, keep: list[list[int]] | None = None) -> StepStats:
    """Accumulate ∇loss into the LoRA gradients; `keep[i]` lists the token indices T_i of c_i (None: all)."""
    advantages = group_advantages(rewards)
    if not bool(advantages.any()):
        return StepStats(skipped=True)
    G, total, stats = len(completions), 0.0, StepStats()
    for i, completion in enumerate(completions):
        tokens = list(range(len(completion))) if keep is None else keep[i]
        if not tokens or advantages[i] == 0 and beta == 0:
            continue
        sequence = prefix + completion
        picks = [(0, len(prefix) + t) for t in tokens]
        logp = selected_logprobs(model, [sequence], picks, temperature)  # (|T_i|,)
        loss = -float(advantages[i]) * logp
        if beta > 0:
            with torch.no_grad(), disable_adapters(model):
                ref = selected_logprobs(model, [sequence], picks, temperature)  # (|T_i|,)
            delta = ref - logp
            loss = loss + beta * (torch.exp(delta) - delta - 1)
        loss = loss.mean() / G
        loss.backward()
        total += loss.item()
        stats.n_loss_terms += len(tokens)
        stats.n_computed += len(tokens)
    stats.loss = total
    return stats


def update(model, prefix, completions, rewards, cfg, generator=None) -> StepStats:
    """Full GRPO: every token of every completion. `cfg` supplies beta and temperature."""
    return grpo_backward(model, prefix, completions, rewards, cfg.beta, cfg.temperature)
