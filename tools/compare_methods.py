"""The small-scale counterpart of the paper's Table II: base, GRPO, S-GRPO and T-SPMO, mean ± sd over seeds.

    python tools/compare_methods.py                       # the default run of each method, seeds 0 1 2
    python tools/compare_methods.py --seeds 0 1 --jobs 1 -- --steps 200   # flags after -- go to minirl.train

Each (method, seed) is one `python -m minirl.train` run in its own process, with OMP_NUM_THREADS=1 so
that --jobs runs share the cores fairly. Every run's folder stays under --out; the table is printed and
written to OUT/table.md, the per-run figures to OUT/results.json, and (with matplotlib) the mean
held-out accuracy of each method against the step to OUT/compare.png.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

METHODS = ("grpo", "sgrpo", "tspmo")
NAMES = {"grpo": "GRPO", "sgrpo": "S-GRPO", "tspmo": "T-SPMO"}


def run_one(method: str, seed: int, out: Path, extra: list[str]) -> dict:
    """One training run; returns its eval curve and wall time (the run's log is kept beside its folder)."""
    folder = out / f"{method}-seed{seed}"
    cmd = [sys.executable, "-m", "minirl.train", "--method", method, "--seed", str(seed), "--out", str(folder), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out / f"{method}-seed{seed}.log", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {done.returncode}; see {out / f'{method}-seed{seed}.log'}")
    evals = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]
    seconds = sum(json.loads(line)["seconds"] for line in (folder / "metrics.jsonl").read_text().splitlines())
    return {"method": method, "seed": seed, "curve": [(e["step"], e["accuracy"]) for e in evals],
            "base": evals[0]["accuracy"], "final": evals[-1]["accuracy"], "n": evals[-1]["n"], "train_seconds": seconds}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def table(runs: list[dict], methods: list[str]) -> str:
    """Markdown: one row per method (and the base model), accuracy in % as mean ± sd over seeds."""
    seeds = sorted({r["seed"] for r in runs})
    rows = ["| | held-out accuracy (%) | gain (points) | train time per run (s) |", "|---|---|---|---|"]
    rows.append(f"| base model | {mean_sd([r['base'] for r in runs if r['method'] == methods[0]])} | | |")
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        gains = [r["final"] - r["base"] for r in mine]
        rows.append(f"| {NAMES[m]} | {mean_sd([r['final'] for r in mine])} | {mean_sd(gains)} "
                    f"| {statistics.mean(r['train_seconds'] for r in mine):.0f} |")
    rows.append(f"\nseeds {', '.join(map(str, seeds))}; n = {runs[0]['n']} held-out problems per evaluation")
    return "\n".join(rows)


def plot(runs: list[dict], methods: list[str], path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no compare.png: matplotlib is not installed (pip install 'minirl[plot]')"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m in methods:
        curves = [r["curve"] for r in runs if r["method"] == m]
        steps = [s for s, _ in curves[0]]
        mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
        ax.plot(steps, [100 * a for a in mean], "o-", label=NAMES[m])
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"built-in tiny model, mean of {len(curves)} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods (default: all three)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once, one core each (default: 2)")
    ap.add_argument("--out", default="runs/compare", help="folder of the runs and the table (default: runs/compare)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: expected at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(m, s) for m in args.methods for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda job: run_one(*job, out, extra), jobs))
    for r in runs:
        print(f"{NAMES[r['method']]:<7} seed {r['seed']}: {100 * r['base']:.1f}% -> {100 * r['final']:.1f}% "
              f"({r['train_seconds']:.0f} s of training)")
    text = table(runs, args.methods)
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(runs, indent=1) + "\n")
    print(plot(runs, args.methods, out / "compare.png"))


if __name__ == "__main__":
    main()
