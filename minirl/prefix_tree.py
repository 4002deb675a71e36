"""T-SPMO's prefix tree: every unique (prefix, token) pair of a group and its advantage (DESIGN.md, "T-SPMO").

A group of G completions c_1..c_G, sampled from one root prefix P, with rewards R_1..R_G. For a
token sequence p (a prefix of the completions, P not included):

    S(p) = {i : c_i starts with p},     μ(p) = (1/|S(p)|) Σ_{i∈S(p)} R_i,
    U    = {(p, v) : p + [v] is a prefix of some c_i},   each pair once,
    A(v | p) = μ(p + [v]) − μ(p).

μ(∅) is the group mean, so an empty completion (nothing generated) counts there and nowhere else:
it gives no pair, but its reward is part of the baseline of the first tokens.

The pairs are the edges of a trie over token ids: a node is a prefix, an edge is the token v that
extends it. Inserting every completion costs one dictionary step per token, so building the trie is
linear in the total number of tokens; one pass over the nodes then gives every advantage. A pair is
reported by its first witness — the first completion, in input order, that contains p + [v] — as
Pair(completion, position = len(p), token = v, advantage). The list comes in that creation order:
sorted by completion, then by position.

Where the completions do not part ways, S(p + [v]) = S(p) (p has one child and no completion ends
at p) and A(v | p) is exactly 0.0 by construction. Such pairs still count in |U| but need no
logits; `active_pairs` keeps only the pairs with A ≠ 0, the ones a loss has to evaluate.

Reward sums use math.fsum, which rounds once, so every μ — and every advantage — is bit-identical
however the completions are ordered.

Worked example, rewards (1, 0, 1):

    c_1 = [5, 7, 9]       μ(∅) = 2/3       A(5 | ∅)    = 2/3 − 2/3 =  0    (one child: no branch)
    c_2 = [5, 7, 2]       μ(5) = 2/3       A(7 | 5)    = 1/2 − 2/3 = −1/6
    c_3 = [5, 3]          μ(5,7) = 1/2     A(3 | 5)    = 1   − 2/3 =  1/3
                                           A(9 | 5,7)  = 1   − 1/2 =  1/2
                                           A(2 | 5,7)  = 0   − 1/2 = −1/2

>>> pairs = tspmo_pairs([[5, 7, 9], [5, 7, 2], [5, 3]], [1.0, 0.0, 1.0])
>>> [(p.completion, p.position, p.token, round(p.advantage, 4)) for p in pairs]
[(0, 0, 5, 0.0), (0, 1, 7, -0.1667), (0, 2, 9, 0.5), (1, 2, 2, -0.5), (2, 1, 3, 0.3333)]
>>> len(active_pairs(pairs))
4
"""

import math
import operator
from typing import NamedTuple

from minirl.errors import InputError


class Pair(NamedTuple):
    """(p, v) with p = completions[completion][:position] and v = token = completions[completion][position]."""

    completion: int
    position: int
    token: int
    advantage: float


def _token_ids(completion, index: int) -> list[int]:
    # Tokens must hash by value: a 0-d tensor hashes by identity and would silently split every branch.
    try:
        return [operator.index(token) for token in completion]
    except TypeError:
        for t, token in enumerate(completion):
            try:
                operator.index(token)
            except TypeError:
                raise InputError(f"completions[{index}][{t}]: expected an integer token id, "
                                 f"got {type(token).__name__}") from None
        raise


def tspmo_pairs(completions: list[list[int]], rewards: list[float]) -> list[Pair]:
    """Every unique (prefix, token) pair of the group, with A(v | p) = μ(p + [v]) − μ(p) (module docstring)."""
    if len(completions) != len(rewards):
        raise InputError(f"rewards: expected one per completion ({len(completions)}), got {len(rewards)}")
    # Node 0 is the empty prefix. Per node: the rewards of the completions through it (S(p)), its
    # parent, and the pair that created it.
    child: dict[tuple[int, int], int] = {}
    through: list[list[float]] = [[]]
    parent = [-1]
    witness = [(-1, -1, -1)]
    for i, (completion, r) in enumerate(zip(completions, rewards)):
        r = float(r)
        if not math.isfinite(r):
            raise InputError(f"rewards[{i}]: expected a finite number, got {r}")
        node = 0
        through[0].append(r)
        for t, v in enumerate(_token_ids(completion, i)):
            nxt = child.get((node, v))
            if nxt is None:
                nxt = child[(node, v)] = len(parent)
                through.append([])
                parent.append(node)
                witness.append((i, t, v))
            node = nxt
            through[node].append(r)

    mean: dict[int, float] = {}

    def mu(node: int) -> float:
        if node not in mean:
            mean[node] = math.fsum(through[node]) / len(through[node])
        return mean[node]

    pairs = []
    for node in range(1, len(parent)):
        p = parent[node]
        # Same set of completions, same mean: write the zero exactly rather than as a difference.
        advantage = 0.0 if len(through[node]) == len(through[p]) else mu(node) - mu(p)
        pairs.append(Pair(*witness[node], advantage))
    return pairs


def active_pairs(pairs: list[Pair]) -> list[Pair]:
    """The pairs with A ≠ 0: the only ones whose π_θ(v | P + p) reaches the T-SPMO gradient.

    They sit at branch points (the prefix has several children, or a completion ends there); a
    branch whose rewards tie also has A = 0 and is dropped. The loss still divides by |U| = len(pairs).
    """
    return [pair for pair in pairs if pair.advantage != 0.0]
