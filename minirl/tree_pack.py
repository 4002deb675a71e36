"""T-SPMO log-probs from one forward over the group's prefix tree (DESIGN.md, "T-SPMO").

The G completions of a group share their root prefix P and, often, long stretches after it (for
multiplication, the first digits of most answers). Run one by one, every shared token goes through
the model once per completion that holds it. Here the tree goes through once: P, then the trie of
the completions' token ids, one trie node per token, packed into ONE sequence

    ids        = P + [token of each trie node]                 (T,), T = len(P) + number of nodes kept
    positions  = 0 .. len(P) − 1, then len(P) + t for a node at completion position t
    mask[i, j] = j is i itself or an ancestor of i             (P is every node's ancestor; P is causal)

A node sees exactly the tokens its prefix P + p holds, at the positions they hold there: its
position is its depth in the tree, not its index in the packed sequence, because RoPE must see the
same relative distances as in the unpacked sequence P + c_i. So its hidden state equals that of the
same token in any unpacked sequence (up to rounding), and

    log π_θ(v | P + p) = log_softmax(lm_head(h[node of P + p]) / τ)[v],

the node of P + p being the last token of P when p is empty. Only the trie nodes some requested
pair's prefix passes through are kept (the tail after a completion's last branch point is dropped,
as minirl.logprobs drops it), and only the requested rows reach the lm_head, through the fused
kernel: no T×V logits. Cost: T tokens instead of Σ_i (len(P) + len(c_i)), for attention over one T×T
mask instead of train_batch sequences at a time. That wins when the completions share most of their
prefixes (multiplication at τ = 0.3: a fifth of the tokens); when they share little, T approaches the
unpacked total and the T² attention costs more time and memory than the batches do, so it is opt-in
(TrainConfig.tree_pack, `--tree-pack`).
"""

from typing import NamedTuple

import torch

from minirl.errors import InputError
from minirl.kernels import gathered_logprobs


class PackedTree(NamedTuple):
    ids: torch.Tensor  # (T,) token ids
    positions: torch.Tensor  # (T,) RoPE positions: depths in the tree
    mask: torch.Tensor  # (T, T) bool, True where row i may attend to column j
    rows: torch.Tensor  # (N,) the packed index whose output predicts each pair's token
    targets: torch.Tensor  # (N,) each pair's token v


def pack_tree(prefix: list[int], completions: list[list[int]], pairs) -> PackedTree:
    """Pack P and the trie nodes that the prefixes of `pairs` (Pair-like: completion, position, token) need."""
    if not prefix:
        raise InputError("prefix: expected at least one token (the empty prefix p needs a position to predict from)")
    L = len(prefix)
    needed = {}  # completion -> how many of its tokens the pairs' prefixes reach
    for k, pair in enumerate(pairs):
        c = pair.completion
        if not (0 <= c < len(completions) and 0 <= pair.position < len(completions[c])
                and completions[c][pair.position] == pair.token):
            raise InputError(f"pairs[{k}] = {pair!r}: expected token == completions[completion][position]")
        needed[c] = max(needed.get(c, 0), pair.position)
    ids, positions, parent = list(prefix), list(range(L)), list(range(-1, L - 1))
    child = {}  # (packed index of the parent, token) -> packed index of the node
    path = {}  # completion -> packed index of its node at each completion position < needed
    for c in sorted(needed):
        at, path[c] = L - 1, []
        for t, v in enumerate(completions[c][:needed[c]]):
            if (at, v) not in child:
                child[(at, v)] = len(ids)
                ids.append(v)
                positions.append(L + t)
                parent.append(at)
            at = child[(at, v)]
            path[c].append(at)
    T = len(ids)
    mask = torch.ones(T, T, dtype=torch.bool).tril_()  # P is plain causal ...
    mask[L:] = False
    for i in range(L, T):  # ... a node sees its parent's view and itself (parents come first)
        mask[i] = mask[parent[i]]
        mask[i, i] = True
    rows = [path[pair.completion][pair.position - 1] if pair.position else L - 1 for pair in pairs]
    return PackedTree(torch.tensor(ids), torch.tensor(positions), mask, torch.tensor(rows, dtype=torch.long),
                      torch.tensor([pair.token for pair in pairs], dtype=torch.long))


def tree_logprobs(model, prefix: list[int], completions: list[list[int]], pairs, temperature: float = 1.0,
                  packed: PackedTree | None = None) -> torch.Tensor:
    """log π_θ(v | P + p) for each pair, in order: an (N,) fp32 tensor from one packed forward."""
    device = model.lm_head.weight.device
    if not pairs:
        return torch.zeros(0, dtype=torch.float32, device=device)
    packed = packed or pack_tree(prefix, completions, pairs)
    ids, positions = packed.ids.to(device)[None], packed.positions.to(device)[None]  # (1, T) each
    hidden = model.hidden_states(ids, positions, packed.mask.to(device)[None, None])[0]  # (T, D)
    return gathered_logprobs(hidden[packed.rows.to(device)], model.lm_head.weight,
                             packed.targets.to(device), temperature)  # (N,)
