"""Predicted peak memory of a training run, term by term: `python -m minirl.plan --shape qwen2-1.5b`.

A training step (DESIGN.md, "The math") has two phases; the run's peak is the larger of their peaks.

1. Generation: G completions of one root prefix, `gen_batch` at a time (default all G), with a
   preallocated KV cache. Held: the weights, the LoRA state, the cache. Transient, one after the
   other: the prefill's activations, then each decode step's sampling buffers.
2. Update: the cache is gone; `train_batch` sequences of T = T_prompt + max_new_tokens tokens go
   through a forward whose autograd graph starts at the first adapted layer (model.py runs the
   layers below it under no_grad), then a backward. Held: the weights, the LoRA state and its
   gradients, the kept activations. Transient, on top of those: the top layer's forward, or its
   backward, or the log-prob workspace, or (GRPO, S-GRPO) the KL reference forward.

Notation: B sequences of T tokens, D hidden, F intermediate, H query and Hkv key/value heads of Dh,
V vocabulary, L layers, r the LoRA rank, s the bytes of a base-dtype number (fp32 4, bf16 2).

Weights.  s · (V·D [embedding] + V·D [lm_head, unless tied] + D [final norm] + L · (D·(H + 2Hkv)·Dh
+ (H + 2Hkv)·Dh [q, k, v with biases] + H·Dh·D [o] + 3·D·F [gate, up, down] + 2D [norms])).

LoRA.  n = Σ over adapted (layer, target) of r · (in + out). A and B are fp32 (4n), so are their
gradients (4n, during the update only: train.py drops them with zero_grad(set_to_none=True)) and
AdamW's two moments (8n, in both phases from the first step on).

KV cache.  2 [k, v] · L · B · Hkv · (T_prompt + max_new_tokens) · Dh · s, allocated whole up front.

Prefill, no grad, one layer at a time.  Its widest moment is usually the MLP: the layer's input, the
residual after attention and the normed residual (3·s·D) with silu(gate), up and their product
(3·s·F); adapters add their fp32 temporaries (`no_grad_bytes_per_token`). Times B · T_prompt, plus
the bool mask (B · T_prompt²) and, with math attention, the fp32 scores and their softmax
(2 · 4 · B · H · T_prompt²). With math attention a decode step also holds fp32 copies of one layer's
cached k and v: k scaled (H heads), k and v repeated to H heads when Hkv < H, and in bf16 the
upcast k and v (Hkv heads each): 4 · B · T · Dh per head copy.

Sampling.  The last position's logits (s·B·V), then logits / τ and its softmax in fp32 (8·B·V;
measured: torch.multinomial adds no B×V buffer of its own).

Kept activations.  Per token of each adapted layer: `saved_bytes_per_token` (derived term by term,
checked against torch.autograd.graph.saved_tensors_hooks in tests/test_plan.py) plus 4r for each
adapter's A x. Per token once: the final norm's fp32 input and 1/rms (4D + 4), the final hidden
state (s·D), the RoPE tables cos and sin (2·s·Dh). With `checkpoint_layers` an adapted layer keeps
only its input (s·D per token), and the backward rebuilds one layer's full set at a time.

Attention.  A fused kernel (flash or memory-efficient on CUDA, PyTorch's flash kernel on the CPU)
keeps q, k, v, its output and the log-sum-exp. CUDA has no fused kernel for fp32 with grouped-query
heads (flash needs fp16/bf16, the memory-efficient kernel refuses H ≠ Hkv), so there PyTorch falls
back to the math path, which keeps fp32 q, k and v repeated to H heads and the B×H×T×T softmax:
up to 4 · (3H·Dh + H·T) per token. `attention="auto"` picks what PyTorch would on `device`.

Log-probs.  minirl.logprobs.selected_logprobs runs the forward, then minirl.kernels.gathered_logprobs
on the N selected hidden rows only; it never forms N×V logits. Its PyTorch path walks the vocabulary
in chunks of C = chunk_width(N, V) columns, N·C ≤ WORKSPACE floats (kernels/fused_logprobs.py),
holding one fp32 (N, C) block of logits or of their gradient: 4 · N · C, plus fp32 copies of the
rows, their gradient and one product (3 · 4 · N · D) and, for a bf16 weight, an fp32 copy of the
weight chunk (4 · C · D, made for each product and freed after it). On CUDA the Triton path runs
instead: one (N, C) block of the logits' gradient in the weight's dtype (s · N · C) and two fp32
(N, D) buffers. N, rows per forward, by method:
  grpo   every completion token: B · max_new_tokens;
  sgrpo  at most max(α, k) tokens per completion (`sgrpo_tokens`, default 32);
  tspmo  branch-point pairs only: a tree with G leaves has at most G − 1 nodes with two or more
         children and at most 2(G − 1) edges leaving them, so N ≤ min(B · max_new_tokens, 2(G − 1)).
selected_logprobs cuts each sequence after its last picked token, so S-GRPO's and T-SPMO's forwards
are often much shorter than T; the plan assumes the worst case, a pick at the last token.

Forward and backward of the top layer.  Above the kept activations, the widest moments of the top
adapted layer: `forward_bytes_per_token` (the MLP's product, or an adapter's fp32 temporaries) and
`backward_bytes_per_token` (the MLP's gradients; math attention's T×T gradients), per token.

The frozen layers' no-grad forward comes before any activation is kept and is narrower than one
adapted layer's kept set, so it never sets the peak and is not listed.

Sequences per training forward (`train_batch`): grpo and sgrpo 1, as the paper accumulates their
gradients one completion at a time; tspmo G, one forward over the group (the loss reads only
branch-point rows but the forward covers every token). train.py runs T-SPMO in chunks of
--train-batch sequences: pass the same number here.

Replay (T-SPMO): a replayed group's root is the prompt plus up to max_new_tokens − 1 tokens of an
earlier completion, so its sequences are up to twice as long. `replay=True` plans for that case.

What the plan leaves out, and what checks it. On CUDA it means torch.cuda.max_memory_allocated
(what train.py logs as peak_mem_bytes); the caching allocator's reserve above that, the CUDA context
and cuBLAS workspaces are outside it. It has been checked on the CPU only: tools/measure_peak.py
compares it with the resident set of a real step above a warm baseline (its docstring says how);
the libraries' first-use workspaces are outside it there, and reported apart.
"""

