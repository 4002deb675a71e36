"""minirl's GRPO and T-SPMO against TRL's GRPOTrainer, side by side, with matched settings.

    pip install -e .[bench]                     # trl (with transformers and peft), for this tool only
    python tools/bench_vs_trl.py                # the built-in tiny model: 200 steps, seeds 0,1,2 (~5 min)
    python tools/bench_vs_trl.py --model models/SmolLM2-135M-Instruct --prompt-style template \
        --task multiplication-2x1               # a real chat model: 20 steps, seed 0

What is matched. Each run trains a LoRA adapter on the same problems in the same order: minirl's own
draws, `train.draw_index(seed, len(train), d)` over `tasks.load_task(task, "train", digits, seed)`,
handed to TRL as a dataset of one prompt per step with shuffling off. The prompt text is minirl's
`format_prompt` (plain, or the folder's chat template as minirl renders it), checked to tokenize and
decode the same under TRL's tokenizer. The reward is minirl.reward.reward (the last integer equals
the answer) in both. G, lr (AdamW, constant, no weight decay, no gradient clipping), LoRA rank,
alpha, targets and layers (peft's layers_to_transform, no dropout), τ (no top-k, no top-p), β, max
new tokens and steps are the same; fp32 on the CPU, one thread per process (OMP_NUM_THREADS=1, and
torch.set_num_threads(1) in TRL's). TRL runs loss_type "grpo" (the mean over each completion's
tokens, then over the group, as DESIGN.md's GRPO), one generation and one update per step. What this
tool does not set is what `python -m minirl.train` takes (the tiny model's tuned values, else the
paper's), so T-SPMO replays successes as it does by default (a replayed tree is one more update
in the step: the updates/step column); one G serves all three systems (8).

What differs by design, and shows in the figures: minirl skips the forward and backward of a group
whose rewards are all equal (no advantage, DESIGN.md "GRPO"); TRL runs them and steps AdamW, since
its β·KL term has a gradient once the policy has moved.

How it is run. minirl through its command line, TRL through this file's --trl-worker mode, each run
in its own process; with --jobs 2, TRL's runs go one after another in one lane while minirl's GRPO
and T-SPMO runs go in the other, so that both meet the same machine. Figures:
- held-out accuracy: every adapter and the base model scored by `python -m minirl.evaluate
  --adapter DIR --n N` (greedy, the training budget of new tokens); mean ± sd over seeds;
- s/step: the median over steps (pooled over seeds) of the wall time of one step (sampling, reward,
  losses, backward, optimizer), from minirl's metrics.jsonl and from a TRL callback around each
  optimizer step; also over the steps with a training signal and over the tied ones;
- CPU s/step: the process's user + system time per step over its training steps. A one-thread
  process that competes for the cores waits longer but computes the same, so on a shared machine
  this is the steadier figure of the two;
- peak RSS: the highest VmHWM / VmRSS of the process, read from /proc every 50 ms (minirl resets
  its own high-water mark each step, hence the polling); it includes the libraries each imports.
Every run's folder and log stay under --out; the table goes to OUT/table.md, every figure to
OUT/results.json.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYSTEMS = ("trl", "grpo", "tspmo")
NAMES = {"trl": "TRL GRPOTrainer", "grpo": "minirl GRPO", "tspmo": "minirl T-SPMO"}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# ----------------------------------------------------------------------------- settings

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python tools/bench_vs_trl.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--model", help="a Hugging Face model folder (default: the built-in tiny model)")
    add("--prompt-style", choices=("plain", "chatml", "template"), help="as minirl.train (default: its own)")
    add("--task", help="as minirl.train (default: multiplication)")
    add("--digits", type=int, help="as minirl.train (default: its own)")
    add("--steps", type=int, help="training steps of each run (default: 200; 20 with --model)")
    add("--seeds", help="comma list; each seed is one run of every system (default: 0,1,2; 0 with --model)")
    add("--group-size", type=int, default=8, help="G, for all three systems (default: 8)")
    add("--lr", type=float, help="default: minirl's (tiny model 1e-3, paper 1e-4)")
    add("--beta", type=float, help="β of GRPO, both systems (default: minirl's, 0.01)")
    add("--lora-rank", type=int, help="as minirl.train (default: 8)")
    add("--lora-alpha", type=float, help="as minirl.train (default: 2 × rank)")
    add("--lora-layers", help="as minirl.train (default: last-quarter)")
    add("--lora-targets", help="as minirl.train (default: q_proj,v_proj)")
    add("--temperature", type=float, help="τ (default: minirl's, 0.3)")
    add("--max-new-tokens", type=int, help="default: minirl's for the tiny model (8); 16 with --model")
    add("--eval-n", type=int, help="held-out problems scored (default: minirl.evaluate's)")
    add("--systems", default=",".join(SYSTEMS), help=f"comma list of {','.join(SYSTEMS)} (default: all)")
    add("--jobs", type=int, choices=(1, 2), default=2,
        help="processes at once, one thread each: 2 runs TRL beside minirl, 1 alternates them (default: 2)")
    add("--out", help="folder for the runs (default: runs/bench_vs_trl-<time>)")
    add("--trl-worker", metavar="SPEC", help=argparse.SUPPRESS)  # internal: run TRL from a settings file
    return ap.parse_args(argv)


def resolve(args) -> dict:
    """Every shared setting: the flag, else what `python -m minirl.train` would take for this model."""
    from minirl.cli import tiny_defaults
    from minirl.config import TrainConfig, paper_defaults
    from minirl.lora import parse_layers
    from minirl.tiny import tiny_model_path

    task = args.task or "multiplication"
    s = asdict(TrainConfig())
    s.update(paper_defaults("grpo", task))
    s.update({k: v for k, v in tiny_defaults(args.model).items() if k in s})
    if args.model is not None:
        s.update(steps=20, max_new_tokens=16)
    else:
        s.update(steps=200)
    given = {k: v for k, v in vars(args).items() if v is not None and k in s}
    if args.lora_rank is not None and args.lora_alpha is None:
        given["lora_alpha"] = 2.0 * args.lora_rank
    s.update(given, task=task, model=args.model, group_size=args.group_size, seed=None)
    folder = Path(args.model) if args.model else tiny_model_path()
    n_layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    s["layer_indices"] = parse_layers(s["lora_layers"], n_layers)
    s["model_folder"] = str(folder)
    return s


def problems_in_order(s: dict):
    """The (train index, problem) of minirl's draws 0..steps-1 (one problem per step, one rank)."""
    from minirl.tasks import load_task
    from minirl.train import draw_index

    train = load_task(s["task"], "train", digits=s["digits"], seed=s["seed"])
    return [(i, train[i]) for i in (draw_index(s["seed"], len(train), d) for d in range(s["steps"]))]


