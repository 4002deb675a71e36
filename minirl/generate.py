"""Batched sampling from prefixes of different lengths, with a preallocated KV cache.

Layout. Prefixes are left-aligned to a common length Tp in the cache, so every row writes its t-th new
token into the same slot Tp + t and one decode step is one forward of B tokens. Slots before a short
prefix are hidden by the attention mask, and each row's RoPE positions start at 0 on its first real
token, so a row computes exactly what it would alone. A prefix is any token list — a prompt, or a
prompt plus part of an earlier completion, which is how T-SPMO's replay restarts sampling mid-answer.

Where the time goes (profiled on the CPU at real shapes), and what is done about it (DESIGN.md, "Generation"):
- prefill: identical prefixes are run once (training samples G completions of one root). Distinct ones
  of about one length run as one padded batch; when padding would waste more than PAD_WASTE they are
  packed end to end into sequences of at most pack_tokens() tokens with a block-diagonal causal mask.
  Their keys and values are then copied to each row's slots.
- sampling: torch.multinomial draws one exponential per vocabulary entry and row: at a vocabulary of
  151,936 and B = 50, a quarter of a 0.5B model's decode step. Here a token is drawn by inverting the CDF
  of softmax(logits / τ) at one uniform u ∈ (0, 1] per row: the first i with Σ_{j≤i} p_j ≥ u · Σ_j p_j
  (inverse_cdf). The uniforms of all steps are drawn up front from the generator, so the stream depends
  only on the seed, B and max_new_tokens, never on when sampling stops.
- matrix products, most of a step: on an x86 CPU the large ones go through oneDNN on copies of their
  weights in its blocked layout, kept between calls (onednn_linears), and attention of one query per row
  multiplies each key/value head's G query heads at once (model.py).
- decode steps: no host synchronisation for input checks (prefixes are checked once; sampled ids are
  in the vocabulary by construction), RoPE's cos/sin from a table built once, the mask a view of one
  (B, Tmax) buffer, and "all rows finished?" read every step on the CPU (where reading costs nothing)
  but every SYNC_EVERY steps on an accelerator.
- compile=True runs each decode step through torch.compile at static shapes (cache length rounded
  up to a multiple of CACHE_BUCKET, the slot as a tensor), with CUDA graphs on CUDA. Where compiling
  fails it warns once and decodes eagerly.
"""

import functools
import math
import warnings
import weakref
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from minirl.errors import InputError

SYNC_EVERY = 8  # decode steps between "all finished?" reads on an accelerator
SAMPLE_BLOCK = 256  # weights per block of the two-level inverse CDF (inverse_cdf)
CACHE_BUCKET = 64  # compiled decode: the cache length is rounded up to a multiple of this, one compile per bucket


def cdf_block(V: int) -> int:
    """inverse_cdf's block width: V itself up to SAMPLE_BLOCK (one block), else a divisor of V of at least
    16 where there is one (no padded copy of the weights; 151,936 = 1,187 · 128), else SAMPLE_BLOCK."""
    if V <= SAMPLE_BLOCK:
        return V
    k = math.gcd(V, SAMPLE_BLOCK)
    return k if k >= 16 else SAMPLE_BLOCK