import argparse
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from minirl.errors import InputError
from minirl.kernels.fused_logprobs import chunk_width
from minirl.lora import TARGETS, parse_layers
from minirl.model import ModelConfig

METHODS = ("grpo", "sgrpo", "tspmo")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ATTENTION = ("auto", "fused", "math")
MAX_GROUP = 1 << 20  # the search for the largest group size stops here

# The real configs of the checkpoints people plan for (their config.json on the Hugging Face hub).
SHAPES = {
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}


@dataclass
class PlanSettings:
    """What a run does that decides its memory; the defaults are the paper's multiplication run."""
    method: str = "tspmo"
    group_size: int = 50  # G
    max_new_tokens: int = 300
    prompt_tokens: int = 60  # T_prompt, the root prefix of a group
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_layers: str = "last-quarter"
    dtype: str = "fp32"  # the base weights; LoRA is always fp32
    device: str = "cuda"
    attention: str = "auto"  # auto: what PyTorch picks on `device`; or fused, math
    gen_batch: int = 0  # completions per generate call, 0 = the whole group
    train_batch: int = 0  # sequences per training forward, 0 = the method's own (grpo, sgrpo 1; tspmo G)
    checkpoint_layers: bool = False
    replay: bool = False  # T-SPMO: plan for a replayed group (root up to T_prompt + max_new_tokens − 1)
    sgrpo_tokens: int = 32  # max(α, k): S-GRPO's kept tokens per completion

    def __post_init__(self):
        if isinstance(self.lora_targets, str):  # "q_proj,v_proj", as train.py and the command line write it
            self.lora_targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def validate(self):
        def need(ok, name, expected):
            if not ok:
                raise InputError(f"--{name.replace('_', '-')}: {getattr(self, name)!r} is not {expected}")

        need(self.method in METHODS, "method", f"one of {', '.join(METHODS)}")
        need(self.dtype in DTYPE_BYTES, "dtype", f"one of {', '.join(DTYPE_BYTES)}")
        need(self.attention in ATTENTION, "attention", f"one of {', '.join(ATTENTION)}")
        need(str(self.device).split(":")[0] in ("cpu", "cuda"), "device", "cpu, cuda or cuda:N")
        for name in ("group_size", "max_new_tokens", "prompt_tokens", "lora_rank", "sgrpo_tokens"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, "a positive integer")
        for name in ("gen_batch", "train_batch"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name, "an integer ≥ 0")
        bad = [t for t in self.lora_targets if t not in TARGETS]
        if bad or not self.lora_targets:
            raise InputError(f"--lora-targets: {','.join(bad) or 'empty'} is not a module name, "
                             f"expected some of {','.join(TARGETS)}")


