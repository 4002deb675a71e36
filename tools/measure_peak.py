"""Measure the peak memory of one training step on the CPU and set it beside minirl.plan's prediction.

    python tools/measure_peak.py --hidden 384 --intermediate 1024 --layers 6 --heads 6 --kv-heads 2 \
        --vocab 16000 --method tspmo --group-size 16 --prompt-tokens 32 --max-new-tokens 96 --lora-layers last-half

The step is the one minirl.plan models: a random Qwen2 of the given shape with LoRA (minirl.lora),
G completions sampled with minirl.generate (no EOS, so every one is max_new_tokens long), then the
training forward and backward in chunks of train_batch sequences, each reading, with
minirl.logprobs.selected_logprobs on its PyTorch path, the log-probs of as many (row, token) pairs as
the plan assumes, the last token of every sequence among them (the plan's worst case: no sequence is
cut short), GRPO's KL reference forward included; then the AdamW step. Advantages are random: the
memory of a step does not depend on them.

How the peak is read. The resident set (RSS) of this process counts more than tensors: the
interpreter, the libraries' code pages (touched on first use of each kernel), their workspaces,
glibc's heap. So:
1. glibc is told (MALLOC_MMAP_THRESHOLD_, set by re-executing this script) to map every block over
   64 KiB by itself and to unmap it on free. Without that, freed tensors stay in glibc's arenas and
   the RSS of a phase depends on what earlier phases freed: an allocator cache the plan cannot know.
   PyTorch's CPU allocator caches nothing of its own.
2. The KV cache is written whole when allocated: the plan counts an allocation as a GPU does, whole,
   while on the CPU an untouched page of torch.empty is not resident.
3. A tiny model of the same kind runs a whole step first, so that the libraries' lazy start-up is in
   the baseline. Then the measured model's step runs twice. What its first step leaves resident
   besides the model (a few MiB: first-use code pages, oneDNN and OpenMP workspaces, small-block
   heap) is reported and then counted in the baseline of the second; the figures compared with the
   plan are the second step's.
4. The kernel's high-water mark (VmHWM) is reset before each phase (/proc/self/clear_refs, "5") and
   read after it: the peak of a phase is VmHWM − baseline.
The AdamW moments exist before the first generation (one step with zero gradients), as they do from
the second training step on.
"""

import argparse
import contextlib
import gc
import json
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

# glibc reads MALLOC_MMAP_THRESHOLD_ once, at start-up; the log-probs take their PyTorch path (the one
# the plan bounds) even where TRITON_INTERPRET=1 is inherited, as from the test suite.
ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536", "MINIRL_LOGPROBS": "torch"}
if __name__ == "__main__" and any(os.environ.get(k) != v for k, v in ENVIRONMENT.items()):
    os.environ.update(ENVIRONMENT)
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minirl.generate import generate  # noqa: E402
from minirl.logprobs import selected_logprobs  # noqa: E402
from minirl.lora import add_lora, disable_adapters, lora_parameters, parse_layers  # noqa: E402
from minirl.model import Decoder, ModelConfig, init_weights  # noqa: E402
from minirl.plan import (DTYPE_BYTES, add_settings_arguments, plan_memory,  # noqa: E402
                         resolve_attention, root_tokens, rows_per_forward, sequences_per_forward,
                         settings_from_args)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM ← VmRSS (Linux ≥ 4.0)


def pick_rows(n_rows: int, root: int, completions: list[list[int]]) -> list[tuple[int, int]]:
    """n_rows (row, position) pairs over the completion tokens of the chunk: the last token of each row
    first (selected_logprobs cuts a sequence after its last pick; the plan's worst case is no cut),
    the rest spread evenly."""
    last = [(r, root + len(c) - 1) for r, c in enumerate(completions)]
    others = [(r, root + t) for r, c in enumerate(completions) for t in range(len(c) - 1)]
    n_others = max(0, n_rows - len(last))
    step = len(others) / max(n_others, 1)
    return last[:n_rows] + [others[int(i * step)] for i in range(n_others)]