def inverse_cdf(weights, u):
    """Per row, the first index i with Σ_{j≤i} w_j ≥ u · Σ_j w_j: weights (B, V) ≥ 0, unnormalised, u (B,) ∈ (0, 1].

    In two levels, the sums of blocks of k = cdf_block(V) weights, then the weights inside the block found:
    B·(V/k + k) prefix sums instead of B·V (a prefix sum is sequential; a block sum is not). A vocabulary
    of one block (V ≤ SAMPLE_BLOCK) takes one level: there the ops, not the sums, are the cost. A weight
    of 0 leaves the prefix sums flat and never comes first, so a token of probability 0 is never drawn.
    """
    B, V = weights.shape
    k = cdf_block(V)
    if k == V:  # one block: at the tiny model's V = 87, a seventh of the two levels' time
        cdf = weights.cumsum(dim=-1)  # (B, V)
        target = (u.to(torch.float64) * cdf[:, -1]).to(cdf.dtype)  # (B,), in (0, total]
        return torch.searchsorted(cdf, target[:, None]).squeeze(-1).clamp_(max=V - 1)
    if V % k:
        weights = F.pad(weights, (0, -V % k))  # zero weights fill the last block
    blocks = weights.view(B, -1, k)  # (B, nb, k)
    cdf = blocks.sum(dim=-1).cumsum(dim=-1)  # (B, nb); on the CPU a float cumsum accumulates in double
    target = (u.to(torch.float64) * cdf[:, -1]).to(cdf.dtype)  # (B,), in (0, total]
    j = torch.searchsorted(cdf, target[:, None]).clamp_(max=cdf.shape[1] - 1).squeeze(-1)  # (B,) block
    before = torch.where(j > 0, cdf.gather(1, (j - 1).clamp(min=0)[:, None]).squeeze(-1), 0.0)  # < target
    inside = blocks[torch.arange(B, device=j.device), j].cumsum(dim=-1)  # (B, k)
    # > 0, and at most the block's own total (block sums and prefix sums round differently)
    rest = torch.minimum((target.double() - before.double()).to(inside.dtype), inside[:, -1])
    return j * k + torch.searchsorted(inside, rest[:, None]).squeeze(-1)  # (B,)