@dataclass
class Phase:
    """Bytes by term. `held` terms coexist and add up; `transient` ones come at different moments,
    on top of the held ones, so only the largest of them adds to the peak."""
    held: dict[str, int] = field(default_factory=dict)
    transient: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.held.values()) + max(self.transient.values(), default=0)


@dataclass
class Plan:
    generation: Phase
    update: Phase
    attention: str  # fused or math, as resolved

    @property
    def peak(self) -> int:
        return max(self.generation.total, self.update.total)

    def as_dict(self) -> dict[str, dict[str, int]]:
        """{"generation": {term: bytes, ..., "total"}, "update": {...}, "peak": {"total"}}."""
        out = {}
        for name in ("generation", "update"):
            phase = getattr(self, name)
            transient = {f"transient: {k}": v for k, v in phase.transient.items()}
            out[name] = {**phase.held, **transient, "total": phase.total}
        out["peak"] = {"total": self.peak}
        return out


# ----------------------------------------------------------------------------- sizes of the model


def linear_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear map of a layer."""
    D, F = c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}


def parameter_count(c: ModelConfig) -> int:
    D, shapes = c.hidden_size, linear_shapes(c)
    biases = sum(shapes[t][1] for t in ("q_proj", "k_proj", "v_proj"))
    per_layer = sum(i * o for i, o in shapes.values()) + biases + 2 * D
    return c.vocab_size * D * (1 if c.tie_word_embeddings else 2) + D + c.num_hidden_layers * per_layer


def lora_parameter_count(c: ModelConfig, targets, n_layers: int, rank: int) -> int:
    shapes = linear_shapes(c)
    return n_layers * sum(rank * sum(shapes[t]) for t in targets)


def resolve_attention(c: ModelConfig, settings: PlanSettings) -> str:
    """fused or math: what scaled_dot_product_attention runs for the training forward."""
    if settings.attention != "auto":
        return settings.attention
    gqa = c.num_key_value_heads != c.num_attention_heads
    cuda = str(settings.device).startswith("cuda")
    return "math" if cuda and gqa and settings.dtype == "fp32" else "fused"


def saved_bytes_per_token(c: ModelConfig, s: int, targets, grad_in: bool, attention: str = "fused",
                          T: int = 0) -> int:
    """Bytes autograd keeps per token for one adapted layer (model.py's DecoderLayer, lora.py's LoRALinear).

    grad_in: whether the layer's input requires grad (every adapted layer but the lowest).
    T: the sequence length, for the math attention's T×T softmax.
    A tensor is kept only where some input of its operation requires grad, and PyTorch saves an
    operand only for the gradient of another operand that requires grad: a frozen linear keeps
    nothing of its input (its weight is the saved operand), `weight * normed` keeps only the weight.
    Term by term:
      input RMSNorm      its fp32 input and 1/rms: 4D + 4                               (if grad_in)
      attention          fused: q, k (after RoPE), v, the output, the fp32 log-sum-exp:
                         s · (2H + 2Hkv) · Dh + 4H;  math, in fp32, k and v repeated to H heads: the
                         softmax 4 · H · T, and 4 · H · Dh for each of q (if k requires grad), k (if q
                         does), v (if q or k does)               (if q, k or v requires grad)
      post-attn RMSNorm  4D + 4                                    (if the residual requires grad)
      MLP                silu keeps gate's output g and the product keeps up's output u (s · F each,
                         if g requires grad); the product keeps silu(g) (s · F, if u requires grad)
      adapter inputs     LoRA computes in fp32, so its A-linear keeps an fp32 input: in an fp32
                         model the input itself, one for all adapters reading it (q, k, v share the
                         normed x; gate and up the normed residual), none for o_proj when a fused
                         attention keeps its output (the transposed output is that same memory); in
                         a bf16 model one fp32 copy per adapter (each casts). 4 · in_features each.
    The adapters' own A x (4r each) is `adapter_bytes_per_token`.
    """
    D, F, H, Hkv, Dh = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    shapes = linear_shapes(c)
    q, k, v = (grad_in or t in targets for t in ("q_proj", "k_proj", "v_proj"))
    in_graph = q or k or v
    residual = grad_in or in_graph or "o_proj" in targets
    g, u = residual or "gate_proj" in targets, residual or "up_proj" in targets
    total = 4 * D + 4 if grad_in else 0
    if in_graph:
        if attention == "fused":
            total += s * (2 * H + 2 * Hkv) * Dh + 4 * H
        else:  # matmuls keep an operand only for the other operand's gradient
            total += 4 * (H * Dh * ((1 if k else 0) + (1 if q else 0) + (1 if q or k else 0)) + H * T)
    total += 4 * D + 4 if residual else 0
    total += s * F * ((2 if g else 0) + (1 if u else 0))
    for group in (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)):
        hit = [t for t in group if t in targets]
        if s != 4:
            total += 4 * sum(shapes[t][0] for t in hit)
        elif hit and not (group == ("o_proj",) and in_graph and attention == "fused"):
            total += 4 * shapes[hit[0]][0]
    return total


def no_grad_bytes_per_token(c: ModelConfig, s: int, targets) -> int:
    """The widest moment of an adapted layer's forward without grad (the prefill), per token.

    MLP: the layer's input, the residual and the normed residual (3·s·D) with silu(gate), up and
    their product (3·s·F). Attention: the input, the normed input and q, k, v (s · (2D + (H + 2Hkv)·Dh)).
    An adapter finishing holds the base output, its fp32 update and their fp32 sum (s + 8 per output;
    a bf16 model also the rounded output, s more) and, in bf16, its fp32 copy of the input (4 · in):
    up's while silu(gate) is alive, down's while the product is alive.
    """
    D, F, Dh = c.hidden_size, c.intermediate_size, c.head_dim
    shapes = linear_shapes(c)
    finishing = s + 8 + (s if s != 4 else 0)

    def adapter(t):
        return finishing * shapes[t][1] + (4 * shapes[t][0] if s != 4 else 0) if t in targets else 0

    mlp = 3 * s * D + max(3 * s * F, adapter("gate_proj"), s * F + adapter("up_proj"), s * F + adapter("down_proj"))
    attention = s * (2 * D + (c.num_attention_heads + 2 * c.num_key_value_heads) * Dh) + max(
        adapter(t) for t in ("q_proj", "k_proj", "v_proj", "o_proj"))
    return max(mlp, attention)


def forward_bytes_per_token(c: ModelConfig, s: int, targets) -> int:
    """The top adapted layer's forward, above the kept activations: the MLP's product before down_proj
    (s·F), or an adapter finishing, with its base output and fp32 update (and in bf16 their fp32 sum,
    which an fp32 model returns as the output itself), whichever is wider; plus the residuals (2·s·D)."""
    finishing = s + 4 + (4 if s != 4 else 0)
    shapes = linear_shapes(c)
    return max([s * c.intermediate_size] + [finishing * shapes[t][1] for t in targets]) + 2 * s * c.hidden_size


def backward_bytes_per_token(c: ModelConfig, s: int, targets, attention: str, T: int) -> int:
    """The top adapted layer's backward, above the kept activations. The MLP: the product's gradient
    while it makes those of silu(gate) and up (3·s·F), in bf16 the norm's fp32 gradient of the residual
    (4D), less a down_proj adapter's kept fp32 input (4F), released by then. Math attention, at another
    moment: the gradients of the T×T scores and of their softmax (8·H·T)."""
    D, F = c.hidden_size, c.intermediate_size
    mlp = 3 * s * F + (4 * D if s != 4 else 0) - (4 * F if "down_proj" in targets else 0)
    return max(mlp, 8 * c.num_attention_heads * T if attention == "math" else 0)


def adapter_bytes_per_token(targets, rank: int) -> int:
    """A x of every adapter of a layer, kept for B's gradient: 4r each (fp32)."""
    return 4 * rank * len(targets)


