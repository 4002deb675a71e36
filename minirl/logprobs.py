"""Log-probabilities of chosen (row, position) tokens of a batch of sequences, without full logits.

Every loss here needs log π_θ(v | prefix) for some tokens only: GRPO for each completion token, S-GRPO
for a subset, T-SPMO for the branch-point pairs of a prefix tree (DESIGN.md, "The math").
A pick (i, t) asks for

    log π_θ(s_i[t] | s_i[:t]) = log_softmax(lm_head(h_i[t − 1]) / τ)[s_i[t]],   t ≥ 1,

where h_i = model.hidden_states(s_i). The sequences are right-padded into one (B, T) batch, each cut
after the last position it needs, and run once: attention is causal, so padding on the right never
changes an earlier position. Only the N hidden rows that are asked for reach the lm_head, through the
fused kernel (minirl.kernels.gathered_logprobs), so no B×T×V logits exist at any point.
"""

import torch

from minirl.errors import InputError
from minirl.kernels import gathered_logprobs
from minirl.lora import disable_adapters, first_adapted_layer


def selected_logprobs(model, sequences: list[list[int]], picks: list[tuple[int, int]],
                      temperature: float = 1.0, reference: bool = False):
    """log π(sequences[i][t] | sequences[i][:t]) for each pick (i, t): an (N,) fp32 tensor, in the order
    of `picks`, differentiable w.r.t. the model's trainable parameters. No picks: an empty tensor.

    reference=True returns (log π_θ, log π_ref) of the same picks, π_ref being the model with its adapters
    off (no grad). The layers below the first adapter compute the same in both, so they run once: with
    LoRA on the top quarter, π_ref costs a quarter of a forward instead of a whole one."""
    needed = _needed_lengths(sequences, picks, model.config.vocab_size)  # {i: input tokens sequence i needs}
    device = model.lm_head.weight.device
    if not picks:
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        return (empty, empty) if reference else empty
    rows = sorted(needed)  # batch row b holds sequence rows[b]
    slot = {i: b for b, i in enumerate(rows)}
    T = max(needed.values())
    ids = torch.tensor([list(sequences[i][:needed[i]]) + [0] * (T - needed[i]) for i in rows], device=device)  # (B, T)
    b = torch.tensor([slot[i] for i, _ in picks], device=device)
    before = torch.tensor([t - 1 for _, t in picks], device=device)  # the position whose output predicts t
    targets = torch.tensor([sequences[i][t] for i, t in picks], device=device)

    def picked(hidden):  # (B, T, D) -> (N,)
        return gathered_logprobs(hidden[b, before], model.lm_head.weight, targets, temperature)

    if not reference:
        return picked(model.hidden_states(ids))
    shared = first_adapted_layer(model)
    below = model.hidden_states(ids, stop=shared)  # (B, T, D), the input of layer `shared`
    logp = picked(model.hidden_states(ids, start=(shared, below), check=False))
    with torch.no_grad(), disable_adapters(model):
        ref = picked(model.hidden_states(ids, start=(shared, below), check=False))
    return logp, ref


def _needed_lengths(sequences, picks, vocab_size: int) -> dict[int, int]:
    """Checks the picks; returns, per picked sequence, how many of its tokens the forward needs (max t)."""
    if not isinstance(sequences, (list, tuple)):
        raise InputError(f"sequences: expected a list of token lists, got {type(sequences).__name__}")
    if not isinstance(picks, (list, tuple)):
        raise InputError(f"picks: expected a list of (i, t) pairs, got {type(picks).__name__}")
    needed = {}
    for k, pick in enumerate(picks):
        if not (isinstance(pick, (tuple, list)) and len(pick) == 2 and all(isinstance(x, int) for x in pick)):
            raise InputError(f"picks[{k}]: expected a pair of ints (i, t), got {pick!r}")
        i, t = pick
        if not 0 <= i < len(sequences):
            raise InputError(f"picks[{k}] = {pick!r}: sequence index i must be in [0, {len(sequences)})")
        if not 1 <= t < len(sequences[i]):
            raise InputError(f"picks[{k}] = {pick!r}: position t must be in [1, {len(sequences[i])}) for sequence {i} "
                             f"(t = 0 has no prefix to condition on)")
        token = sequences[i][t]
        if not (isinstance(token, int) and 0 <= token < vocab_size):
            raise InputError(f"sequences[{i}][{t}] = {token!r}: expected a token id in [0, {vocab_size})")
        needed[i] = max(needed.get(i, 0), t)
    return needed
