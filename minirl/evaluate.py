"""Accuracy on a task's held-out split: `python -m minirl.evaluate`.

It scores the first N problems of the split (--n; for --task jsonl, of the file). Without --n, N is
what training evaluates on: 300, or 1,000 with the built-in tiny model as its runs use, so the two
numbers compare; a split with fewer problems is scored whole. Greedy decoding by default (τ = 0), as
the paper reports; `--temperature` samples instead. The score is the mean reward (minirl/reward.py):
with the built-in rewards, the fraction answered correctly. One line is printed; only with `--out`
is it also appended to a file as JSON ({"step", "accuracy", "n", "split"}), the same kind of line
that training writes to eval.jsonl.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from minirl.cli import (ArgumentParser, add_model_arguments, load_model_for_cli, non_negative, positive, run_cli,
                        task_file, tiny_defaults)
from minirl.errors import InputError
from minirl.generate import generate
from minirl.reward import BUILT_IN, DEFAULT_REWARD, reward, resolve_reward
from minirl.tasks import SPLITS, Problem, load_task
from minirl.tokenizer import format_prompt

DEFAULT_N = 300  # training's evaluation size (TrainConfig.eval_n); the tiny model's recipe says 1,000


@torch.no_grad()
def accuracy(model, tokenizer, problems: list[Problem], prompt_style: str = "plain", max_new_tokens: int = 300,
             temperature: float = 0.0, batch_size: int = 64, generator: torch.Generator | None = None,
             reward=reward) -> float:
    """Mean reward over the problems, decoding batch_size prompts at a time."""
    correct = 0.0
    for start in range(0, len(problems), batch_size):
        batch = problems[start:start + batch_size]
        prompts = [tokenizer.encode(format_prompt(p.question, prompt_style, tokenizer=tokenizer)) for p in batch]
        outputs = generate(model, prompts, max_new_tokens, temperature, tokenizer.eos_token_ids, generator)
        correct += sum(reward(tokenizer.decode(out), p.answer) for out, p in zip(outputs, batch))
    return correct / max(len(problems), 1)


def evaluation_problems(task: str, split: str, n: int | None = None, default_n: int = DEFAULT_N,
                        digits: int = 3, seed: int = 0, path=None) -> list[Problem]:
    """The first n problems of the split; with n None the first default_n, or all of them when there are fewer.

    An explicit n larger than the split is an error. The split is loaded again with the n chosen,
    as multiplication's train draws depend on how many are asked for.
    """
    if n is None:
        n = min(default_n, len(load_task(task, split, digits=digits, seed=seed, path=path)))
    return load_task(task, split, n=n, digits=digits, seed=seed, path=path)


def check_out(out) -> Path | None:
    """--out is checked before the evaluation runs, so that a result is never computed and then lost."""
    if out is None:
        return None
    path = Path(out)
    if path.is_dir():
        raise InputError(f"--out {out}: is a folder; expected a file to append the JSON line to")
    if not path.parent.is_dir():
        raise InputError(f"--out {out}: the folder {path.parent} does not exist")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise InputError(f"--out {out}: not writable")
    return path


def build_parser():
    ap = ArgumentParser(prog="python -m minirl.evaluate", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    add = ap.add_argument
    add("--adapter", metavar="DIR", help="a LoRA adapter folder (PEFT format) to apply to the model")
    add("--split", default="test", choices=SPLITS,
        help="test, the held-out problems, or train; --task jsonl reads --test-file or --train-file (default: test)")
    add("--n", type=positive(int), default=None,
        help=f"score the first N problems of the split or file (default: {DEFAULT_N}, the tiny model's 1000, as "
             f"training evaluates; the whole split when it has fewer; an N larger than the split is an error)")
    add("--temperature", type=non_negative(float), default=0.0,
        help="τ, sampling temperature; 0 = greedy decoding (default: 0)")
    add("--max-new-tokens", type=positive(int), default=None,
        help="longest completion (default: 300; the tiny model: its own)")
    add("--batch-size", type=positive(int), default=64, help="prompts decoded at once: more is faster and takes "
                                                              "more memory (default: 64)")
    add("--seed", type=int, default=0, help="seed of the sampling when --temperature > 0, and of the multiplication "
                                            "train split's draws, as training's --seed (default: 0)")
    add("--out", metavar="FILE", help="also append the result as one JSON line to FILE (created if missing; "
                                      "nothing is written without --out)")
    return ap


def main(argv=None):
    def run(args):
        # Every input is checked before the model loads: a bad file or flag costs no model load.
        task = args.task or "multiplication"
        path = task_file(args, args.split)
        out = check_out(args.out)
        defaults = tiny_defaults(args.model)
        digits = args.digits if args.digits is not None else defaults.get("digits", 3)
        problems = evaluation_problems(task, args.split, args.n, defaults.get("eval_n", DEFAULT_N), digits,
                                       args.seed, path)
        spec = args.reward or DEFAULT_REWARD
        score = resolve_reward(spec, problems)

        model, tokenizer, defaults = load_model_for_cli(args)
        if args.adapter:
            from minirl.lora import load_adapter
            load_adapter(model, args.adapter)
        max_new = args.max_new_tokens or defaults.get("max_new_tokens", 300)
        style = args.prompt_style or defaults.get("prompt_style", "plain")
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        acc = accuracy(model, tokenizer, problems, style, max_new, args.temperature, args.batch_size, g, score)
        what = f"problems of {path}" if path else f"{task} problems"
        how = "" if spec == DEFAULT_REWARD else f", reward {spec}"
        result = f"accuracy {100 * acc:.1f}%" if spec in BUILT_IN else f"mean reward {acc:.4f}"
        print(f"{result} on {len(problems)} {what} ({args.split} split{how})")
        if out:
            with open(out, "a") as f:
                f.write(json.dumps({"step": None, "accuracy": acc, "n": len(problems), "split": args.split}) + "\n")

    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