# ----------------------------------------------------------------------------- the TRL worker

def trl_settings(s: dict, out: Path) -> tuple[dict, dict]:
    """GRPOConfig's and peft LoraConfig's arguments for the shared settings `s`: one prompt and one
    update per step, G completions of it, constant lr, no clipping, no dropout, fp32 on the CPU."""
    G = s["group_size"]
    trainer = dict(
        output_dir=str(out / "trainer"), max_steps=s["steps"], seed=s["seed"], per_device_train_batch_size=G,
        num_generations=G, gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        shuffle_dataset=False, learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, beta=s["beta"], loss_type="grpo", scale_rewards="group",
        temperature=s["temperature"], top_p=1.0, top_k=0, max_completion_length=s["max_new_tokens"],
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, dataloader_num_workers=0,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    lora = dict(r=s["lora_rank"], lora_alpha=s["lora_alpha"], lora_dropout=0.0, bias="none",
                target_modules=s["lora_targets"].split(","), layers_to_transform=s["layer_indices"],
                task_type="CAUSAL_LM")
    return trainer, lora


def trl_worker(spec_path: str):
    """Train with TRL's GRPOTrainer on the settings file; writes metrics.jsonl and adapter/ beside it."""
    import torch
    torch.set_num_threads(1)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from minirl.reward import reward
    from minirl.tokenizer import Tokenizer, format_prompt

    s = json.loads(Path(spec_path).read_text())
    out = Path(spec_path).parent
    ours = Tokenizer.from_folder(s["model_folder"])
    eos = ours.tokenizer.id_to_token(ours.eos_token_ids[0])
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(s["model_folder"]) / "tokenizer.json"),
                                        eos_token=eos, pad_token=eos)
    drawn = problems_in_order(s)
    texts = [format_prompt(p.question, s["prompt_style"], tokenizer=ours) for _, p in drawn]
    for text in texts:  # TRL tokenizes prompts and decodes completions its own way: it must be minirl's
        ids = ours.encode(text)
        if tokenizer(text=[text])["input_ids"][0] != ids or tokenizer.decode(ids, skip_special_tokens=True) != \
                ours.decode(ids):
            raise SystemExit(f"error: TRL's tokenizer and minirl's disagree on {text!r}")
    answers = [p.answer for _, p in drawn]
    dataset = Dataset.from_dict({"prompt": texts, "row": list(range(len(texts)))})

    def last_integer_reward(prompts, completions, row, **_):
        return [reward(c, answers[r]) for c, r in zip(completions, row)]

    model = AutoModelForCausalLM.from_pretrained(s["model_folder"], dtype=torch.float32)
    model.generation_config.eos_token_id = ours.eos_token_ids
    trainer_kwargs, lora_kwargs = trl_settings(s, out)
    config, lora = GRPOConfig(**trainer_kwargs), LoraConfig(**lora_kwargs)

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (generation included) and TRL's per-step logs."""
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds = time.perf_counter() - self.t0

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                line = {"step": state.global_step, "seconds": self.seconds, "reward_mean": logs["reward"],
                        "tied": logs.get("frac_reward_zero_std", 0.0) == 1.0}
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(line) + "\n")

    trainer = GRPOTrainer(model=model, reward_funcs=last_integer_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora, callbacks=[StepTimer()])
    trainer.train()
    trainer.model.save_pretrained(str(out / "adapter"))


