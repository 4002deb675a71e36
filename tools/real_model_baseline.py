"""Base greedy accuracy of a chat model on the worded arithmetic tasks, and how many answers finish per token budget.

    python tools/fetch_smollm2.py                      # once: models/SmolLM2-135M-Instruct
    python tools/real_model_baseline.py                # three tasks, n = 300 each, budgets 16..64

Why. RL with a short token budget rewards finishing before the budget as much as it rewards arithmetic: an
answer cut off before its number scores 0 however good its arithmetic. A fair before/after comparison
needs a budget at which (nearly) every base answer finishes, and, beside accuracy, the accuracy among the
answers that state a number.

How. One greedy run per task (minirl's generate, the model's chat template) at the largest budget. Greedy
decoding is deterministic and each token depends only on those before it, so the first B tokens of that
run are exactly what a run with max_new_tokens = B gives: one run measures every budget. For a budget B:
- finished: the answer's EOS is among its first B tokens;
- accuracy: the task's reward (the last integer equals the answer) of the text of the first B tokens,
  which is what evaluation with max_new_tokens = B scores;
- stated: finished answers with an integer in them, and the accuracy among those (arithmetic, not format).
Problems are each task's fixed held-out test split (minirl/tasks.py, worded), so the figures reproduce.

Measured on SmolLM2-135M-Instruct (n = 300, template style): with the instruction "Answer with only the
number." (--instruction to restore it) at most 83% of answers finish within 64 tokens, most opening with
"To solve this"; with the tasks' "Reply with the number only, nothing else." multiplication-2x1 is 20.0%
at 16 tokens (96.3% finished) and 19.0% at 24 (96.7%), addition-2+2 16.0% at 32 (96.3%),
multiplication-2x2 4.7% (96.7% at 32).
"""

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import replace

import torch

from minirl import generate, load_pretrained
from minirl.reward import last_integer, reward
from minirl.tasks import WORDED, WORDED_INSTRUCTION, load_task
from minirl.tokenizer import format_prompt


def budget_row(task, problems, completions, tokenizer, budget) -> dict:
    eos = set(tokenizer.eos_token_ids)
    finished = correct = stated = stated_correct = 0
    for problem, completion in zip(problems, completions):
        cut = completion[:budget]
        text = tokenizer.decode(cut)
        done = bool(cut) and cut[-1] in eos
        score = reward(text, problem.answer)
        finished += done
        correct += score
        if done and last_integer(text) is not None:
            stated += 1
            stated_correct += score
    n = len(problems)
    return {"task": task, "budget": budget, "n": n, "accuracy": correct / n, "finished": finished / n,
            "stated": stated, "accuracy_stated": stated_correct / stated if stated else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--tasks", default=",".join(WORDED), help=f"comma-separated, of {', '.join(WORDED)}")
    ap.add_argument("--n", type=int, default=300, help="problems per task, from its test split (default 300)")
    ap.add_argument("--budgets", default="16,24,32,48,64", help="max_new_tokens values to report")
    ap.add_argument("--prompt-style", default="template", choices=["plain", "chatml", "template"])
    ap.add_argument("--instruction", help=f"replace the tasks' {WORDED_INSTRUCTION!r} (to compare wordings)")
    ap.add_argument("--system", help="a system message (default: none, so the template's own default applies)")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--examples", type=int, default=3, help="unfinished answers to print per task")
    ap.add_argument("--out", help="write the rows as JSON lines here")
    args = ap.parse_args(argv)
    budgets = sorted(int(b) for b in args.budgets.split(","))
    model, tokenizer = load_pretrained(args.model)
    rows = []
    for task in args.tasks.split(","):
        problems = load_task(task, "test", n=args.n)
        if args.instruction is not None:
            problems = [replace(p, question=p.question.replace(WORDED_INSTRUCTION, args.instruction)) for p in problems]
        style = lambda q: format_prompt(q, args.prompt_style, system=args.system, tokenizer=tokenizer)  # noqa: E731
        prompts = [tokenizer.encode(style(p.question)) for p in problems]
        start, completions = time.time(), []
        for i in range(0, len(prompts), args.batch_size):
            completions += generate(model, prompts[i:i + args.batch_size], budgets[-1], temperature=0.0,
                                    eos_token_id=tokenizer.eos_token_ids)
        seconds = time.time() - start
        tokens = sum(len(c) for c in completions)
        print(f"{task}: {len(problems)} problems, {tokens} new tokens in {seconds:.0f} s "
              f"({tokens / seconds:.0f} tokens/s), prompt e.g. {style(problems[0].question)!r}")
        texts = [tokenizer.decode(c) for c in completions]
        openings = Counter(" ".join(t.split()[:3]) for t in texts)
        print("  most common openings: " + "; ".join(f"{o!r} ×{k}" for o, k in openings.most_common(4)))
        for problem, completion, text in list(zip(problems, completions, texts))[:40]:
            if args.examples and len(completion) == budgets[-1]:
                print(f"  unfinished at {budgets[-1]}: {problem.question!r} -> {text!r}")
                args.examples -= 1
        for budget in budgets:
            rows.append(budget_row(task, problems, completions, tokenizer, budget))
        args.examples = 3
    print("\n| task | budget | accuracy | finished | stated a number | accuracy among those |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        stated = "–" if r["accuracy_stated"] is None else f"{100 * r['accuracy_stated']:.1f}%"
        print(f"| {r['task']} | {r['budget']} | {100 * r['accuracy']:.1f}% | {100 * r['finished']:.1f}% | "
              f"{r['stated']} / {r['n']} | {stated} |")
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when the output is a file
    sys.exit(main())
