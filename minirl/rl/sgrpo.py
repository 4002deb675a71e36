"""S-GRPO: GRPO on a sampled subset T_i of each completion's tokens (DESIGN.md, "S-GRPO").

Walk t = 0, 1, …, |c_i| − 1:
    t < α            → always keep t;
    t ≥ α, |T_i| < k → keep t with probability P;
    |T_i| = k        → stop (drop the rest).
So |T_i| ≤ max(α, k), whatever the completion's length. The loss averages over T_i (1/|T_i|), then
over the group, exactly as grpo.py does with `keep`.

What this saves: the log-prob rows (and the lm_head work) of |T_i| positions instead of |c_i|. The
forward still runs causally through every token up to the last kept one, max T_i, so the activations
kept for the backward are bounded by that position, not by |T_i|: a walk that stops early (small k,
large P) saves the most.

Defaults (the paper gives none): α = 8, k = 32, P = 0.5. The first tokens of an answer fix its
direction (for multiplication they are the leading digits, which decide the reward most), so the
first α are always trained on; P = 0.5 spreads the remaining k − α picks over about the next
2(k − α) tokens rather than only the next few, and k = 32 caps the loss at 32 positions per
completion, about a tenth of a 300-token answer.
"""

import torch

from minirl.rl import StepStats, grpo


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


def train_step(model, draws, sample, score, optimizer_step, *, alpha: int, k: int, p: float, beta: float,
               temperature: float, train_batch: int, max_new_tokens: int) -> StepStats:
    """One S-GRPO step: GRPO's step with each completion trained on its subset T_i, drawn from draw.subsets."""
    return grpo.train_step(model, draws, sample, score, optimizer_step, beta=beta, temperature=temperature,
                           train_batch=train_batch, max_new_tokens=max_new_tokens,
                           token_subset=lambda length, generator: sample_token_subset(length, alpha, k, p, generator))
