"""One training step of each method, minirl against a straightforward transformers + peft implementation.

The same random Qwen2 (minirl.save_pretrained, then loaded by minirl and by transformers'
Qwen2ForCausalLM), LoRA rank 8 on q_proj and v_proj of the last quarter of the layers (minirl.lora /
peft.LoraConfig), the same group of G completions, the same losses (DESIGN.md, "The math"):

    minirl-grpo, -sgrpo   minirl.rl.grpo.accumulate_gradients (every token / the same S-GRPO subsets T_i),
                          completions in batches of --train-batch
    minirl-tspmo          minirl.rl.tspmo.accumulate_gradients, completions in batches of --train-batch
    minirl-tspmo-packed   the same with tree_pack: the whole prefix tree in one sequence (minirl/tree_pack.py)
    hf-grpo, -sgrpo       per completion: logits = model(P + c_i).logits, log_softmax, gather, KL to the
                          adapter-free model, backward
    hf-tspmo              batches of --train-batch full sequences: logits, log_softmax, gather every pair
                          of U, loss −(1/|U|) Σ π·A, backward (λ: train.make_optimizer's weight decay, both sides)

A step is the forward, the backward and the AdamW step. Each variant runs in a fresh process after a
warm-up step on two completions (lazy start-up and the AdamW moments stay out of the peak). Printed:
step time (median of --repeats), peak memory above the process's state after that warm-up, and tokens
through the model (input positions of every forward, padding and GRPO's reference forward included; a
forward over part of the layers, as minirl's reference, counts that share of them), each also as a
ratio to the transformers + peft implementation of the same method. Peak memory: on CUDA
torch.cuda.max_memory_allocated; on the CPU the peak resident set (VmHWM, reset through
/proc/self/clear_refs), with glibc told to unmap freed blocks so the resident set follows the tensors
(tools/_measure.py).

The group. A random model samples no realistic tree, so the step uses synthetic completions whose
shape follows sampling at a low temperature: completion i copies an earlier one up to a uniformly
drawn point, then goes on with fresh random tokens (rewards Bernoulli(0.3)). The packed-tokens figure
is also measured where it is defined, on real samples: the built-in tiny model, 2-digit
multiplication, G = 50, τ = 0.3, plain prompts (--tiny-problems of them; 0 skips it).

    OMP_NUM_THREADS=1 python tools/bench_step.py                  # CPU, small shape
    python tools/bench_step.py --shape qwen2-1.5b --device cuda   # GPU, Qwen2-1.5B's shape, bf16
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _measure import MALLOC_ENV, proc_bytes, reset_peak  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minirl.pretrained import load_pretrained, save_pretrained  # noqa: E402
from minirl.lora import add_lora, lora_parameters, parse_layers  # noqa: E402
from minirl.model import Decoder, init_weights  # noqa: E402
from minirl.model_config import ModelConfig  # noqa: E402
from minirl.prefix_tree import tspmo_pairs  # noqa: E402
from minirl.rl import grpo, tspmo  # noqa: E402
from minirl.rl.sgrpo import sample_token_subset  # noqa: E402
from minirl.tiny import char_tokenizer  # noqa: E402
from minirl.train import TrainConfig, make_optimizer  # noqa: E402

SHAPES = {
    "small": dict(vocab_size=16384, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0),
    "qwen2-1.5b": dict(max_position_embeddings=32768),  # ModelConfig's defaults are Qwen2-1.5B's shape
}
VARIANTS = ("minirl-grpo", "hf-grpo", "minirl-sgrpo", "hf-sgrpo", "minirl-tspmo", "minirl-tspmo-packed", "hf-tspmo")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RANK, ALPHA = 8, 16.0
BETA = 0.01  # the paper's β


def synthetic_group(G, prompt_tokens, new_tokens, vocab, seed=0):
    """(prompt, completions, rewards): each completion shares a random-length prefix with an earlier one."""
    rng = random.Random(seed)
    token = lambda: rng.randrange(vocab)  # noqa: E731
    prompt = [token() for _ in range(prompt_tokens)]
    completions = []
    for _ in range(G):
        length = rng.randint(3 * new_tokens // 4, new_tokens)
        stem = rng.choice(completions)[:rng.randint(0, length)] if completions else []
        completions.append(stem + [token() for _ in range(length - len(stem))])
    rewards = [float(rng.random() < 0.3) for _ in range(G)]
    rewards[0], rewards[1] = 1.0, 0.0  # the group must carry signal
    return prompt, completions, rewards


# ----------------------------------------------------------------------------- the straightforward reference


def hf_logprobs(model, sequences, tau):
    """log π(s[t] | s[:t]) for t ≥ 1 of right-padded sequences, from the full logits: (B, T − 1)."""
    T = max(map(len, sequences))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in sequences], device=model.device)  # (B, T)
    attention = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in sequences], device=model.device)
    logits = model(input_ids=ids, attention_mask=attention).logits.float() / tau  # (B, T, V)
    return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T − 1)


def hf_grpo(model, prompt, completions, rewards, tau, keep=None):
    A, L, G = grpo.group_advantages(rewards), len(prompt), len(completions)
    for i, c in enumerate(completions):
        tokens = torch.tensor(keep[i] if keep else range(len(c)), dtype=torch.long, device=model.device) + L - 1
        logp = hf_logprobs(model, [prompt + c], tau)[0, tokens]
        with torch.no_grad(), model.disable_adapter():
            ref = hf_logprobs(model, [prompt + c], tau)[0, tokens]
        delta = ref - logp
        ((-float(A[i]) * logp + BETA * (delta.exp() - delta - 1)).mean() / G).backward()


def hf_tspmo(model, prompt, completions, rewards, tau, train_batch):
    pairs, L = tspmo_pairs(completions, rewards), len(prompt)
    for start in range(0, len(completions), train_batch):
        batch = range(start, min(start + train_batch, len(completions)))
        mine = [p for p in pairs if p.completion in batch]
        if not mine:
            continue
        logp = hf_logprobs(model, [prompt + completions[i] for i in batch], tau)  # (B, T − 1)
        logp = logp[[p.completion - start for p in mine], [L - 1 + p.position for p in mine]]  # (n,)
        A = torch.tensor([p.advantage for p in mine], device=logp.device)
        (-(logp.exp() * A).sum() / len(pairs)).backward()


# ----------------------------------------------------------------------------- one variant, in its own process


def load_variant(variant, folder, dtype, device):
    """(model, LoRA parameters, token counter): the counter holds the input positions of every forward,
    those of a forward over part of the layers (GRPO's KL reference, logprobs.py) in proportion."""
    counter = [0]
    if variant.startswith("hf-"):
        from peft import LoraConfig, get_peft_model
        from transformers import Qwen2ForCausalLM

        model = Qwen2ForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
        n = model.config.num_hidden_layers
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                                 layers_to_transform=parse_layers("last-quarter", n)))  # as minirl
        model.get_base_model().model.register_forward_pre_hook(
            lambda _, args, kwargs: counter.__setitem__(0, counter[0] + kwargs["input_ids"].numel()), with_kwargs=True)
        return model, [p for p in model.parameters() if p.requires_grad], counter
    model, _ = load_pretrained(folder, dtype=dtype, device=device)
    add_lora(model, layers="last-quarter", rank=RANK, alpha=ALPHA)
    hidden_states, L = model.hidden_states, model.config.num_hidden_layers

    def counted(input_ids, *args, start=None, stop=None, **kwargs):  # a forward over some layers: their share
        layers = (L if stop is None else stop) - (0 if start is None else start[0])
        counter[0] += input_ids.numel() * layers / L
        return hidden_states(input_ids, *args, start=start, stop=stop, **kwargs)

    model.hidden_states = counted
    return model, lora_parameters(model), counter