def sample_next(logits, temperature: float, top_p: float, u):
    """One token per row from (B, V) logits: argmax when τ = 0, else softmax(logits / τ), cut to top-p,
    drawn by its inverse CDF at u (B,) ∈ (0, 1]. fp32 logits are overwritten: a new (B, V) buffer each
    step costs its page faults (at B = 50 and V = 151,936, 30 MB)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if top_p == 1.0:  # exp((l − max l) / τ): the softmax without its normalisation, which the CDF does not need
        return inverse_cdf(logits.sub_(logits.amax(dim=-1, keepdim=True)).div_(temperature).exp_(), u)
    probs, order = torch.softmax(logits / temperature, dim=-1).sort(dim=-1, descending=True)  # (B, V)
    probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)  # mass before it already ≥ p
    return order.gather(-1, inverse_cdf(probs, u)[:, None]).squeeze(-1)


def pack_tokens(config) -> int:
    """Tokens per packed prefill forward. Attention inside a pack pays for every pair of its n tokens,
    masked or not (4 n² H Dh), the matmuls 2 n P for P weights per layer: at n = P / (20 H Dh) the pairs
    cost a tenth of the matmuls. Between 32 and 512 (SmolLM2-135M: 307, Qwen2.5-0.5B: 512)."""
    c = config
    P = 2 * c.hidden_size * c.head_dim * (c.num_attention_heads + c.num_key_value_heads) + 3 * c.hidden_size * c.intermediate_size
    return max(32, min(512, P // (20 * c.num_attention_heads * c.head_dim)))


PAD_WASTE = 0.25  # prefill pads the distinct prefixes into one batch while padding is at most this fraction


def prefill(model, prompts: list[list[int]], cache, Tp: int):
    """Fill each row's cache slots [Tp − len, Tp) with its prefix's keys and values; return the final-norm
    hidden state of each row's last prefix token (B, D).

    Each distinct prefix is computed once. While padding them to Tp wastes little, they run as one
    left-padded batch (one forward, which small models want); otherwise packed end to end (no padding).
    """
    device = model.lm_head.weight.device
    rows_of = {}  # distinct prefix -> the rows that start with it
    for i, p in enumerate(prompts):
        rows_of.setdefault(tuple(p), []).append(i)
    distinct = list(rows_of)
    last = torch.empty(len(prompts), model.config.hidden_size, dtype=model.lm_head.weight.dtype, device=device)
    if sum(map(len, distinct)) >= (1 - PAD_WASTE) * len(distinct) * Tp:
        lengths = torch.tensor([len(p) for p in distinct], device=device)
        ids = torch.zeros(len(distinct), Tp, dtype=torch.long, device=device)
        for j, p in enumerate(distinct):
            ids[j, Tp - len(p):] = torch.tensor(p, dtype=torch.long)
        real = torch.arange(Tp, device=device) >= Tp - lengths[:, None]  # (m, Tp)
        positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
        mask = None  # plain causal when every prefix has length Tp
        if not bool(real.all()):  # a pad query sees itself only, never an all-masked row
            eye = torch.eye(Tp, dtype=torch.bool, device=device)
            mask = ((torch.ones_like(eye).tril() & real[:, None, :]) | eye)[:, None]  # (m, 1, Tp, Tp)
        own = model.new_cache(len(distinct), Tp)
        hidden = model.hidden_states(ids, positions=positions, mask=mask, cache=own)[:, -1]  # (m, D)
        which = torch.tensor([j for j, p in enumerate(distinct) for _ in rows_of[p]], device=device)
        rows = torch.tensor([r for p in distinct for r in rows_of[p]], device=device)
        last[rows] = hidden[which]
        for (k, v), (ok, ov) in zip(cache, own):  # (B, Hkv, Tmax, Dh) ← (m, Hkv, Tp, Dh)
            k[rows, :, :Tp] = ok[which]
            v[rows, :, :Tp] = ov[which]
        return last
    limit = pack_tokens(model.config)
    groups, n = [[]], 0  # consecutive distinct prefixes, packed up to `limit` tokens each
    for p in distinct:
        if groups[-1] and n + len(p) > limit:
            groups.append([])
            n = 0
        groups[-1].append(p)
        n += len(p)
    for group in groups:
        lengths = torch.tensor([len(p) for p in group], device=device)
        ids = torch.tensor([t for p in group for t in p], dtype=torch.long, device=device)[None]  # (1, n)
        segment = torch.repeat_interleave(torch.arange(len(group), device=device), lengths)  # (n,)
        starts = lengths.cumsum(0) - lengths
        offset = torch.arange(ids.shape[1], device=device) - starts[segment]  # position within its prefix
        mask = None
        if len(group) > 1:  # causal within a prefix, nothing across prefixes
            mask = (segment[:, None] == segment[None, :]) & (offset[None, :] <= offset[:, None])  # (n, n)
            mask = mask[None, None]
        packed = model.new_cache(1, ids.shape[1])
        hidden = model.hidden_states(ids, positions=offset[None], mask=mask, cache=packed)[0]  # (n, D)
        # Every (row, slot) that receives a packed position, and which position it receives.
        rows, slots, source = [], [], []
        for j, p in enumerate(group):
            start = int(starts[j])
            for r in rows_of[p]:
                rows += [r] * len(p)
                slots += range(Tp - len(p), Tp)
                source += range(start, start + len(p))
            last[rows_of[p]] = hidden[start + len(p) - 1]
        rows, slots, source = (torch.tensor(x, device=device) for x in (rows, slots, source))
        for (k, v), (pk, pv) in zip(cache, packed):  # (B, Hkv, Tmax, Dh) ← (1, Hkv, n, Dh)
            k[rows, :, slots] = pk[0][:, source].transpose(0, 1)  # (m, Hkv, Dh)
            v[rows, :, slots] = pv[0][:, source].transpose(0, 1)
    return last


def decode_step(model, token, position, slot, real, cache, cos_table, sin_table):
    """Feed one token per row (B,) at cache slot `slot`; the final-norm hidden state (B, D).

    slot: an int, and only the slots written so far are attended; or a (1,) tensor, and the whole cache
    is (unwritten slots masked): static shapes, so torch.compile traces it once per (B, cache length).
    """
    if isinstance(slot, torch.Tensor):
        real.index_fill_(1, slot, True)
        seen = real  # (B, Tmax)
    else:
        real[:, slot] = True
        seen = real[:, :slot + 1]  # (B, slot + 1)
    rope = cos_table[position][:, None], sin_table[position][:, None]  # (B, 1, Dh) each
    hidden = model.hidden_states(token[:, None], mask=seen[:, None, None, :], cache=cache, cache_start=slot,
                                 rope=rope, check=False)  # (B, 1, D)
    return hidden[:, -1]


_compiled = {}  # device type -> decode_step through torch.compile; dynamo keeps a graph per model and shape
_warned = set()  # device types where compiling failed: reported once, not tried again


def default_compile(device: torch.device) -> bool:
    """Compile by default where it pays: on CUDA, where kernel launches dominate a decode step. On the
    CPU the matmuls dominate; compiling saved under 10% of a step and took most of a minute (DESIGN.md)."""
    return device.type == "cuda"


def compiled_step(model, device, *args):
    """decode_step through torch.compile (CUDA graphs on CUDA); None where compiling fails, after one warning."""
    if device.type in _warned:  # it failed before: a second try would fail as slowly
        return None
    try:
        if device.type not in _compiled:
            mode = "reduce-overhead" if device.type == "cuda" else None
            _compiled[device.type] = torch.compile(decode_step, dynamic=False, mode=mode)
        return _compiled[device.type](model, *args)
    except Exception as e:  # no C compiler, an unsupported platform or op: decode eagerly instead
        if device.type not in _warned:
            _warned.add(device.type)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            warnings.warn(f"minirl.generate: torch.compile failed ({type(e).__name__}: {first}); "
                          f"decoding without it", stacklevel=3)
        return None


ONEDNN_MIN_WEIGHT = 2 ** 19  # decode matmuls go through oneDNN from this many weight entries up
# Reordered copies are kept while they total at most this; a larger model decodes on its plain weights.
REORDER_MAX_BYTES = 2 ** 31
reordered_weights = weakref.WeakKeyDictionary()  # nn.Linear -> (the weight, its version, the weight in oneDNN's layout)


def packed_weight(module, batch: int):
    """module.weight reordered into oneDNN's blocked layout, made once and kept while the weight is unchanged.

    A frozen weight (every base weight under LoRA) is reordered once per run. A weight written in place
    (an optimizer step, load_state_dict, anything under no_grad) has a new version, and a replaced weight
    is another tensor: either is reordered at its next use. Writes through `.data` bypass the version
    counter and are not seen."""
    w = module.weight
    kept = reordered_weights.get(module)
    if kept is None or kept[0]() is not w or kept[1] != w._version:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), batch)  # tuned for `batch` rows, right for any
        kept = reordered_weights[module] = (weakref.ref(w), w._version, packed)
    return kept[2]


def reordered_bytes(entries: int) -> int:
    """Bytes a CPU decode keeps reordered for this many fp32 weight entries: all of them, or none past
    REORDER_MAX_BYTES. What onednn_linears does, and what the planner counts."""
    return 4 * entries if 4 * entries <= REORDER_MAX_BYTES else 0


def kept_reordered_bytes() -> int:
    """Bytes held now by the reordered copies of every live model (tools/measure_peak.py)."""
    return sum(4 * packed.numel() for _, _, packed in reordered_weights.values())


def _onednn_forward(module, packed, x):
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, module.bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])  # (..., out)


def onednn_available(device: torch.device) -> bool:
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.backends.cpu.get_cpu_capability().startswith("AVX"))


@contextmanager
def onednn_linears(model, batch: int):
    """While decoding on an x86 CPU: each large fp32 nn.Linear multiplies through oneDNN on a copy of its
    weight in oneDNN's blocked layout (packed_weight), kept for the next call.

    A decode step multiplies a few rows (B) by every weight matrix. At B = 8 it is bound by reading the
    weights from memory, which oneDNN on the blocked layout does 1.7–2.0× as fast as MKL's sgemm (what
    nn.Linear calls) on one core (tools/bench_decode_matmul.py, DESIGN.md); at B = 50 both compute, oneDNN
    about 1.1× as fast. The copy costs the weights' memory once more (the planner counts it) and about 3.5
    of MKL's passes over the weights to make, once while they are frozen. Above REORDER_MAX_BYTES of such
    weights (Qwen2-1.5B: 5.7 GiB) that memory would decide whether a CPU run fits at all, so oneDNN
    multiplies on the plain weights instead (1.2–1.7× MKL's rate).
    """
    large = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32
             and m.weight.numel() >= ONEDNN_MIN_WEIGHT]
    reorder = reordered_bytes(sum(m.weight.numel() for m in large)) > 0
    try:
        for m in large:
            m.forward = functools.partial(_onednn_forward, m, packed_weight(m, batch) if reorder else m.weight)
        yield
    finally:
        for m in large:
            vars(m).pop("forward", None)  # the class's forward again


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             eos_token_id: int | list[int] | None = None, generator: torch.Generator | None = None,
             top_p: float = 1.0, compile: bool | None = None, onednn: bool | None = None) -> list[list[int]]:
    """New tokens for each prefix; each list ends at and includes its first EOS (or runs to max_new_tokens).

    compile: decode through torch.compile (None: on CUDA only, default_compile). onednn: the large
    matmuls of a decode step through oneDNN (None: on an x86 CPU). Neither changes what is sampled
    beyond float rounding.
    """
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
    compile = default_compile(device) if compile is None else compile
    # Under torch.compile inductor picks the products' kernels (it cannot lower oneDNN on a plain weight).
    onednn = onednn_available(device) and not compile if onednn is None else onednn and not compile
    B, Tp = len(prompts), max(lengths)
    total = Tp + max_new_tokens
    if compile:  # one compiled graph serves every call whose cache rounds up to the same length
        total = -(-total // CACHE_BUCKET) * CACHE_BUCKET
    stop = torch.tensor([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int)
                        else list(eos_token_id), dtype=torch.long, device=device)

    cache = model.new_cache(B, total)
    hidden = prefill(model, prompts, cache, Tp)  # (B, D); checks the prefixes' token ids
    slots = torch.arange(total, device=device)
    real = (slots >= Tp - torch.tensor(lengths, device=device)[:, None]) & (slots < Tp)  # (B, total): written
    position = torch.tensor(lengths, device=device)  # (B,): each row's next RoPE position
    cos_table, sin_table = (t[0] for t in model.rope(slots[None], hidden.dtype))  # (total, Dh) each
    u = None
    if temperature > 0:  # every step's uniforms at once: the stream does not depend on when sampling stops
        u = 1 - torch.rand(max_new_tokens, B, dtype=torch.float64, generator=generator,
                           device=device if generator is None else generator.device).to(device)  # (0, 1]
    check_every = 1 if device.type == "cpu" else SYNC_EVERY
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens = []
    with onednn_linears(model, B) if onednn else nullcontext():
        for t in range(max_new_tokens):
            logits = model.lm_head(hidden)  # (B, V)
            token = sample_next(logits, temperature, top_p, None if u is None else u[t])  # (B,)
            new_tokens.append(token)
            finished |= torch.isin(token, stop)
            if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and bool(finished.all())):
                break
            if compile:
                hidden = compiled_step(model, device, token, position, slots[Tp + t:Tp + t + 1], real, cache,
                                       cos_table, sin_table)
                compile = hidden is not None
            if not compile:
                hidden = decode_step(model, token, position, Tp + t, real, cache, cos_table, sin_table)
            position += 1

    rows = torch.stack(new_tokens, dim=1).tolist()
    stop_ids = set(stop.tolist())
    out = []
    for row in rows:
        end = next((j + 1 for j, tok in enumerate(row) if tok in stop_ids), len(row))
        out.append(row[:end])
    return out