# ----------------------------------------------------------------------------- the plan


def root_tokens(settings: PlanSettings) -> int:
    """Tokens of a group's root prefix: the prompt, or for a replayed T-SPMO group the prompt plus at
    most max_new_tokens − 1 tokens of an earlier completion."""
    replayed = settings.replay and settings.method == "tspmo"
    return settings.prompt_tokens + (settings.max_new_tokens - 1 if replayed else 0)


def sequences_per_forward(settings: PlanSettings) -> int:
    if settings.train_batch:
        return min(settings.train_batch, settings.group_size)
    return settings.group_size if settings.method == "tspmo" else 1


def rows_per_forward(settings: PlanSettings, B: int) -> int:
    """N, the (row, token) pairs whose log-probs one training forward of B sequences computes."""
    new = settings.max_new_tokens
    if settings.method == "grpo":
        return B * new
    if settings.method == "sgrpo":
        return B * min(new, settings.sgrpo_tokens)
    return min(B * new, 2 * (settings.group_size - 1))


def plan_memory(config: ModelConfig, settings: PlanSettings) -> Plan:
    """The predicted peak of each phase of one training step, term by term, in bytes.

    plan.generation and plan.update are Phases (held and transient terms, total); plan.peak is the
    run's peak; plan.as_dict() is {"generation": {term: bytes, "total"}, "update": ..., "peak": ...}.
    A trainer can warn before a run: plan_memory(model.config, PlanSettings(method=..., ...)).peak
    against torch.cuda.get_device_properties(0).total_memory.
    """
    settings.validate()
    c, s = config, DTYPE_BYTES[settings.dtype]
    D, F, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    H, Hkv, Dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    layers = parse_layers(settings.lora_layers, L)
    targets = tuple(t for t in TARGETS if t in settings.lora_targets)
    n_lora = lora_parameter_count(c, targets, len(layers), settings.lora_rank)
    attention = resolve_attention(c, settings)
    Tp = root_tokens(settings)
    T = Tp + settings.max_new_tokens
    if T > c.max_position_embeddings:
        raise InputError(f"--prompt-tokens {settings.prompt_tokens} + --max-new-tokens {settings.max_new_tokens}: "
                         f"{T} tokens is past the model's max_position_embeddings ({c.max_position_embeddings})")
    weights = parameter_count(c) * s

    B = min(settings.gen_batch or settings.group_size, settings.group_size)
    scores = 2 * 4 * B * H * Tp * Tp if attention == "math" else 0
    generation = Phase(
        held={"weights": weights,
              "LoRA A, B and AdamW moments": 12 * n_lora,
              "KV cache": 2 * L * B * Hkv * T * Dh * s},
        transient={"prefill activations": B * Tp * no_grad_bytes_per_token(c, s, targets) + B * Tp * Tp + scores,
                   "sampling logits": B * V * (s + 8)})
    if attention == "math":  # one layer's cached k, v: in fp32, repeated to H heads (GQA), k scaled
        copies = H + (2 * H if H != Hkv else 0) + (2 * Hkv if s != 4 else 0)
        generation.transient["decode step, math attention"] = 4 * B * T * Dh * copies

    B = sequences_per_forward(settings)
    tokens, N = B * T, rows_per_forward(settings, B)
    adapters = adapter_bytes_per_token(targets, settings.lora_rank)
    if settings.checkpoint_layers:  # each adapted layer keeps its input; the backward rebuilds one at a time
        kept = len(layers) * s * D
        rebuilt = saved_bytes_per_token(c, s, targets, True, attention, T) + adapters
        forward = no_grad_bytes_per_token(c, s, targets)
    else:
        kept = sum(saved_bytes_per_token(c, s, targets, i > layers[0], attention, T) + adapters for i in layers)
        rebuilt = 0
        forward = forward_bytes_per_token(c, s, targets)
    backward = backward_bytes_per_token(c, s, targets, attention, T)
    update = Phase(
        held={"weights": weights,
              "LoRA A, B, gradients and AdamW moments": 16 * n_lora,
              "activations kept": tokens * kept,
              "final norm, hidden states, RoPE tables": tokens * (4 * D + 4 + s * D + 2 * s * Dh)},
        transient={"forward of the top layer": tokens * forward,
                   "backward of the top layer": tokens * (rebuilt + backward),
                   "log-prob workspace": logprob_workspace(N, V, D, s, str(settings.device).startswith("cuda"))})
    if settings.method != "tspmo":  # the KL reference: a no-grad forward while the graph is held
        update.transient["reference forward (KL)"] = tokens * no_grad_bytes_per_token(c, s, ())
    return Plan(generation, update, attention)


