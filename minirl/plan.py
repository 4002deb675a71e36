"""Predicted peak memory of a training run, term by term: `python -m minirl.plan --shape qwen2-1.5b --device cuda`.

The planner reads `python -m minirl.train`'s command line and resolves it as training does
(minirl.config: the flag, else the model folder's tuned settings, else the paper's), so it predicts
the run the same command trains; flags that do not change memory (--lr, --steps, …) have no effect.

A step (DESIGN.md, "The math") has two phases; the run's peak is the larger of their peaks.
1. Generation: G completions of one root prefix, gen_batch at a time (0: all G), into a KV cache
   allocated whole up front. Held: the weights, the LoRA state, the cache, and on an x86 CPU in fp32 a
   copy of the large matrices in oneDNN's layout (generate.packed_weight; kept from the first decode
   on, so held in the update too). Transient, one after the other: the prefill's activations, then a
   decode step's sampling buffers (the last position's logits, and an fp32 copy unless they are fp32:
   the exp is taken in place; the inverse CDF copies them only where V is over 256 and no block size of
   16 to 256 divides it; up to 256, its one prefix sum of at most 1 KiB a row is left out).
2. Update: train_batch completions at a time (every method, rl/), T = T_prompt + max_new_tokens tokens
   each, through a forward whose graph starts at the first adapted layer (model.py), then a backward.
   Held: the weights, the LoRA state and gradients, the adapted layers' kept activations
   (`saved_bytes_per_token`, checked against autograd's saved tensors in tests/test_plan.py; with
   checkpoint_layers only each layer's input, the backward rebuilding one layer at a time), the final
   norm's input, the hidden states, the RoPE tables. Transient: the top layer's forward or backward,
   the log-prob workspace, or (GRPO, S-GRPO with β > 0) the KL reference forward of the same batch
   without grad, from the output of the layers below the first adapter (kept from the policy's forward).
   The frozen layers' no-grad forward is narrower than one adapted layer's kept set: never the peak.
A replayed T-SPMO group samples only what its root leaves of the cap (rl/tspmo.py), so it is never
longer than a fresh one and needs no case of its own.

Notation: B sequences of T tokens, D hidden, F intermediate, H query and Hkv key/value heads of Dh,
V vocabulary, L layers, r the LoRA rank, s the bytes of a base-dtype number (fp32 4, bf16 2).
LoRA: n = Σ over adapted (layer, target) of r · (in + out), all fp32: A and B (4n), AdamW's moments
(8n, from the first step on), the gradients (4n, update only: zero_grad(set_to_none=True)).
KV cache: 2 [k, v] · L · B · Hkv · T · Dh · s. Attention: `resolve_attention`. Log-probs: only the N
picked hidden rows reach the lm_head (minirl.logprobs; `rows_per_forward`, `logprob_workspace`).

Left out: on CUDA the plan means torch.cuda.max_memory_allocated (train.py's peak_mem_bytes), so the
allocator's reserve, the CUDA context and cuBLAS workspaces are outside it. It has been checked on the
CPU only, by tools/measure_peak.py (its docstring says how). --tree-pack (a T×T mask) is refused.
"""

import bisect
import math
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from minirl.cli import positive, run_cli, tiny_defaults
from minirl.config import TrainConfig, build_parser as train_parser, config_from_args, resumed_config
from minirl.errors import InputError
from minirl.generate import ONEDNN_MIN_WEIGHT, cdf_block, onednn_available, reordered_bytes
from minirl.kernels.fused_logprobs import chunk_width
from minirl.lora import parse_layers, parse_targets
from minirl.model_config import ModelConfig
from minirl.tiny import tiny_model_path

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
    "qwen2.5-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
}
SHAPES.update({"qwen2.5-" + name.removeprefix("qwen2-"): shape  # Qwen2.5 kept Qwen2's shapes at these sizes
               for name, shape in list(SHAPES.items()) if name.startswith("qwen2-")})


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
    attention: str  # fused or math, as resolved (`resolve_attention`)

    @property
    def peak(self) -> int:
        return max(self.generation.total, self.update.total)


# ----------------------------------------------------------------------------- sizes of the model