# ----------------------------------------------------------------------------- running and measuring

def digits_flag(s: dict) -> list[str]:
    return ["--digits", str(s["digits"])] if s["task"] == "multiplication" else []  # the other tasks fix theirs


# the shared settings, as minirl.train's flags
SHARED_FLAGS = ("prompt_style", "steps", "seed", "group_size", "lr", "beta", "lora_rank", "lora_alpha", "lora_layers",
                "lora_targets", "temperature", "max_new_tokens")


def minirl_command(method: str, s: dict, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "minirl.train", "--method", method, "--out", str(out), "--overwrite",
           "--task", s["task"], *digits_flag(s)]
    for name in SHARED_FLAGS:
        cmd += ["--" + name.replace("_", "-"), str(s[name])]
    # training's own evaluations are cut to one problem: the scoring is minirl.evaluate's, after training
    cmd += ["--eval-n", "1", "--eval-every", str(s["steps"]), "--checkpoint-every", str(s["steps"])]
    return cmd + (["--model", s["model"]] if s["model"] else [])


def run_measured(cmd: list[str], log: Path, metrics: Path | None = None) -> dict:
    """Run cmd with one thread: its wall time, its peak resident set and, where it writes one line to
    `metrics` per step, its CPU seconds per step, from /proc/PID read every 50 ms.

    CPU s/step is the process's user + system time between the appearance of the first and of the
    last step line, over the steps in between: unlike wall time, it hardly changes when other
    processes compete for the cores, which on a shared machine makes it the steadier figure.
    """
    env = {**os.environ, **ONE_THREAD}
    peak, tick = 0, os.sysconf("SC_CLK_TCK")
    first = last = None  # (lines, cpu seconds) when the first and the latest step lines appeared
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as status:
                    for line in status:
                        if line.startswith(("VmHWM:", "VmRSS:")):
                            peak = max(peak, int(line.split()[1]) * 1024)
                with open(f"/proc/{proc.pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
                cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
                lines = metrics.read_bytes().count(b"\n") if metrics is not None and metrics.exists() else 0
                if lines and (last is None or lines > last[0]):
                    first, last = first or (lines, cpu), (lines, cpu)
            except (OSError, IndexError, ValueError):
                pass  # the process is ending
            time.sleep(0.05)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {proc.returncode}; see {log}")
    cpu_step = (last[1] - first[1]) / (last[0] - first[0]) if first and last[0] > first[0] else None
    return {"peak_rss": peak, "wall_s": wall, "cpu_s_per_step": cpu_step}


def train_system(system: str, seed: int, s: dict, out: Path) -> dict:
    """One training run: its per-step figures (metrics.jsonl) and the measured process figures."""
    s = {**s, "seed": seed}
    folder = out / f"{system}-seed{seed}"
    if system == "trl":
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").unlink(missing_ok=True)
        (folder / "spec.json").write_text(json.dumps(s, indent=2))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(folder / "spec.json")]
    else:
        cmd = minirl_command(system, s, folder)
        (folder / "metrics.jsonl").unlink(missing_ok=True)  # --overwrite clears it too, but only once started
    print(f"  start {NAMES[system]}, seed {seed}", flush=True)
    result = run_measured(cmd, out / f"{system}-seed{seed}.log", folder / "metrics.jsonl")
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    if len(lines) != s["steps"]:
        raise SystemExit(f"error: {NAMES[system]} logged {len(lines)} steps, expected {s['steps']}; see {folder}")
    trl = system == "trl"
    result.update(system=system, seed=seed, adapter=str(folder / "adapter"),
                  seconds=[m["seconds"] for m in lines],
                  tied=[m["tied"] if trl else m["updates"] == 0 for m in lines],
                  updates=[1 if trl else m["updates"] for m in lines],  # TRL steps on a tied group too (β·KL)
                  reward_mean=statistics.mean(m["reward_mean"] for m in lines))
    print(f"  done  {NAMES[system]}, seed {seed}: median {statistics.median(result['seconds']):.3f} s/step, "
          f"wall {result['wall_s']:.0f} s", flush=True)
    return result