def step_fn(variant, model, tau, train_batch):
    method = variant.split("-")[1]
    if variant.startswith("hf-"):
        return {"grpo": lambda P, C, R, keep: hf_grpo(model, P, C, R, tau),
                "sgrpo": lambda P, C, R, keep: hf_grpo(model, P, C, R, tau, keep),
                "tspmo": lambda P, C, R, keep: hf_tspmo(model, P, C, R, tau, train_batch)}[method]
    if method == "tspmo":
        return lambda P, C, R, keep: tspmo.accumulate_gradients(model, P, C, R, temperature=tau,
                                                                train_batch=train_batch,
                                                                tree_pack=variant.endswith("packed"))
    return lambda P, C, R, keep: grpo.accumulate_gradients(model, P, C, R, beta=BETA, temperature=tau,
                                                           train_batch=train_batch,
                                                           keep=keep if method == "sgrpo" else None)


def run_variant(variant, folder, group, args):
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model, params, counter = load_variant(variant, folder, dtype, device)
    # minirl's own AdamW for this method on both sides: T-SPMO's λ (the paper's 0.01) as its weight decay
    optimizer = make_optimizer(TrainConfig(method=variant.split("-")[1], lr=1e-4), params)
    step = step_fn(variant, model, args.temperature, args.train_batch)
    P, C, R, keep = group["prompt"], group["completions"], group["rewards"], group["keep"]

    def one(completions, rewards, keep):
        step(P, completions, rewards, keep)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    one(C[:2], [1.0, 0.0], keep[:2])  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = proc_bytes("VmRSS")
        reset_peak()
    counter[0], t0 = 0, time.perf_counter()
    one(C, R, keep)
    times, tokens = [time.perf_counter() - t0], counter[0]
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else proc_bytes("VmHWM")) - base
    for _ in range(args.repeats - 1):
        t0 = time.perf_counter()
        one(C, R, keep)
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "peak_bytes": peak, "tokens": tokens}


