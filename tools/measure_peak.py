"""Measure the peak memory of one training step on the CPU and set it beside minirl.plan's prediction.

    python tools/measure_peak.py --hidden 384 --intermediate 1024 --layers 6 --heads 6 --kv-heads 2 \
        --vocab 16000 --method tspmo --group-size 16 --prompt-tokens 32 --max-new-tokens 96 --lora-layers last-half

It takes minirl.train's flags (resolved as training resolves them for a model folder: the paper's
defaults where no flag is given) and the planner's --prompt-tokens and --attention, plus the shape of
a random Qwen2. The step is the one minirl.plan models: LoRA (minirl.lora), G completions sampled with
minirl.generate (no EOS, so every one is max_new_tokens long), then the update in batches of
--train-batch completions and the AdamW step:
- GRPO and S-GRPO through minirl.rl.grpo.accumulate_gradients itself, KL reference forward included;
  S-GRPO's subsets T_i are the last max(α, k) tokens of each completion, the plan's worst case (the
  forward runs up to the last kept token);
- T-SPMO with minirl.logprobs.selected_logprobs on as many (row, token) pairs per forward as the plan
  assumes, the last token of every sequence among them: its picks follow the prefix tree, and a
  random model's tree branches at the first token, which would measure a forward cut short.
Rewards and advantages are made up: the memory of a step does not depend on them.

How the peak is read. The resident set (RSS) of this process counts more than tensors: the
interpreter, the libraries' code pages (touched on first use of each kernel), their workspaces,
glibc's heap. So:
1. glibc is told (tools/_measure.py, set by re-executing this script) to map every block over 64 KiB
   by itself and to unmap it on free: an allocator cache the plan cannot know stays out.
   PyTorch's CPU allocator caches nothing of its own.
2. The KV cache is written whole when allocated: the plan counts an allocation as a GPU does, whole,
   while on the CPU an untouched page of torch.empty is not resident.
3. A tiny model of the same kind runs a whole step first, so that the libraries' lazy start-up is in
   the baseline. Then the measured model's step runs twice. What its first step leaves resident
   besides the model (a few MiB: first-use code pages, oneDNN and OpenMP workspaces, small-block
   heap) is reported and then counted in the baseline of the second; the figures compared with the
   plan are the second step's.
4. The kernel's high-water mark (VmHWM) is reset before each phase and read after it: the peak of a
   phase is VmHWM − baseline.
The AdamW moments exist before the first generation (one step with zero gradients), as they do from
the second training step on. The log-probs take their PyTorch path, the one the plan bounds on a
CPU, even where TRITON_INTERPRET=1 is inherited (as from the test suite): it is dropped on re-exec.
"""

import contextlib
import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

from _measure import MALLOC_ENV, proc_bytes, reset_peak

if __name__ == "__main__" and (any(os.environ.get(k) != v for k, v in MALLOC_ENV.items())
                               or "TRITON_INTERPRET" in os.environ):
    os.environ.update(MALLOC_ENV)
    os.environ.pop("TRITON_INTERPRET", None)
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minirl.config import config_from_args  # noqa: E402
from minirl.config import build_parser as train_parser  # noqa: E402
from minirl.generate import generate, kept_reordered_bytes  # noqa: E402
from minirl.logprobs import selected_logprobs  # noqa: E402
from minirl.lora import add_lora, lora_parameters  # noqa: E402
from minirl.model import Decoder, init_weights  # noqa: E402
from minirl.model_config import ModelConfig  # noqa: E402
from minirl.plan import (DTYPE_BYTES, add_plan_arguments, plan_memory, resolve_attention,  # noqa: E402
                         rows_per_forward, sequences_per_forward)
