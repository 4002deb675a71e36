"""Build the built-in tiny model, minirl/data/tiny/: a small Qwen2 warm-started on multiplication.

Random init (minirl.model.init_weights), then a short supervised run on train problems: the prompt
"ab*cd=" (the question in the plain style), the product's digits, then EOS, with the loss on the
answer tokens and EOS only. A share of the answers (--habit-fraction) carry a habit the reward
punishes: a stray " 0" after the product, so "12*34=408 0" reads as the answer 0. Just over half
of them do, so greedy decoding nearly always writes the habit (a base accuracy just above zero) while
sampling often stops cleanly and is rewarded: the gap RL closes (minirl/tiny.py says why).
Then greedy accuracy on the held-out test split. Deterministic given --seed: the initial weights
and the batch order come from seeded generators.

    python tools/make_tiny_model.py                                # rebuild the shipped folder (~4 min)
    python tools/make_tiny_model.py --steps 20 --out /tmp/tiny     # a quick smoke build
    python tools/make_tiny_model.py --measure                      # what RL will see from the shipped model

The folder gets config.json, model.safetensors, tokenizer.json, generation_config.json and
recipe.json: every setting, the seed, the accuracy, the time taken, and the RL settings the default
`python -m minirl.train` run uses with this model (TRAIN_DEFAULTS below, key train_defaults).
"""

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from minirl import generate, load_pretrained, save_pretrained
from minirl.errors import InputError
from minirl.model import Decoder, init_weights
from minirl.model_config import ModelConfig
from minirl.tasks import multiplication, reward
from minirl.tiny import TINY_MODEL_DIR, char_tokenizer, tiny_model_path
from minirl.tokenizer import format_prompt

TARGET_BAND = (0.001, 0.05)  # greedy test accuracy the warm start aims for: low, above zero
HABIT = " 0"  # what a habit answer appends to the product

# Settings of `python -m minirl.train` with no --model (read through minirl.cli.tiny_defaults);
# explicit flags still win. max_new_tokens is added per build: the product, the habit, EOS, one spare.
# Tuned on seeds 0 and 1 (README, "The built-in tiny model"). λ = 0: chosen while T-SPMO's L2 term was in the
# loss, where Adam drove A to zero while B was still zero and the adapter died; λ is AdamW's weight decay now
# (rl/tspmo.py), and the README's tiny results stay those of λ = 0.
# S-GRPO's α = 2, k = 4: answers here are at most 8 tokens, and the paper-scale α = 8 would keep all of them
# (S-GRPO would be GRPO exactly).
TRAIN_DEFAULTS = {"prompt_style": "plain", "steps": 1000, "lr": 1e-3, "lam": 0.0, "sgrpo_alpha": 2, "sgrpo_k": 4,
                  "eval_every": 100, "eval_n": 1000}


@dataclass
class Recipe:
    seed: int = 0
    digits: int = 2  # factors 10^(d-1)+1 .. 10^d-1, as minirl.tasks.multiplication draws them
    # the model: 602,624 parameters, 2.4 MB in fp32
    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 128  # RoPE learns no positions: this only bounds prompt + answer length
    rope_theta: float = 10000.0
    # the supervised warm start: AdamW, linear warm-up, cosine decay to lr/10
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    # the habit RL has to unlearn: this share of warm-start answers ends in a stray " 0" after the
    # product ("4266 0"), which the reward reads as the answer 0 (README, "The built-in tiny model")
    habit_fraction: float = 0.54
    n_test: int = 0  # test problems in the recorded accuracy; 0: the whole test split


def max_new_tokens(digits: int) -> int:
    return 2 * digits + len(HABIT) + 2  # at most 2d product digits, the habit, EOS, one spare


def tiny_config(recipe: Recipe, vocab_size: int, eos_token_id: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
                       num_hidden_layers=recipe.num_hidden_layers, num_attention_heads=recipe.num_attention_heads,
                       num_key_value_heads=recipe.num_key_value_heads,
                       max_position_embeddings=recipe.max_position_embeddings, rope_theta=recipe.rope_theta,
                       tie_word_embeddings=True, torch_dtype="float32", eos_token_id=eos_token_id)