def in_fresh_process(variant, folder, group_file, args):
    cmd = [sys.executable, __file__, "--worker", variant, folder, group_file, "--device", args.device,
           "--dtype", args.dtype, "--temperature", str(args.temperature), "--train-batch", str(args.train_batch),
           "--repeats", str(args.repeats)]
    env = {**os.environ, **MALLOC_ENV}
    if args.device == "cpu":
        env.pop("TRITON_INTERPRET", None)  # the log-prob path a CPU takes, even under an inherited TRITON_INTERPRET
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- real groups: the tiny model


def tiny_packed_tokens(n_problems, G, tau, seed=0):
    """(packed, unpacked) tokens through the model of T-SPMO updates on groups the tiny model samples."""
    from minirl.generate import generate
    from minirl.tasks import load_task, reward
    from minirl.tiny import tiny_model_path
    from minirl.tokenizer import format_prompt

    recipe = json.loads((tiny_model_path() / "recipe.json").read_text())
    model, tokenizer = load_pretrained(tiny_model_path())
    add_lora(model, layers="last-quarter", rank=RANK, alpha=ALPHA)
    counter, hidden_states = [0], model.hidden_states
    model.hidden_states = lambda ids, *a, **k: counter.__setitem__(0, counter[0] + ids.numel()) or hidden_states(ids, *a, **k)
    generator = torch.Generator().manual_seed(seed)
    totals = {True: 0, False: 0}
    for problem in load_task("multiplication", "train", digits=recipe["digits"], seed=seed)[:n_problems]:
        prompt = tokenizer.encode(format_prompt(problem.question, "plain"))
        completions = generate(model, [prompt] * G, recipe["train_defaults"]["max_new_tokens"], tau,
                               tokenizer.eos_token_id, generator)
        rewards = [reward(tokenizer.decode(c), problem.answer) for c in completions]
        for pack in (False, True):
            counter[0] = 0
            tspmo.accumulate_gradients(model, prompt, completions, rewards, temperature=tau, tree_pack=pack)
            totals[pack] += counter[0]
            model.zero_grad(set_to_none=True)
    return totals[True], totals[False]