def linear_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear map of a layer."""
    D, F = c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}


def parameter_count(c: ModelConfig) -> int:
    """Embedding, lm_head unless tied, final norm; per layer its linear maps, their biases where the
    family has them (model_config.py), two norms and Qwen3's q and k norms."""
    D, shapes = c.hidden_size, linear_shapes(c)
    biases = {"q_proj": c.qkv_bias, "k_proj": c.qkv_bias, "v_proj": c.qkv_bias, "o_proj": c.o_bias,
              "gate_proj": c.mlp_bias, "up_proj": c.mlp_bias, "down_proj": c.mlp_bias}
    per_layer = sum(i * o + (o if biases[t] else 0) for t, (i, o) in shapes.items()) + 2 * D
    per_layer += 2 * c.head_dim if c.qk_norm else 0
    return c.vocab_size * D * (1 if c.tie_word_embeddings else 2) + D + c.num_hidden_layers * per_layer


def onednn_entries(c: ModelConfig) -> int:
    """Entries of the matrices a CPU decode step reorders for oneDNN: those of at least ONEDNN_MIN_WEIGHT."""
    layers = sum(i * o for i, o in linear_shapes(c).values() if i * o >= ONEDNN_MIN_WEIGHT)
    head = c.vocab_size * c.hidden_size
    return c.num_hidden_layers * layers + (head if head >= ONEDNN_MIN_WEIGHT else 0)


def lora_parameter_count(c: ModelConfig, targets, n_layers: int, rank: int) -> int:
    shapes = linear_shapes(c)
    return n_layers * sum(rank * sum(shapes[t]) for t in targets)


def resolve_attention(c: ModelConfig, cfg: TrainConfig, attention: str = "auto") -> str:
    """fused or math: what scaled_dot_product_attention runs for the training forward ("auto": what
    PyTorch picks). A fused kernel (flash or memory-efficient on CUDA, flash on the CPU) keeps q, k, v,
    its output and the log-sum-exp. CUDA has none for fp32 with grouped-query heads (flash needs
    fp16/bf16, the memory-efficient kernel refuses H ≠ Hkv): the math path keeps the fp32 T×T softmax."""
    if attention != "auto":
        return attention
    gqa = c.num_key_value_heads != c.num_attention_heads
    return "math" if str(cfg.device).startswith("cuda") and gqa and cfg.dtype == "fp32" else "fused"


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


def sequences_per_forward(cfg: TrainConfig) -> int:
    return min(cfg.train_batch, cfg.group_size)


def rows_per_forward(cfg: TrainConfig, B: int) -> int:
    """N, the (row, token) pairs whose log-probs one training forward of B completions computes: GRPO
    every completion token; S-GRPO at most max(α, k) each; T-SPMO branch-point pairs only, at most
    2(G − 1) (a tree with G leaves has at most G − 1 nodes with two or more children). A forward
    stops at its last pick; the plan assumes the worst case, a pick at the last token."""
    if cfg.method == "grpo":
        return B * cfg.max_new_tokens
    if cfg.method == "sgrpo":
        return B * min(cfg.max_new_tokens, max(cfg.sgrpo_alpha, cfg.sgrpo_k))
    return min(B * cfg.max_new_tokens, 2 * (cfg.group_size - 1))


