"""S-GRPO: GRPO on a sampled subset T_i of each completion's tokens (DESIGN.md, "S-GRPO").

Walk t = 0, 1, …, |c_i| − 1:
    t < α            → always keep t;
    t ≥ α, |T_i| < k → keep t with probability P;
    |T_i| = k        → stop (drop the rest).
So |T_i| ≤ max(α, k), whatever the completion's length: the memory of the update is bounded by the
number of kept tokens, not by the length of the answer. The loss averages over T_i (1/|T_i|), then
over the group, exactly as grpo.py does with `keep`.

Defaults (the paper gives none): α = 8, k = 32, P = 0.5. The first tokens of an answer fix its
direction (for multiplication they are the leading digits, which decide the reward most), so the
first α are always trained on; P = 0.5 spreads the remaining k − α picks over about the next
2(k − α) tokens rather than only the next few, and k = 32 caps the graph at 32 positions per
completion, about a tenth of a 300-token answer.
"""

import torch

from minirl.rl.grpo import StepStats, grpo_backward


def sample_token_subset(length: int, alpha: int, k: int, p: float, generator: torch.Generator | None = None) -> list[int]:
    """T_i for a completion of `length` tokens, by the walk above."""
    kept = []
    coins = torch.rand(length, generator=generator).tolist()
    for t in range(length):
        if t < alpha:
            kept.append(t)
        elif len(kept) >= k:
            break
        elif coins[t] < p:
            kept.append(t)
    return kept


def update(model, prefix, completions, rewards, cfg, generator=None) -> StepStats:
    """One S-GRPO update; `cfg` supplies alpha, k, p, beta and temperature."""
    keep = [sample_token_subset(len(c), cfg.alpha, cfg.k, cfg.p, generator) for c in completions]
    return grpo_backward(model, prefix, completions, rewards, cfg.beta, cfg.temperature, keep=keep)