def training_step(model, optimizer, settings, generator) -> dict:
    """One step as the plan models it; returns the peak (VmHWM) of each phase."""
    V, G = model.config.vocab_size, settings.group_size
    root = torch.randint(0, V, (root_tokens(settings),), generator=generator).tolist()
    gc.collect()
    reset_peak()
    chunk = min(settings.gen_batch or G, G)
    completions = []
    for a in range(0, G, chunk):
        completions += generate(model, [root] * min(chunk, G - a), settings.max_new_tokens, temperature=1.0,
                                eos_token_id=None, generator=generator)
    peaks = {"generation": status("VmHWM")}

    gc.collect()
    reset_peak()
    B = sequences_per_forward(settings)
    for a in range(0, G, B):
        part = completions[a:a + B]
        sequences = [root + c for c in part]
        picks = pick_rows(rows_per_forward(settings, len(part)), len(root), part)
        advantages = torch.randn(len(picks), generator=generator)
        logp = selected_logprobs(model, sequences, picks, 1.0)  # (N,)
        if settings.method == "tspmo":
            loss = -(torch.exp(logp) * advantages).sum()
        else:
            with torch.no_grad(), disable_adapters(model):
                ref = selected_logprobs(model, sequences, picks, 1.0)  # GRPO's KL reference, adapters off
            delta = ref - logp
            loss = (-advantages * logp + 0.01 * (torch.exp(delta) - delta - 1)).mean()
        loss.backward()
        del logp, loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    peaks["update"] = status("VmHWM")
    return peaks


def build(config: ModelConfig, settings, seed: int):
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[settings.dtype])  # built in the base dtype: no fp32 copy on the way
    try:
        model = init_weights(Decoder(config), generator=torch.Generator().manual_seed(seed)).eval()
    finally:
        torch.set_default_dtype(default)
    layers = parse_layers(settings.lora_layers, config.num_hidden_layers)
    add_lora(model, targets=settings.lora_targets, layers=layers, rank=settings.lora_rank,
             alpha=2.0 * settings.lora_rank, generator=torch.Generator().manual_seed(seed))
    model.checkpoint_layers = settings.checkpoint_layers  # what train.py --checkpoint-layers sets
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


def attention_kernel(config, settings):
    """The attention the plan assumes: PyTorch's own choice, or the math path forced (as CUDA runs fp32
    with grouped-query heads), which the CPU would not pick by itself."""
    if resolve_attention(config, settings) == "math":
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def measure(config: ModelConfig, settings, seed: int = 0) -> dict:
    """Peak bytes of each phase above the baseline, for a cold first step and a warm second one."""
    torch.manual_seed(seed)
    # A whole step of a tiny model of the same kind first: the libraries' lazy start-up (about 150 MiB
    # of code pages and thread pools where this was written) belongs in the baseline, not in the model.
    tiny = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=config.num_hidden_layers,
                       num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=config.max_position_embeddings)
    small = replace(settings, group_size=2, max_new_tokens=4, prompt_tokens=4, gen_batch=0, train_batch=0)
    model, optimizer = build(tiny, small, seed)
    training_step(model, optimizer, small, torch.Generator().manual_seed(seed))
    del model, optimizer
    gc.collect()
    start = status("VmRSS")
    model, optimizer = build(config, settings, seed)
    model.new_cache = touched_cache(model.new_cache)
    gc.collect()
    built = status("VmRSS") - start
    generator = torch.Generator().manual_seed(seed)
    with attention_kernel(config, settings):
        cold = training_step(model, optimizer, settings, generator)
    gc.collect()
    # What the first step left resident besides the model: code pages of kernels used for the first
    # time, library workspaces, glibc's small-block heap. Not tensors, so not in the plan: it moves
    # into the baseline of the second step, and is reported on its own.
    libraries = status("VmRSS") - start - built
    baseline = start + libraries
    with attention_kernel(config, settings):
        warm = training_step(model, optimizer, settings, generator)
    return {"baseline_rss": start, "built": built, "first_step_residue": libraries,
            "cold_generation": cold["generation"] - start, "cold_update": cold["update"] - start,
            "generation": warm["generation"] - baseline, "update": warm["update"] - baseline,
            "peak": max(warm.values()) - baseline}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--untied", action="store_true", help="a separate lm_head (default: tied, as Qwen2-1.5B)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_settings_arguments(ap)
    ap.set_defaults(group_size=16, max_new_tokens=96, prompt_tokens=32, lora_layers="last-half", device="cpu")
    args = ap.parse_args(argv)
    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=not args.untied)
    settings = settings_from_args(args)
    plan = plan_memory(config, settings)
    measured = measure(config, settings, args.seed)
    predicted = {"built": plan.generation.held["weights"] + plan.generation.held["LoRA A, B and AdamW moments"],
                 "generation": plan.generation.total, "update": plan.update.total, "peak": plan.peak}
    if args.json:
        print(json.dumps({"measured": measured, "predicted": predicted, "plan": plan.as_dict(),
                          "dtype_bytes": DTYPE_BYTES[settings.dtype]}))
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
