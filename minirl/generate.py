"""Batched sampling from prefixes of different lengths, with a preallocated KV cache.

Prefixes are left-padded to a common length Tp, so every row writes its t-th new token into the
same cache slot Tp + t and one decode step is one forward of B tokens. Padding is hidden by the
attention mask, and each row's RoPE positions start at 0 on its first real token, so a padded row
computes exactly what it would alone. A prefix is any token list — a prompt, or a prompt plus part
of an earlier completion, which is how T-SPMO's replay restarts sampling mid-answer.
"""

import torch

from minirl.errors import InputError


def sample_next(logits, temperature: float, top_p: float, generator):
    """One token per row from (B, V) logits: argmax when τ = 0, else softmax(logits / τ) cut to top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before this token already ≥ p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             eos_token_id: int | list[int] | None = None, generator: torch.Generator | None = None,
             top_p: float = 1.0) -> list[list[int]]:
    """New tokens for each prefix; each list ends at and includes its first EOS (or runs to max_new_tokens)."""
    if not prompts:
        return []
    if temperature < 0:
        raise InputError(f"temperature is {temperature}, expected a number ≥ 0")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p is {top_p}, expected a number in (0, 1]")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise InputError(f"prompt {lengths.index(0)} is empty; every prefix needs at least one token")
    limit = model.config.max_position_embeddings
    if max(lengths) + max_new_tokens > limit:
        raise InputError(f"a prompt of {max(lengths)} tokens plus max_new_tokens {max_new_tokens} is past the "
                         f"model's max_position_embeddings ({limit})")
    device = model.lm_head.weight.device
    B, Tp, total = len(prompts), max(lengths), max(lengths) + max_new_tokens
    ids = torch.zeros(B, Tp, dtype=torch.long, device=device)
    real = torch.zeros(B, total, dtype=torch.bool, device=device)  # which cache slots hold real tokens
    for i, p in enumerate(prompts):
        ids[i, Tp - len(p):] = torch.tensor(p, dtype=torch.long)
        real[i, Tp - len(p):Tp] = True
    positions = (real[:, :Tp].long().cumsum(dim=1) - 1).clamp(min=0)  # (B, Tp)
    causal = torch.ones(Tp, Tp, dtype=torch.bool, device=device).tril()
    eye = torch.eye(Tp, dtype=torch.bool, device=device)
    mask = (causal & real[:, None, :Tp]) | eye  # (B, Tp, Tp); a pad query sees itself only, never NaN
    stop = torch.tensor([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int)
                        else list(eos_token_id), dtype=torch.long, device=device)

    cache = model.new_cache(B, total)
    hidden = model.hidden_states(ids, positions=positions, mask=mask[:, None], cache=cache)  # (B, Tp, D)
    next_position = torch.tensor(lengths, device=device)[:, None]  # (B, 1)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens = []
    for t in range(max_new_tokens):
        logits = model.lm_head(hidden[:, -1])  # (B, V): only the last position is needed
        token = sample_next(logits, temperature, top_p, generator)  # (B,)
        new_tokens.append(token)
        finished |= torch.isin(token, stop)
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        real[:, Tp + t] = True
        hidden = model.hidden_states(token[:, None], positions=next_position, mask=real[:, None, None, :Tp + t + 1],
                                     cache=cache, cache_start=Tp + t)  # (B, 1, D)
        next_position += 1

    rows = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in prompts]
    stop_ids = set(stop.tolist())
    out = []
    for row in rows:
        end = next((j + 1 for j, tok in enumerate(row) if tok in stop_ids), len(row))
        out.append(row[:end])
    return out
