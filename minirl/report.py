"""What a finished run shows: the before/after table it prints and learning_curve.png (matplotlib, optional)."""

import json
from pathlib import Path

NAMES = {"grpo": "GRPO", "sgrpo": "S-GRPO", "tspmo": "T-SPMO"}


def plot_learning_curve(out: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no learning_curve.png: matplotlib is not installed (pip install 'minirl[plot]')"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    config = json.loads((out / "config.json").read_text())
    steps, rewards = [m["step"] for m in metrics], [100 * m["reward_mean"] for m in metrics]
    window = max(1, len(rewards) // 20)
    smooth = [sum(rewards[max(0, i - window + 1):i + 1]) / len(rewards[max(0, i - window + 1):i + 1]) for i in range(len(rewards))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, smooth, label=f"group reward, sampled (mean of {window} steps)", alpha=0.7)
    ax.plot([e["step"] for e in evals], [100 * e["accuracy"] for e in evals], "o-", label="held-out accuracy, greedy")
    ax.set_xlabel("step")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper left")
    ax.set_title(f"{NAMES[config['method']]} on {config['task']}, seed {config['seed']}")
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=120)
    plt.close(fig)
    return f"learning curve: {out / 'learning_curve.png'}"


def summary_table(method: str, result: dict) -> str:
    rows = [("base model", result["base"]), (f"after {method.upper()}", result["final"])]
    lines = [f"{'':<16}{'accuracy':>10}{'n':>7}"]
    lines += [f"{name:<16}{100 * acc:>9.1f}%{result['n']:>7}" for name, acc in rows]
    return "\n".join(lines)