def logprob_workspace(N: int, V: int, D: int, s: int, triton: bool) -> int:
    """Bytes gathered_logprobs holds beyond its inputs (see the module docstring)."""
    C = chunk_width(N, V)
    if triton:  # one (N, C) block of dz in the weight's dtype, the fp32 gradient of the rows and a product
        return s * N * C + 2 * 4 * N * D
    return 4 * N * C + 3 * 4 * N * D + (4 * C * D if s != 4 else 0)


def largest_group(config: ModelConfig, settings: PlanSettings, budget: int) -> int:
    """The largest G whose planned peak fits in `budget` bytes: 0 if none, MAX_GROUP if every G does.

    No term falls as G grows, so fitting is monotone in G: double until it fails, then bisect.
    """
    def fits(G):
        return plan_memory(config, replace(settings, group_size=G)).peak <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi < MAX_GROUP and fits(hi):
        lo, hi = hi, min(2 * hi, MAX_GROUP)
    if fits(hi):
        return hi
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ----------------------------------------------------------------------------- command line

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30, "t": 2**40, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of '16GB' (10⁹ each), '15GiB' or '15G' (2³⁰ each), '800MB', or a plain number of bytes."""
    t = str(text).strip().lower().replace(" ", "")
    number = t.rstrip("kmgtib")
    unit = t[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if unit not in UNITS or not (value > 0 and math.isfinite(value)):
        raise InputError(f"--budget: {text!r} is not a size; expected a positive number and a unit, "
                         f"such as 16GB, 15GiB or 800MB")
    return int(value * UNITS[unit])


def gib(n: int) -> str:
    """'5.75 GiB'; a term that rounds to 0.00 GiB but is not zero also shows its MiB."""
    text = f"{n / 2**30:>8.2f} GiB"
    return text if n >= 0.005 * 2**30 or n == 0 else f"{text} ({n / 2**20:.1f} MiB)"


def add_settings_arguments(ap):
    """The run's settings, named as train.py names them (shared with tools/measure_peak.py)."""
    add = ap.add_argument
    add("--method", default="tspmo", choices=METHODS, help="the RL method (default: tspmo)")
    add("--group-size", type=int, default=50, help="G, completions per group (default: 50)")
    add("--max-new-tokens", type=int, default=300, help="longest completion (default: 300)")
    add("--prompt-tokens", type=int, default=60, help="tokens of the root prompt (default: 60)")
    add("--lora-rank", type=int, default=8, help="LoRA rank r (default: 8)")
    add("--lora-targets", default="q_proj,v_proj", help="comma list of adapted linear maps (default: q_proj,v_proj)")
    add("--lora-layers", default="last-quarter",
        help="all, last-half, last-third, last-quarter, last:N, a fraction such as 0.25, or 0,3,5 "
             "(default: last-quarter)")
    add("--dtype", default="fp32", choices=sorted(DTYPE_BYTES), help="dtype of the base weights (default: fp32)")
    add("--device", default="cuda", help="cuda or cpu: decides which attention kernel runs (default: cuda)")
    add("--attention", default="auto", choices=ATTENTION,
        help="attention kernel: auto (what PyTorch picks on --device), fused, math (default: auto)")
    add("--gen-batch", type=int, default=0, help="completions per generate call, 0 = all G (default: 0)")
    add("--train-batch", type=int, default=0,
        help="sequences per training forward, 0 = the method's own: 1 for grpo and sgrpo, G for tspmo (default: 0)")
    add("--checkpoint-layers", action="store_true", help="activation checkpointing inside the adapted layers")
    add("--replay", action="store_true", help="T-SPMO: plan for a replayed group, root up to prompt + max-new-tokens")