# ----------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on the CPU, bf16 on CUDA")
    ap.add_argument("--group-size", type=int, default=50)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=40, help="synthetic completions: 3/4 of this to this long")
    ap.add_argument("--temperature", type=float, default=0.3)
    ap.add_argument("--train-batch", type=int, default=8,
                    help="completions per forward: minirl's every method, and hf-tspmo (hf-grpo goes one at a time)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per variant (median reported)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--tiny-problems", type=int, default=20, help="tiny-model groups for the packed-tokens figure")
    ap.add_argument("--worker", nargs=3, metavar=("VARIANT", "FOLDER", "GROUP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.worker:
        variant, folder, group_file = args.worker
        print(json.dumps(run_variant(variant, folder, json.loads(Path(group_file).read_text()), args)))
        return

    config = ModelConfig(**SHAPES[args.shape])
    prompt, completions, rewards = synthetic_group(args.group_size, args.prompt_tokens, args.max_new_tokens, config.vocab_size)
    g = torch.Generator().manual_seed(0)
    keep = [sample_token_subset(len(c), 8, 32, 0.5, g) for c in completions]  # S-GRPO's α, k, P defaults
    shared = len(tspmo_pairs(completions, rewards))
    print(f"shape {args.shape} (D {config.hidden_size}, {config.num_hidden_layers} layers, V {config.vocab_size}), "
          f"{args.device} {args.dtype}, {torch.get_num_threads()} thread(s); LoRA r{RANK} q_proj,v_proj last quarter")
    print(f"group: G {len(completions)}, prompt {len(prompt)}, {sum(map(len, completions))} completion tokens, "
          f"{shared} unique (prefix, token) pairs, {sum(rewards):.0f} successes")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = init_weights(Decoder(config), generator=torch.Generator().manual_seed(0)).to(DTYPES[args.dtype])
        save_pretrained(model, char_tokenizer(), tmp)  # load_pretrained wants a tokenizer; the ids are synthetic
        del model
        group_file = str(Path(tmp) / "group.json")
        Path(group_file).write_text(json.dumps({"prompt": prompt, "completions": completions, "rewards": rewards, "keep": keep}))
        for variant in args.variants:
            results[variant] = in_fresh_process(variant, tmp, group_file, args)
            r = results[variant]
            print(f"  {variant:<20} {r['seconds']:8.3f} s  {r['peak_bytes'] / 2**20:9.1f} MiB  {r['tokens']:7.0f} tokens", flush=True)

    print(f"\n{'variant':<20} {'step s':>8} {'peak MiB':>9} {'tokens':>7}   ratios to hf-<method>: time, memory, tokens")
    for variant, r in results.items():
        ref = results.get("hf-" + variant.split("-")[1])
        ratios = (f"{r['seconds'] / ref['seconds']:5.2f} {r['peak_bytes'] / ref['peak_bytes']:6.3f} "
                  f"{r['tokens'] / ref['tokens']:5.2f}") if ref and ref is not r else ""
        print(f"{variant:<20} {r['seconds']:8.3f} {r['peak_bytes'] / 2**20:9.1f} {r['tokens']:7.0f}   {ratios}")
    ours, packed, hf = results.get("minirl-tspmo"), results.get("minirl-tspmo-packed"), results.get("hf-tspmo")
    if hf and ours:
        print(f"aim: T-SPMO peak memory ≤ 1/3 of transformers+peft's: {ours['peak_bytes'] / hf['peak_bytes']:.3f}")
    if ours and packed:
        print(f"packed / unpacked T-SPMO, synthetic group: time {packed['seconds'] / ours['seconds']:.2f}, "
              f"memory {packed['peak_bytes'] / ours['peak_bytes']:.2f}, tokens {packed['tokens'] / ours['tokens']:.3f}")
    if args.tiny_problems:
        p, u = tiny_packed_tokens(args.tiny_problems, args.group_size, args.temperature)
        print(f"aim: packed T-SPMO tokens ≤ 1/2 of unpacked on multiplication (tiny model, {args.tiny_problems} groups "
              f"of G {args.group_size}, τ {args.temperature}): {p} / {u} = {p / max(u, 1):.3f}")


if __name__ == "__main__":
    main()