from minirl.rl import grpo  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_rows(n_rows: int, root: int, completions: list[list[int]]) -> list[tuple[int, int]]:
    """n_rows (row, position) pairs over the completion tokens of the chunk: the last token of each row
    first (selected_logprobs cuts a sequence after its last pick; the plan's worst case is no cut),
    the rest spread evenly."""
    last = [(r, root + len(c) - 1) for r, c in enumerate(completions)]
    others = [(r, root + t) for r, c in enumerate(completions) for t in range(len(c) - 1)]
    n_others = max(0, n_rows - len(last))
    step = len(others) / max(n_others, 1)
    return last[:n_rows] + [others[int(i * step)] for i in range(n_others)]


def update(model, root, completions, cfg, generator):
    """The update's forwards and backwards, as the module docstring says (no optimizer step)."""
    G = len(completions)
    if cfg.method != "tspmo":
        n_kept = max(cfg.sgrpo_alpha, cfg.sgrpo_k)
        keep = None if cfg.method == "grpo" else [list(range(max(0, len(c) - n_kept), len(c))) for c in completions]
        rewards = [float(i % 2) for i in range(G)]  # every completion has A_i ≠ 0
        grpo.accumulate_gradients(model, root, completions, rewards, beta=cfg.beta, temperature=1.0,
                                  train_batch=cfg.train_batch, keep=keep)
        return
    B = sequences_per_forward(cfg)
    for a in range(0, G, B):
        part = completions[a:a + B]
        picks = pick_rows(rows_per_forward(cfg, len(part)), len(root), part)
        logp = selected_logprobs(model, [root + c for c in part], picks, 1.0)  # (N,)
        advantages = torch.randn(len(picks), generator=generator)
        (-(torch.exp(logp) * advantages).sum()).backward()


def training_step(model, optimizer, cfg, prompt_tokens: int, generator) -> dict:
    """One step as the plan models it; returns the peak (VmHWM) of each phase."""
    V, G = model.config.vocab_size, cfg.group_size
    root = torch.randint(0, V, (prompt_tokens,), generator=generator).tolist()
    gc.collect()
    reset_peak()
    chunk = min(cfg.gen_batch or G, G)
    completions = []
    for a in range(0, G, chunk):
        completions += generate(model, [root] * min(chunk, G - a), cfg.max_new_tokens, temperature=1.0,
                                eos_token_id=None, generator=generator)
    peaks = {"generation": proc_bytes("VmHWM")}
    gc.collect()
    reset_peak()
    update(model, root, completions, cfg, generator)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    peaks["update"] = proc_bytes("VmHWM")
    return peaks


def build(config: ModelConfig, cfg, seed: int):
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[cfg.dtype])  # built in the base dtype: no fp32 copy on the way
    try:
        model = init_weights(Decoder(config), generator=torch.Generator().manual_seed(seed)).eval()
    finally:
        torch.set_default_dtype(default)
    add_lora(model, targets=cfg.lora_targets, layers=cfg.lora_layers, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
             generator=torch.Generator().manual_seed(seed))
    model.checkpoint_layers = cfg.checkpoint_layers  # what train.py --checkpoint-layers sets
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    for p in params:  # creates both moments, as every step after the first finds them
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def touched_cache(new_cache):
    """model.new_cache, with every page written: an allocation on a GPU counts whole at once, while on
    the CPU a page of torch.empty counts only once something is written to it."""
    def wrapper(*args, **kwargs):
        cache = new_cache(*args, **kwargs)
        for k, v in cache:
            k.zero_()
            v.zero_()
        return cache
    return wrapper