def score(adapter: str | None, s: dict, out: Path, name: str, n: int | None) -> dict:
    """Held-out greedy accuracy by `python -m minirl.evaluate`, the same scorer for every system."""
    record = out / f"eval-{name}.jsonl"
    record.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "minirl.evaluate", "--task", s["task"], *digits_flag(s), "--prompt-style",
           s["prompt_style"], "--max-new-tokens", str(s["max_new_tokens"]), "--out", str(record)]
    cmd += (["--model", s["model"]] if s["model"] else []) + (["--adapter", adapter] if adapter else [])
    cmd += ["--n", str(n)] if n else []
    run_measured(cmd, out / f"eval-{name}.log")
    line = json.loads(record.read_text().splitlines()[-1])
    return {"accuracy": line["accuracy"], "n": line["n"]}


def summarize(runs: list[dict]) -> dict:
    """One system's runs (one per seed) as the table's figures: step times pooled over the seeds."""
    seconds = [t for r in runs for t in r["seconds"]]
    tied = [x for r in runs for x in r["tied"]]
    signal_s = [t for r in runs for t, x in zip(r["seconds"], r["tied"]) if not x]
    tied_s = [t for r in runs for t, x in zip(r["seconds"], r["tied"]) if x]
    cpu = [r["cpu_s_per_step"] for r in runs if r["cpu_s_per_step"] is not None]
    acc = [r["accuracy"] for r in runs]
    return {"accuracy": statistics.mean(acc), "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "accuracies": acc, "median_s": statistics.median(seconds),
            "median_signal_s": statistics.median(signal_s) if signal_s else None,
            "median_tied_s": statistics.median(tied_s) if tied_s else None,
            "cpu_s": statistics.mean(cpu) if cpu else None, "tied_fraction": sum(tied) / len(tied),
            "updates_per_step": statistics.mean(u for r in runs for u in r["updates"]),
            "peak_rss": max(r["peak_rss"] for r in runs)}


