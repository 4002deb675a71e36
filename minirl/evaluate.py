"""Accuracy on a task's held-out split: `python -m minirl.evaluate`.

Greedy decoding by default (τ = 0), as the paper reports; `--temperature` samples instead. One line
is printed and, with `--out`, appended as JSON ({"step", "accuracy", "n", "split"}), the same kind of
line that training writes to eval.jsonl.
"""

import argparse
import json
import sys

import torch

from minirl.cli import add_model_arguments, load_model_for_cli, non_negative, positive, run_cli
from minirl.generate import generate
from minirl.tasks import Problem, load_task, reward
from minirl.tokenizer import format_prompt


@torch.no_grad()
def accuracy(model, tokenizer, problems: list[Problem], prompt_style: str = "plain", max_new_tokens: int = 300,
             temperature: float = 0.0, batch_size: int = 64, generator: torch.Generator | None = None) -> float:
    """Mean reward over the problems, decoding batch_size prompts at a time."""
    correct = 0.0
    for start in range(0, len(problems), batch_size):
        batch = problems[start:start + batch_size]
        prompts = [tokenizer.encode(format_prompt(p.question, prompt_style)) for p in batch]
        outputs = generate(model, prompts, max_new_tokens, temperature, tokenizer.eos_token_id, generator)
        correct += sum(reward(tokenizer.decode(out), p.answer) for out, p in zip(outputs, batch))
    return correct / max(len(problems), 1)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minirl.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--adapter", help="a LoRA adapter folder (PEFT format) to apply to the model")
    ap.add_argument("--split", default="test", choices=["train", "test"])
    ap.add_argument("--n", type=positive(int), default=None, help="number of problems (default: the whole split)")
    ap.add_argument("--temperature", type=non_negative(float), default=0.0, help="0 = greedy (default)")
    ap.add_argument("--max-new-tokens", type=positive(int), default=None, help="default: 300, or the tiny model's setting")
    ap.add_argument("--batch-size", type=positive(int), default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="append the result as one JSON line to this file")

    def run(args):
        model, tokenizer, defaults = load_model_for_cli(args)
        if args.adapter:
            from minirl.lora import load_adapter
            load_adapter(model, args.adapter)
        digits = args.digits or defaults.get("digits", 3)
        problems = load_task(args.task, args.split, n=args.n, digits=digits)
        max_new = args.max_new_tokens or defaults.get("max_new_tokens", 300)
        style = args.prompt_style or defaults.get("prompt_style", "plain")
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        acc = accuracy(model, tokenizer, problems, style, max_new, args.temperature, args.batch_size, g)
        line = {"step": None, "accuracy": acc, "n": len(problems), "split": args.split}
        print(f"accuracy {100 * acc:.1f}% on {len(problems)} {args.task} problems ({args.split} split)")
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")

    return run_cli(ap, run, argv)

if __name__ == "__main__":
    sys.exit(main())