def settings_from_args(args) -> PlanSettings:
    return PlanSettings(method=args.method, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                        prompt_tokens=args.prompt_tokens, lora_rank=args.lora_rank, lora_targets=args.lora_targets,
                        lora_layers=args.lora_layers, dtype=args.dtype, device=args.device, attention=args.attention,
                        gen_batch=args.gen_batch, train_batch=args.train_batch,
                        checkpoint_layers=args.checkpoint_layers, replay=args.replay)


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m minirl.plan", description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", metavar="DIR", help="a Hugging Face Qwen2 folder (only its config.json is read)")
    where.add_argument("--shape", choices=sorted(SHAPES), help="a built-in model shape")
    add_settings_arguments(ap)
    ap.add_argument("--budget", help="memory to fit in, such as 16GB (10⁹ bytes) or 15GiB (2³⁰ bytes): "
                                     "also print the largest G that fits")
    return ap


def load_config(args) -> ModelConfig:
    if args.shape:
        return ModelConfig(**SHAPES[args.shape])
    return ModelConfig.from_json(Path(args.model) / "config.json")


def report(config: ModelConfig, settings: PlanSettings, plan: Plan) -> str:
    c, layers = config, parse_layers(settings.lora_layers, config.num_hidden_layers)
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    span = f"{layers[0]}-{layers[-1]}" if contiguous else ",".join(map(str, layers))
    lines = [f"model: {c.num_hidden_layers} layers, hidden {c.hidden_size}, intermediate {c.intermediate_size}, "
             f"{c.num_attention_heads}/{c.num_key_value_heads} query/kv heads, vocab {c.vocab_size}: "
             f"{parameter_count(c) / 1e9:.3f} B parameters in {settings.dtype}",
             f"run: {settings.method}, G = {settings.group_size}, {settings.prompt_tokens} prompt + "
             f"{settings.max_new_tokens} new tokens{' (replayed root)' if settings.replay else ''}, LoRA r = "
             f"{settings.lora_rank} on {','.join(settings.lora_targets)} of layers {span}, {plan.attention} attention "
             f"on {settings.device}{', activation checkpointing' if settings.checkpoint_layers else ''}"]
    B_gen = min(settings.gen_batch or settings.group_size, settings.group_size)
    for name, phase, note in (("generation", plan.generation, f"{B_gen} sequences per generate call"),
                              ("update", plan.update, f"{sequences_per_forward(settings)} sequences per forward")):
        lines.append(f"{name} ({note}):")
        lines += [f"  {term:<48}{gib(n)}" for term, n in phase.held.items()]
        largest = max(phase.transient, key=phase.transient.get)
        for term, n in phase.transient.items():
            lines.append(f"  {'+ ' if term == largest else '  '}{'transient: ' + term:<46}{gib(n)}")
        lines.append(f"  {'= peak of the ' + name:<48}{gib(phase.total)}")
    which = "update" if plan.update.total >= plan.generation.total else "generation"
    lines.append(f"peak: {gib(plan.peak).strip()} = {plan.peak / 1e9:.2f} GB, during the {which} "
                 f"(transients come one at a time: only the one marked + counts)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args)
        settings = settings_from_args(args)
        plan = plan_memory(config, settings)
        budget = parse_size(args.budget) if args.budget else None
        print(report(config, settings, plan))
        if budget is not None:
            G = largest_group(config, settings, budget)
            if G == 0:
                print(f"budget {gib(budget).strip()}: not even G = 1 fits")
            elif G == MAX_GROUP:
                print(f"budget {gib(budget).strip()}: every G up to {MAX_GROUP} fits (no term grows with G here)")
            else:
                print(f"budget {gib(budget).strip()}: the largest group that fits is G = {G}")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