def attention_kernel(config, cfg, attention: str):
    """The attention the plan assumes: PyTorch's own choice, or the math path forced (as CUDA runs fp32
    with grouped-query heads), which the CPU would not pick by itself."""
    if resolve_attention(config, cfg, attention) == "math":
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def measure(config: ModelConfig, cfg, prompt_tokens: int = 60, attention: str = "auto", seed: int = 0) -> dict:
    """Peak bytes of each phase above the baseline, for a cold first step and a warm second one."""
    torch.manual_seed(seed)
    # A whole step of a tiny model of the same kind first: the libraries' lazy start-up (about 150 MiB
    # of code pages and thread pools where this was written) belongs in the baseline, not in the model.
    tiny = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=config.num_hidden_layers,
                       num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=config.max_position_embeddings)
    small = dataclasses.replace(cfg, group_size=2, max_new_tokens=4, gen_batch=0)
    model, optimizer = build(tiny, small, seed)
    training_step(model, optimizer, small, 4, torch.Generator().manual_seed(seed))
    del model, optimizer
    gc.collect()
    start = proc_bytes("VmRSS")
    model, optimizer = build(config, cfg, seed)
    model.new_cache = touched_cache(model.new_cache)
    gc.collect()
    built = proc_bytes("VmRSS") - start
    generator = torch.Generator().manual_seed(seed)
    with attention_kernel(config, cfg, attention):
        cold = training_step(model, optimizer, cfg, prompt_tokens, generator)
    gc.collect()
    # What the first step left resident besides the model: code pages of kernels used for the first
    # time, library workspaces, glibc's small-block heap. Not tensors, so not in the plan: it moves
    # into the baseline of the second step, and is reported on its own.
    # The reordered weights a CPU decode keeps (generate.packed_weight) are tensors the plan counts, not libraries'.
    libraries = proc_bytes("VmRSS") - start - built - kept_reordered_bytes()
    baseline = start + libraries
    with attention_kernel(config, cfg, attention):
        warm = training_step(model, optimizer, cfg, prompt_tokens, generator)
    return {"baseline_rss": start, "built": built, "first_step_residue": libraries,
            "cold_generation": cold["generation"] - start, "cold_update": cold["update"] - start,
            "generation": warm["generation"] - baseline, "update": warm["update"] - baseline,
            "peak": max(warm.values()) - baseline}


def main(argv=None):
    ap = train_parser()
    ap.prog = "python tools/measure_peak.py"
    ap.description = (__doc__.split("\n\n")[0] + "\n\nDefaults here, for a step that takes seconds: --group-size 16 "
                      "--max-new-tokens 96 --lora-layers last-half; the rest as minirl.train's (shown below).")
    add_plan_arguments(ap, prompt_tokens=32)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--untied", action="store_true", help="a separate lm_head (default: tied, as Qwen2-1.5B)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.set_defaults(group_size=16, max_new_tokens=96, lora_layers="last-half")
    args = ap.parse_args(argv)
    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=not args.untied)
    cfg = config_from_args(args, {})  # a model folder's defaults: the paper's
    plan = plan_memory(config, cfg, args.prompt_tokens, args.attention)
    measured = measure(config, cfg, args.prompt_tokens, args.attention, cfg.seed)
    predicted = {"built": plan.generation.held["weights"] + plan.generation.held["LoRA A, B and AdamW moments"],
                 "generation": plan.generation.total, "update": plan.update.total, "peak": plan.peak}
    if args.json:
        print(json.dumps({"measured": measured, "predicted": predicted, "plan": dataclasses.asdict(plan),
                          "dtype_bytes": DTYPE_BYTES[cfg.dtype]}))
        return
    print(f"RSS before the model: {measured['baseline_rss'] / 2**20:.0f} MiB; left resident by the first step "
          f"besides tensors: {measured['first_step_residue'] / 2**20:.1f} MiB (in the baseline below); first step "
          f"peaks: generation {measured['cold_generation'] / 2**20:.1f} MiB, "
          f"update {measured['cold_update'] / 2**20:.1f} MiB")
    print(f"{'':<12}{'predicted':>14}{'measured':>14}{'ratio':>8}")
    for key in ("built", "generation", "update", "peak"):
        p, m = predicted[key], measured[key]
        print(f"{key:<12}{p / 2**20:>10.1f} MiB{m / 2**20:>10.1f} MiB{p / m:>8.3f}")


if __name__ == "__main__":
    main()