def plan_memory(config: ModelConfig, cfg: TrainConfig, prompt_tokens: int = 60, attention: str = "auto") -> Plan:
    """The predicted peak of each phase of one training step of the run `cfg`, term by term, in bytes:
    Phases plan.generation and plan.update, and plan.peak. prompt_tokens estimates a root prompt.
    A trainer can warn before a run: plan_memory(model.config, cfg).peak against the device's memory."""
    if cfg.tree_pack:
        raise InputError("--tree-pack: the planner does not model the packed tree (its T×T ancestor mask); "
                         "plan the run without it")
    if str(cfg.device).split(":")[0] not in ("cpu", "cuda"):
        raise InputError(f"--device {cfg.device}: expected cpu, cuda or cuda:N (it decides the kernels planned)")
    c, s = config, DTYPE_BYTES[cfg.dtype]
    D, V, L = c.hidden_size, c.vocab_size, c.num_hidden_layers
    H, Hkv, Dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    layers = parse_layers(cfg.lora_layers, L)
    targets = parse_targets(cfg.lora_targets)
    n_lora = lora_parameter_count(c, targets, len(layers), cfg.lora_rank)
    attention = resolve_attention(c, cfg, attention)
    Tp, T = prompt_tokens, prompt_tokens + cfg.max_new_tokens
    if T > c.max_position_embeddings:
        raise InputError(f"--prompt-tokens {Tp} + --max-new-tokens {cfg.max_new_tokens}: {T} tokens is "
                         f"past the model's max_position_embeddings ({c.max_position_embeddings})")
    weights = parameter_count(c) * s
    cuda = str(cfg.device).startswith("cuda")
    # On an x86 CPU, decoding keeps a copy of the large fp32 matrices in oneDNN's layout (generate.packed_weight)
    x86_fp32 = cfg.dtype == "fp32" and onednn_available(torch.device(cfg.device))
    reordered = reordered_bytes(onednn_entries(c)) if x86_fp32 else 0

    B = min(cfg.gen_batch or cfg.group_size, cfg.group_size)
    # generate prefills each distinct prefix once (here one root for the B rows), into its own k, v
    # buffers, which it then copies to every row's slots of the KV cache
    scores = 2 * 4 * H * Tp * Tp if attention == "math" else 0
    generation = Phase(
        held={"weights": weights,
              "LoRA A, B and AdamW moments": 12 * n_lora,
              "KV cache": 2 * L * B * Hkv * T * Dh * s},
        transient={"prefill activations": Tp * no_grad_bytes_per_token(c, s, targets) + scores
                                          + 2 * L * Hkv * Tp * Dh * s,
                   "sampling logits": B * V * (s + (4 if s != 4 else 0) + (4 if V % cdf_block(V) else 0))})
    # One layer's cached k, v in fp32, repeated to H heads (GQA), k scaled. Not on the CPU, whose decode step
    # multiplies each key/value head's query heads as one block (model.grouped_query_attention): no copies.
    if attention == "math" and cuda:
        copies = H + (2 * H if H != Hkv else 0) + (2 * Hkv if s != 4 else 0)
        generation.transient["decode step, math attention"] = 4 * B * T * Dh * copies

    B = sequences_per_forward(cfg)
    tokens, N = B * T, rows_per_forward(cfg, B)
    adapters = adapter_bytes_per_token(targets, cfg.lora_rank)
    if cfg.checkpoint_layers:  # each adapted layer keeps its input; the backward rebuilds one at a time
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
                   "log-prob workspace": logprob_workspace(N, V, D, s, cuda)})
    for phase in (generation, update) if reordered else ():  # made by the first generation and kept
        phase.held["weights in oneDNN's layout (x86 CPU decode)"] = reordered
    if cfg.method != "tspmo" and cfg.beta > 0:  # the KL reference: the adapted layers without grad, graph held;
        below = tokens * s * D  # the layers below them ran once for both, their output kept until then
        update.transient["forward of the top layer"] += below
        update.transient["reference forward (KL)"] = tokens * no_grad_bytes_per_token(c, s, ()) + below
    return Plan(generation, update, attention)


def logprob_workspace(N: int, V: int, D: int, s: int, triton: bool) -> int:
    """Bytes gathered_logprobs holds beyond its inputs: one (N, C) block of logits or of their gradient,
    C = chunk_width(N, V) (fp32 on the PyTorch path, the weight's dtype in Triton), fp32 (N, D) buffers
    for the rows, their gradient and a product (two in Triton), and on the PyTorch path with a bf16
    weight an fp32 copy of one weight chunk (4 · C · D)."""
    C = chunk_width(N, V)
    if triton:
        return s * N * C + 2 * 4 * N * D
    return 4 * N * C + 3 * 4 * N * D + (4 * C * D if s != 4 else 0)


def largest_group(config: ModelConfig, cfg: TrainConfig, budget: int, **options) -> int:
    """The largest G whose planned peak fits in `budget` bytes: 0 if none, MAX_GROUP if every G does.
    No term falls as G grows, so fitting is monotone in G and a bisection finds the edge."""
    def peak(G):
        return plan_memory(config, replace(cfg, group_size=G), **options).peak

    return bisect.bisect_right(range(1, MAX_GROUP + 1), budget, key=peak)