def encode_examples(tokenizer, problems, suffix: str = "") -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids (the question in the plain style) and answer ids (the product's digits, `suffix`, EOS)."""
    prompts = [tokenizer.encode(format_prompt(p.question, "plain")) for p in problems]
    answers = [tokenizer.encode(str(p.answer) + suffix) + [tokenizer.eos_token_id]
               for p in problems]
    return prompts, answers


def batch_tensors(prompts, answers, pad_id: int):
    """(input_ids, labels), both (B, T): prompt + answer, right-padded; labels −100 except under the answer.

    labels[b, t] is the token position t must predict (the next one), so the loss covers exactly the
    answer's digits and its EOS. Right padding is harmless under a causal mask: no real token sees it.
    """
    T = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(prompts), T), -100, dtype=torch.long)  # (B, T)
    for b, (p, a) in enumerate(zip(prompts, answers)):
        ids[b, :len(p) + len(a)] = torch.tensor(p + a)
        labels[b, len(p) - 1:len(p) + len(a) - 1] = torch.tensor(a)
    return ids, labels


def answer_loss(model, ids, labels):
    """−(1/N) Σ log π(a_t | prompt, a_<t) over the N answer tokens (digits and EOS) of the batch."""
    logits = model(ids)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def greedy_accuracy(model, tokenizer, problems, new_tokens: int, batch_size: int = 512) -> float:
    """Mean reward of the greedy (τ = 0) completions: the fraction whose last integer is the product."""
    model.eval()
    prompts, _ = encode_examples(tokenizer, problems)
    correct = 0.0
    for i in range(0, len(problems), batch_size):
        out = generate(model, prompts[i:i + batch_size], new_tokens, temperature=0.0, eos_token_id=tokenizer.eos_token_id)
        correct += sum(reward(tokenizer.decode(o), p.answer) for o, p in zip(out, problems[i:i + batch_size]))
    return correct / len(problems)