def table(summary: dict, base: dict, s: dict, seeds: list[int]) -> str:
    """Markdown: one row per system, ratios to TRL's row."""
    trl = summary.get("trl")

    def num(v, digits=3):
        return "–" if v is None else f"{v:.{digits}f}"

    def ratio(row, key):
        return f"{row[key] / trl[key]:.2f}" if trl and row[key] and trl[key] else "–"

    rows = ["| system | held-out accuracy (%) | median s/step | … steps with signal | … tied steps | tied steps "
            "| updates/step | CPU s/step | peak RSS (MiB) | s/step ÷ TRL | CPU s/step ÷ TRL | RSS ÷ TRL |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| base model | {100 * base['accuracy']:.1f} | | | | | | | | | | |"]
    for system, r in summary.items():
        acc = f"{100 * r['accuracy']:.1f}" + (f" ± {100 * r['accuracy_sd']:.1f}" if len(seeds) > 1 else "")
        rows.append(f"| {NAMES[system]} | {acc} | {num(r['median_s'])} | {num(r['median_signal_s'])} "
                    f"| {num(r['median_tied_s'])} | {100 * r['tied_fraction']:.0f}% | {r['updates_per_step']:.2f} "
                    f"| {num(r['cpu_s'])} | {r['peak_rss'] / 2**20:.0f} | {ratio(r, 'median_s')} | {ratio(r, 'cpu_s')} "
                    f"| {ratio(r, 'peak_rss')} |")
    task = s["task"] + (f" (digits {s['digits']})" if s["task"] == "multiplication" else "")
    rows.append(f"\nmodel {s['model'] or 'built-in tiny'}, task {task}, prompt "
                f"{s['prompt_style']}, {s['steps']} steps, seeds {','.join(map(str, seeds))}"
                f"{' (accuracy: mean ± sd over seeds; step times pooled)' if len(seeds) > 1 else ''}, "
                f"G = {s['group_size']}, lr {s['lr']}, β {s['beta']}, τ {s['temperature']}, LoRA r {s['lora_rank']} "
                f"α {s['lora_alpha']:g} on {s['lora_targets']} of layers {s['layer_indices']}, "
                f"{s['max_new_tokens']} new tokens; accuracy on n = {base['n']} held-out problems, greedy, by "
                f"minirl.evaluate; fp32, CPU, one thread per process")
    return "\n".join(rows)


def main(argv=None):
    args = parse_args(argv)
    if args.trl_worker:
        return trl_worker(args.trl_worker)
    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    if not systems or any(x not in SYSTEMS for x in systems):
        raise SystemExit(f"error: --systems {args.systems}: expected a comma list of {','.join(SYSTEMS)}")
    if "trl" in systems and importlib.util.find_spec("trl") is None:
        raise SystemExit("error: trl is not installed: pip install -e .[bench]")
    try:
        seeds = [int(x) for x in (args.seeds or ("0" if args.model else "0,1,2")).split(",")]
    except ValueError:
        raise SystemExit(f"error: --seeds {args.seeds}: expected a comma list of integers") from None
    s = resolve(args)
    out = Path(args.out or f"runs/bench_vs_trl-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"bench_vs_trl: {', '.join(NAMES[x] for x in systems)}, {s['steps']} steps, seeds "
          f"{','.join(map(str, seeds))}, {args.jobs} processes at a time, output in {out}", flush=True)
    t0 = time.perf_counter()
    jobs = [(system, seed) for seed in seeds for system in systems]
    # --jobs 2: TRL's runs in one lane and minirl's in the other, so that both meet the same noise
    lanes = [jobs] if args.jobs == 1 else [[j for j in jobs if j[0] == "trl"], [j for j in jobs if j[0] != "trl"]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda lane: [train_system(*job, s, out) for job in lane], [lane for lane in lanes if lane])
        runs = sorted((r for lane in done for r in lane), key=lambda r: jobs.index((r["system"], r["seed"])))
        names = ["base"] + [f"{r['system']}-seed{r['seed']}" for r in runs]
        adapters = [None] + [r["adapter"] for r in runs]
        scores = list(pool.map(lambda a: score(a[1], s, out, a[0], args.eval_n), zip(names, adapters)))
    for run, scored in zip(runs, scores[1:]):
        run.update(scored)
    summary = {system: summarize([r for r in runs if r["system"] == system]) for system in systems}
    text = table(summary, scores[0], s, seeds)
    wall = time.perf_counter() - t0
    (out / "table.md").write_text(text + f"\n\ntotal wall time {wall:.0f} s\n")
    (out / "results.json").write_text(json.dumps({"settings": s, "seeds": seeds, "base": scores[0],
                                                  "summary": summary, "runs": runs, "wall_s": wall}, indent=2) + "\n")
    print(text)
    print(f"total wall time {wall:.0f} s; table in {out / 'table.md'}, every run in {out}")


if __name__ == "__main__":
    sys.exit(main())