# ----------------------------------------------------------------------------- command line

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of '16GB' (10⁹ each), '15GiB' (2³⁰ each), '800MB'. The unit is required: a bare 16 could
    mean bytes or gigabytes, and a guess either way plans a run that does not fit."""
    match = re.fullmatch(r"\s*((?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*", str(text).lower())
    if match and match[2] in UNITS and 0 < float(match[1]) < math.inf:
        return int(float(match[1]) * UNITS[match[2]])
    why = "has no unit" if match and not match[2] else "is not a size"
    raise InputError(f"--budget {text}: {why}; expected a positive number and one of B, KB, MB, GB, TB "
                     f"(powers of 10) or KiB, MiB, GiB, TiB (powers of 2), such as 16GB or 15GiB")


def gib(n: int) -> str:
    """'5.75 GiB'; a term that rounds to 0.00 GiB but is not zero also shows its MiB."""
    text = f"{n / 2**30:>8.2f} GiB"
    return text if n >= 0.005 * 2**30 or n == 0 else f"{text} ({n / 2**20:.1f} MiB)"


def add_plan_arguments(ap, prompt_tokens: int = 60):
    """What the planner needs beyond training's own flags (shared with tools/measure_peak.py)."""
    ap.add_argument("--prompt-tokens", type=positive(int), default=prompt_tokens,
                    help=f"tokens of a group's root prompt, the planner's estimate (default: {prompt_tokens})")
    ap.add_argument("--attention", default="auto", choices=ATTENTION,
                    help="attention kernel: auto (what PyTorch picks on --device), fused, math (default: auto)")


def build_parser():
    """Training's command line (minirl.config), so that a training command plans as it is, and the
    planner's own flags."""
    ap = train_parser()
    ap.prog, ap.description = "python -m minirl.plan", "\n\n".join(__doc__.split("\n\n")[:2])
    ap.add_argument("--shape", choices=sorted(SHAPES),
                    help="a built-in model shape instead of --model, with the paper's defaults")
    add_plan_arguments(ap)
    ap.add_argument("--budget", help="memory to fit in, with its unit: 16GB (10⁹ bytes) or 15GiB (2³⁰ bytes); "
                                     "a bare number is refused. Also prints the largest G that fits")
    return ap


def run_config(args) -> tuple[ModelConfig, TrainConfig]:
    """The model's shape and the settings `python -m minirl.train` would run with these flags: on --model
    (none: the tiny model) its config.json and its tuned settings, as training takes them."""
    if args.shape:
        if args.model or args.resume:
            raise InputError(f"--shape {args.shape}: give --shape or --model/--resume, not both")
        return ModelConfig(**SHAPES[args.shape]), config_from_args(args, {})
    cfg = resumed_config(args) if args.resume else config_from_args(args, tiny_defaults(args.model))
    return ModelConfig.from_json((tiny_model_path() if cfg.model is None else Path(cfg.model)) / "config.json"), cfg


def report(config: ModelConfig, cfg: TrainConfig, plan: Plan, prompt_tokens: int) -> str:
    c, layers = config, parse_layers(cfg.lora_layers, config.num_hidden_layers)
    span = f"{layers[0]}-{layers[-1]}" if len(layers) == layers[-1] - layers[0] + 1 else ",".join(map(str, layers))
    lines = [f"model: {c.num_hidden_layers} layers, hidden {c.hidden_size}, intermediate {c.intermediate_size}, "
             f"{c.num_attention_heads}/{c.num_key_value_heads} query/kv heads, vocab {c.vocab_size}: "
             f"{parameter_count(c) / 1e9:.3f} B parameters in {cfg.dtype}",
             f"run: {cfg.method}, G = {cfg.group_size}, {prompt_tokens} prompt + {cfg.max_new_tokens} new tokens, "
             f"LoRA r = {cfg.lora_rank} on {','.join(parse_targets(cfg.lora_targets))} of layers {span}, "
             f"{plan.attention} attention on {cfg.device}{', activation checkpointing' if cfg.checkpoint_layers else ''}"]
    B_gen = min(cfg.gen_batch or cfg.group_size, cfg.group_size)
    for name, phase, note in (("generation", plan.generation, f"{B_gen} sequences per generate call"),
                              ("update", plan.update, f"{sequences_per_forward(cfg)} sequences per forward")):
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
    def run(args):
        budget = parse_size(args.budget) if args.budget is not None else None
        config, cfg = run_config(args)
        options = dict(prompt_tokens=args.prompt_tokens, attention=args.attention)
        print(report(config, cfg, plan_memory(config, cfg, **options), args.prompt_tokens))
        if budget is not None:
            G = largest_group(config, cfg, budget, **options)
            fits = {0: "not even G = 1 fits", MAX_GROUP: f"every G up to {MAX_GROUP} fits (no term grows with G here)"}
            print(f"budget {gib(budget).strip()}: {fits.get(G, f'the largest group that fits is G = {G}')}")

    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