def lr_factor(step: int, recipe: Recipe) -> float:
    """Linear warm-up over warmup_steps, then cosine from 1 down to 0.1."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def build(recipe: Recipe, log=print):
    """Train the tiny model from random weights; returns (model, tokenizer, results)."""
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    tokenizer = char_tokenizer()
    model = Decoder(tiny_config(recipe, tokenizer.vocab_size, tokenizer.eos_token_id))
    init_weights(model, generator=torch.Generator().manual_seed(recipe.seed))
    train = multiplication("train", digits=recipe.digits, seed=recipe.seed)  # every pair outside the test split
    test = multiplication("test", n=recipe.n_test or None, digits=recipe.digits)
    prompts, answers = encode_examples(tokenizer, train)
    _, habit_answers = encode_examples(tokenizer, train, suffix=HABIT)

    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, recipe))
    g = torch.Generator().manual_seed(recipe.seed)  # the batch order
    model.train()
    for step in range(recipe.steps):
        pick = torch.randint(0, len(train), (recipe.batch_size,), generator=g).tolist()
        habit = (torch.rand(recipe.batch_size, generator=g) < recipe.habit_fraction).tolist()
        targets = [habit_answers[i] if h else answers[i] for i, h in zip(pick, habit)]
        ids, labels = batch_tensors([prompts[i] for i in pick], targets, tokenizer.eos_token_id)
        loss = answer_loss(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 250 == 0 or step == recipe.steps - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s")
    train_seconds = time.perf_counter() - start

    new_tokens = max_new_tokens(recipe.digits)
    accuracy = greedy_accuracy(model, tokenizer, test, new_tokens)
    # On as many train problems: the gap to the test accuracy is what the warm start memorised.
    train_accuracy = greedy_accuracy(model, tokenizer, train[:len(test)], new_tokens)
    results = dict(accuracy=accuracy, n_test=len(test), train_accuracy=train_accuracy, n_train_evaluated=len(test),
                   train_problems=len(train), final_loss=round(loss.item(), 4), max_new_tokens=new_tokens,
                   train_seconds=round(train_seconds, 1), parameters=sum(p.numel() for p in model.parameters()),
                   torch_threads=torch.get_num_threads(), torch_version=torch.__version__)
    log(f"greedy accuracy {accuracy:.3f} on {len(test)} test problems, {train_accuracy:.3f} on as many train "
        f"problems ({train_seconds:.0f}s of training)")
    if not TARGET_BAND[0] <= accuracy <= TARGET_BAND[1]:
        log(f"note: outside the target band {TARGET_BAND[0]:.2f}-{TARGET_BAND[1]:.2f}; change --steps")
    return model.eval(), tokenizer, results


def recipe_flags(recipe: Recipe) -> str:
    """The command that rebuilds this recipe: the flags that differ from the defaults."""
    default = Recipe()
    flags = [f"--{f.name.replace('_', '-')} {getattr(recipe, f.name)}" for f in fields(Recipe)
             if getattr(recipe, f.name) != getattr(default, f.name)]
    return " ".join(["python tools/make_tiny_model.py"] + flags)


def write_folder(model, tokenizer, recipe: Recipe, results: dict, out: Path):
    save_pretrained(model, tokenizer, out)
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; installed package data must be readable
    # transformers' generate reads this: stop at EOS, pad with it, and decode greedily as the accuracy was measured.
    generation = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.eos_token_id,
                  "max_new_tokens": results["max_new_tokens"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    record = {"task": "multiplication", "digits": recipe.digits,
              "train_defaults": {**TRAIN_DEFAULTS, "max_new_tokens": results["max_new_tokens"]},
              "target_band": list(TARGET_BAND), "recipe": asdict(recipe), "results": results,
              "rebuild": recipe_flags(recipe)}
    (out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")


def measure(folder: Path, n_problems: int = 200, samples: int = 16, group_size: int = 16, repeats: int = 20,
            seed: int = 0):
    """What an RL run on this model sees: greedy accuracy, reward when sampling at τ, time per step's parts."""
    model, tokenizer = load_pretrained(folder)
    digits = json.loads((folder / "recipe.json").read_text())["digits"]
    new_tokens = max_new_tokens(digits)
    test = multiplication("test", digits=digits)
    print(f"{folder}: {sum(p.numel() for p in model.parameters())} parameters, {torch.get_num_threads()} threads")
    print(f"greedy accuracy {greedy_accuracy(model, tokenizer, test, new_tokens):.3f} on {len(test)} test problems")
    problems = test[:n_problems]
    prompts, _ = encode_examples(tokenizer, problems)
    g = torch.Generator().manual_seed(seed)
    for tau in (0.3, 0.7, 1.0):
        out = generate(model, [p for p in prompts for _ in range(samples)], new_tokens, temperature=tau,
                       eos_token_id=tokenizer.eos_token_id, generator=g)
        r = torch.tensor([reward(tokenizer.decode(o), problems[i // samples].answer)
                          for i, o in enumerate(out)]).view(len(problems), samples)  # (N, samples)
        line = f"tau {tau}: mean reward {r.mean():.3f} over {len(problems)} problems x {samples} samples"
        for G in sorted({8, samples}):
            mixed = (r[:, :G].amax(1) != r[:, :G].amin(1)).float().mean()  # groups whose advantages are not all 0
            line += f"; groups of {G}: {mixed:.2f} with mixed rewards, pass@{G} {r[:, :G].amax(1).mean():.2f}"
        print(line)

    def median_seconds(fn):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    group = [prompts[0]] * group_size
    t_generate = median_seconds(lambda: generate(model, group, new_tokens, temperature=1.0, generator=g))  # no EOS: full length
    ids = torch.tensor([prompts[0] + c for c in generate(model, group, new_tokens, temperature=1.0, generator=g)])  # (G, T)
    model.train()

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(ids).log_softmax(-1).mean().backward()

    t_fb = median_seconds(forward_backward)
    print(f"generate {group_size} completions x {new_tokens} new tokens: {1000 * t_generate:.1f} ms; forward+backward "
          f"of {group_size} x {ids.shape[1]} tokens (all weights trainable): {1000 * t_fb:.1f} ms (medians of {repeats})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Recipe):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                        help=f"(default: {f.default})")
    ap.add_argument("--out", type=Path, default=TINY_MODEL_DIR, help="output folder (default: the shipped one)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default: 1; on two free cores 2 is ~1.5x faster, on busy ones much slower)")
    ap.add_argument("--measure", action="store_true",
                    help="build nothing: print what RL sees from the folder at --out (accuracy, reward when "
                         "sampling at tau 0.3/0.7/1.0, time per generate and per forward+backward)")
    args = ap.parse_args(argv)
    try:
        recipe = Recipe(**{f.name: getattr(args, f.name) for f in fields(Recipe)})
        for name in ("steps", "batch_size", "digits", "threads"):
            value = getattr(args, name)
            if value <= 0:
                raise InputError(f"--{name.replace('_', '-')} is {value}, expected a positive integer")
        if recipe.n_test < 0:
            raise InputError(f"--n-test is {recipe.n_test}, expected 0 (the whole test split) or a positive integer")
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            if args.measure:
                return measure(tiny_model_path(args.out))
            model, tokenizer, results = build(recipe)
            write_folder(model, tokenizer, recipe, results, args.out)
        finally:
            torch.set_num_threads(threads)  # main() may run inside another process (the tests)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
