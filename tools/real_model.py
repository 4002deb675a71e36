"""The paper's question asked of a real instruct model on a laptop: GRPO, S-GRPO and T-SPMO on SmolLM2-135M-Instruct.

    python tools/fetch_smollm2.py               # once: models/SmolLM2-135M-Instruct
    python tools/real_model.py                  # 3 methods at once, 15 min of training each, then the table
    python tools/real_model.py --minutes 30 --seeds 0 1

Every method gets the same wall-clock budget of training steps (`--max-minutes`; evaluations not counted),
and they run at the same time, one thread each, so the machine's load falls on all of them alike. The
task is worded 2-digit × 1-digit multiplication (minirl/tasks.py, "multiplication-2x1") in the model's
own chat template, with a budget of 16 new tokens: tools/real_model_baseline.py measured that 96% of the
base model's greedy answers finish within it, so the comparison is about arithmetic, not about being cut
off. Beside accuracy the table gives the accuracy among the answers that finish and state a number.

Each run is an ordinary `python -m minirl.train` run whose folder stays under --out; the adapters are
scored here, greedy, on the first --n problems of the held-out split, as tools/real_model_baseline.py does.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from real_model_baseline import budget_row  # noqa: E402

from minirl import generate, load_pretrained  # noqa: E402
from minirl.lora import load_adapter  # noqa: E402
from minirl.tasks import load_task  # noqa: E402
from minirl.tokenizer import format_prompt  # noqa: E402

NAMES = {"grpo": "GRPO", "sgrpo": "S-GRPO", "tspmo": "T-SPMO"}
# The settings every method shares, and each method's own. G = 8 for all three, so a step samples the same
# number of answers whichever method it is; S-GRPO keeps α = 4 and at most k = 8 of at most 16 tokens (the
# paper-scale α = 8, k = 32 would keep nearly every token and make it GRPO).
SHARED = ["--prompt-style", "template", "--task", "multiplication-2x1", "--max-new-tokens", "16", "--group-size", "8",
          "--temperature", "0.7", "--lr", "1e-4", "--lora-rank", "8", "--lora-targets", "q_proj,v_proj",
          "--lora-layers", "last-quarter", "--steps", "100000", "--eval-every", "100000", "--checkpoint-every", "50"]
OWN = {"grpo": ["--beta", "0.01"], "sgrpo": ["--beta", "0.01", "--alpha", "4", "--k", "8"], "tspmo": ["--lam", "0.01"]}


def train_one(model: str, method: str, seed: int, minutes: float, eval_n: int, out: Path) -> Path:
    folder = out / f"{method}-seed{seed}"
    cmd = [sys.executable, "-m", "minirl.train", "--method", method, "--model", model, "--seed", str(seed),
           "--max-minutes", str(minutes), "--eval-n", str(eval_n), "--out", str(folder), *SHARED, *OWN[method]]
    if (folder / "config.json").exists():
        cmd = [sys.executable, "-m", "minirl.train", "--resume", str(folder), "--max-minutes", str(minutes)]
    with open(out / f"{method}-seed{seed}.log", "a") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {done.returncode}; see {out / f'{method}-seed{seed}.log'}")
    return folder


@torch.no_grad()
def score(model_dir: str, adapter: Path | None, n: int, budget: int) -> dict:
    model, tokenizer = load_pretrained(model_dir)
    if adapter is not None:
        load_adapter(model, adapter)
    problems = load_task("multiplication-2x1", "test", n=n)
    prompts = [tokenizer.encode(format_prompt(p.question, "template", tokenizer=tokenizer)) for p in problems]
    completions = []
    for i in range(0, len(prompts), 50):
        completions += generate(model, prompts[i:i + 50], budget, 0.0, tokenizer.eos_token_ids)
    return budget_row("multiplication-2x1", problems, completions, tokenizer, budget)


def run_figures(folder: Path) -> dict:
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"steps": len(metrics), "train_minutes": sum(m["seconds"] for m in metrics) / 60,
            "s_per_step": statistics.median(m["seconds"] for m in metrics),
            "curve": [(m["seconds"], m["reward_mean"]) for m in metrics]}


def plot(rows: list[dict], base: dict, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in rows:
        t, total, points = 0.0, [], []
        for seconds, reward_mean in r["curve"]:
            t += seconds
            total.append(reward_mean)
            points.append((t / 60, 100 * sum(total[-25:]) / len(total[-25:])))
        left.plot(*zip(*points), label=f"{NAMES[r['method']]} seed {r['seed']}")
    left.set_xlabel("training minutes")
    left.set_ylabel("group reward, sampled (%)")
    left.set_title("reward during training (mean of 25 steps)")
    left.legend()
    names = ["base"] + [f"{NAMES[r['method']]}\nseed {r['seed']}" for r in rows]
    accuracy = [100 * base["accuracy"]] + [100 * r["accuracy"] for r in rows]
    stated = [100 * base["accuracy_stated"]] + [100 * r["accuracy_stated"] for r in rows]
    x = range(len(names))
    right.bar([i - 0.2 for i in x], accuracy, 0.4, label="held-out accuracy")
    right.bar([i + 0.2 for i in x], stated, 0.4, label="among answers that state a number")
    right.set_xticks(list(x), names)
    right.set_ylabel("%")
    right.set_title("greedy, 16 new tokens")
    right.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--methods", nargs="+", default=list(NAMES), choices=list(NAMES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--minutes", type=float, default=15.0, help="training minutes per run (default 15)")
    ap.add_argument("--n", type=int, default=300, help="held-out problems scored (default 300)")
    ap.add_argument("--out", default="runs/real-model")
    args = ap.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"error: --model {args.model}: no model folder there; run python tools/fetch_smollm2.py first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: the same machine load for every method
        folders = list(pool.map(lambda job: train_one(args.model, *job, args.minutes, args.n, out), jobs))
    torch.set_num_threads(2)
    base = score(args.model, None, args.n, 16)
    rows = [{"method": m, "seed": s, **run_figures(f), **score(args.model, f / "adapter", args.n, 16)}
            for (m, s), f in zip(jobs, folders)]
    lines = ["| | held-out accuracy | answers that state a number | accuracy among those | steps | s/step (median) |",
             "|---|---|---|---|---|---|",
             f"| base model | {100 * base['accuracy']:.1f}% | {base['stated']} / {base['n']} | "
             f"{100 * base['accuracy_stated']:.1f}% | | |"]
    lines += [f"| {NAMES[r['method']]}, seed {r['seed']} | {100 * r['accuracy']:.1f}% | {r['stated']} / {r['n']} | "
              f"{100 * r['accuracy_stated']:.1f}% | {r['steps']} | {r['s_per_step']:.2f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"base": base, "runs": rows}, indent=1) + "\n")
    plot(rows, base, out / "real_model.png")
    print(f"figures: {out / 'table.md'}, {out / 'results.json'}, {out / 'real_model.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
