"""Train LoRA adapters with GRPO, S-GRPO or T-SPMO: `python -m minirl.train --method tspmo`.

The loop, as a reader follows it (each method's own procedure is in rl/, the settings in config.py,
the files in run_state.py, the ranks in distributed.py):

    for step = 1 .. steps:
        draw the step's problems (one per rank by default: the paper's batch of one)
        the method's train_step: sample groups, score them, accumulate gradients, optimizer steps
        append a line to metrics.jsonl; every eval_every steps evaluate, every checkpoint_every checkpoint

Every random choice of step s (the problem, the samples, S-GRPO's token subsets, the replay cuts) comes
from generators seeded with (seed, s), and problems are drawn in passes over a seeded shuffle of the
train split, so no problem repeats before every one has come once. A run resumed from a checkpoint
taken after step s therefore repeats, from there on, exactly what the uninterrupted run did.

The output folder (DESIGN.md, "The command line and its output folder"):
config.json, metrics.jsonl, eval.jsonl, adapter/, checkpoint/, and learning_curve.png.
"""

import contextlib
import functools
import json
import math
import random
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minirl import distributed
from minirl.cli import load_model_for_cli, run_cli
from minirl.config import RESUMABLE, TrainConfig, build_parser, config_from_args, resumed_config
from minirl.errors import InputError
from minirl.evaluate import accuracy
from minirl.files import append_line, write_atomic
from minirl.generate import generate
from minirl.lora import add_lora, lora_parameters, parse_layers, parse_targets, save_adapter
from minirl.rl import grpo, sgrpo, tspmo
from minirl.run_state import latest_checkpoint, load_checkpoint, lock_run_folder, save_checkpoint, truncate_jsonl
from minirl.report import plot_learning_curve, summary_table
from minirl.reward import resolve_reward
from minirl.tasks import Problem, load_task, shuffled
from minirl.tokenizer import format_prompt

RUN_FILES = ("config.json", "metrics.jsonl", "eval.jsonl", "adapter", "checkpoint", "learning_curve.png")


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class Draw:
    """One problem of the current step on this rank, and the generators all its random choices come from."""
    key: str  # the problem's index in the train split: its name in the replay buffer
    problem: Problem
    prompt: list[int]
    rng: random.Random  # replay cuts
    sampler: torch.Generator  # sampling
    subsets: torch.Generator  # S-GRPO's token subsets


@functools.lru_cache(maxsize=4)
def pass_order(seed: int, n: int, number: int) -> list[int]:
    """Pass `number` over a train split of n problems: a shuffle seeded by (seed, pass)."""
    return shuffled(n, random.Random(seed * 1_000_003 + number))


def draw_index(seed: int, n: int, draw: int) -> int:
    """The train-split index of a run's draw-th problem (0-based): passes without repeats."""
    return pass_order(seed, n, draw // n)[draw % n]


def proc_bytes(field: str) -> int:
    """A field of Linux's /proc/self/status (VmRSS, VmHWM, …) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss():
    """VmHWM ← VmRSS: the process's peak resident set starts again from now (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def reset_peak_memory(device: str):
    """Start a step's high-water mark: CUDA's allocator peak, or on Linux the process's peak RSS."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        reset_peak_rss()
    except OSError:
        pass  # elsewhere the figure stays the process's peak so far (README, Limits)


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    try:
        return proc_bytes("VmHWM")
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def sample_group(model, root: list[int], cfg: TrainConfig, max_new_tokens: int, stop_ids: list[int], generator):
    """G continuations of `root`, sampled gen_batch at a time (all at once when gen_batch is 0)."""
    G, chunk = cfg.group_size, cfg.gen_batch or cfg.group_size
    completions = []
    for begin in range(0, G, chunk):
        completions += generate(model, [root] * min(chunk, G - begin), max_new_tokens, cfg.temperature, stop_ids,
                                generator)
    return completions


def gradients_finite(params) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)


def prepare_folder(out: Path, resume: bool, overwrite: bool):
    """A fresh run needs an empty folder, or --overwrite to clear another run's files out of it."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file, expected a folder")
    if resume:
        return
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not overwrite:
        raise InputError(f"--out {out}: holds another run ({', '.join(held)}); --resume it, choose another "
                         f"folder, or pass --overwrite to delete it")
    for name in held:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()


def train(cfg: TrainConfig, model, tokenizer, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """Run cfg.steps steps; returns {"base": accuracy at step 0, "final": accuracy at the end, "n": test size}.

    Every input is checked before the run folder is touched; then the folder is held (run.lock) while training.
    """
    out = Path(cfg.out)
    targets = parse_targets(cfg.lora_targets)
    layers = parse_layers(cfg.lora_layers, model.config.num_hidden_layers)
    train_set = load_task(cfg.task, "train", digits=cfg.digits, seed=cfg.seed, path=cfg.train_file)
    test_set = load_task(cfg.task, "test", n=cfg.eval_n, digits=cfg.digits, path=cfg.test_file)
    reward = resolve_reward(cfg.reward, train_set + test_set)
    encode = lambda p: tokenizer.encode(format_prompt(p.question, cfg.prompt_style, tokenizer=tokenizer))  # noqa: E731
    longest = max(len(encode(p)) for p in test_set[:50])
    if longest + cfg.max_new_tokens > model.config.max_position_embeddings:
        raise InputError(f"--max-new-tokens {cfg.max_new_tokens}: prompts of up to {longest} tokens plus new tokens "
                         f"exceed the model's max_position_embeddings ({model.config.max_position_embeddings})")
    add_lora(model, targets=targets, layers=layers, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
             generator=torch.Generator().manual_seed(cfg.seed))
    model.checkpoint_layers = cfg.checkpoint_layers
    prepare_folder(out, resume, overwrite)
    with contextlib.ExitStack() as held:
        if distributed.world()[0] == 0:
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(lock_run_folder(out))
        return run(cfg, model, tokenizer, Inputs(train_set, test_set, encode, reward), resume, log)


@dataclass
class Inputs:
    """What train() checked before touching the run folder."""
    train_set: list[Problem]
    test_set: list[Problem]
    encode: object  # Problem -> prompt token ids, in the run's prompt style
    reward: object  # (completion text, answer) -> float


def run(cfg: TrainConfig, model, tokenizer, inputs: Inputs, resume: bool, log) -> dict:
    """train()'s loop, in a folder that is checked and held."""
    rank, world_size = distributed.world()
    lead = rank == 0
    log = log if lead else (lambda *a, **k: None)
    out, train_set, test_set, encode, reward = Path(cfg.out), inputs.train_set, inputs.test_set, inputs.encode, inputs.reward
    params = lora_parameters(model)
    optimizer = make_optimizer(cfg, params)
    replay = tspmo.ReplayBuffer(cfg.replay_threshold)
    stops = list(tokenizer.eos_token_ids)

    # ---- the run folder: fresh, or the state of the last checkpoint
    start, bad_in_row, evals, trained = 0, 0, [], 0.0  # trained: seconds of training steps so far
    if resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise InputError(f"--resume {out}: no complete checkpoint in {out / 'checkpoint'}")
        check_same_run(checkpoint / "config.json", cfg)
        start, bad_in_row = load_checkpoint(checkpoint, model, optimizer, replay)
        if cfg.steps < start:
            raise InputError(f"--steps {cfg.steps}: the run is already at step {start}; give --steps ≥ {start}")
        if lead:
            trained = sum(m["seconds"] for m in truncate_jsonl(out / "metrics.jsonl", start))
            evals = truncate_jsonl(out / "eval.jsonl", start)
            if not evals or evals[0]["step"] != 0:
                raise InputError(f"{out / 'eval.jsonl'}: no step-0 line, so the base model's accuracy is lost; "
                                 f"start a fresh run instead of resuming")
    if lead:
        write_atomic(out / "config.json", (json.dumps(asdict(cfg), indent=2) + "\n").encode())

    def evaluate(step) -> dict:
        record = {"step": step, "accuracy": accuracy(model, tokenizer, test_set, cfg.prompt_style, cfg.max_new_tokens,
                                                     reward=reward),
                  "n": len(test_set), "split": "test"}
        append_line(out / "eval.jsonl", record)
        return record

    if resume and lead:
        log(f"resumed from {checkpoint} at step {start}: base accuracy {100 * evals[0]['accuracy']:.1f}%, "
            f"{100 * evals[-1]['accuracy']:.1f}% at step {evals[-1]['step']}")
    if resume and start == cfg.steps:
        log(f"the run is complete ({cfg.steps} steps): nothing to do; --steps N continues it")
        return {"base": evals and evals[0]["accuracy"], "final": evals and evals[-1]["accuracy"], "n": len(test_set)}
    if not resume and lead:
        evals = [evaluate(0)]
        log(f"step 0: base accuracy {100 * evals[0]['accuracy']:.1f}% on {len(test_set)} held-out problems")

    # ---- what the method's train_step calls (rl/__init__.py)
    n_problems = world_size * cfg.problems_per_step
    counts = {}

    def sample(draw: Draw, root: list[int], max_new_tokens: int) -> list[list[int]]:
        t0 = time.perf_counter()
        completions = sample_group(model, root, cfg, max_new_tokens, stops, draw.sampler)
        counts["gen_seconds"] += time.perf_counter() - t0
        counts["gen_tokens"] += sum(map(len, completions))
        return completions

    def score(draw: Draw, answer: list[int]) -> float:
        return reward(tokenizer.decode(answer), draw.problem.answer)

    def last_good() -> str:
        last = latest_checkpoint(out)
        return f"The last good checkpoint is {last}" if last else "No checkpoint was written yet"

    def optimizer_step(has_signal: bool, loss: float):
        nonlocal bad_in_row
        signal, loss = distributed.all_sum([float(has_signal), loss])
        if signal == 0:  # no group of this round, on any rank, carried a signal: no step at all
            optimizer.zero_grad(set_to_none=True)
            return
        distributed.average_gradients(params, n_problems)
        if math.isfinite(loss) and gradients_finite(params):
            optimizer.step()
            if not all(bool(torch.isfinite(p).all()) for p in params):  # finite gradients, yet an overflowing step
                raise TrainingDiverged(f"the LoRA weights became non-finite at step {step}; stopping. " + last_good())
            counts["updates"] += 1
            bad_in_row = 0
        else:
            counts["skipped_nonfinite"] += 1
            bad_in_row += 1
            log(f"step {step}: non-finite loss or gradient, update skipped ({bad_in_row} in a row)")
            if bad_in_row >= cfg.max_bad_steps:
                raise TrainingDiverged(f"{bad_in_row} non-finite updates in a row at step {step}; stopping. " + last_good())
        optimizer.zero_grad(set_to_none=True)

    train_step = method_step(cfg, model, replay, stops, sample, score, optimizer_step)

    def draw(step: int, b: int) -> Draw:
        j = rank * cfg.problems_per_step + b  # this problem's place among all ranks' problems of the step
        index = draw_index(cfg.seed, len(train_set), (step - 1) * n_problems + j)
        seed = ((cfg.seed * 1_000_003 + step) * 1_009 + j) % 2**63
        return Draw(str(index), train_set[index], encode(train_set[index]), random.Random(seed),
                    torch.Generator(device=cfg.device).manual_seed(seed), torch.Generator().manual_seed(seed))

    # ---- the loop
    every, window = max(1, cfg.steps // 20), []
    t_begin = printed = time.perf_counter()
    for step in range(start + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        reset_peak_memory(cfg.device)
        counts.update(updates=0, skipped_nonfinite=0, gen_seconds=0.0, gen_tokens=0)
        stats = train_step([draw(step, b) for b in range(cfg.problems_per_step)])
        reward_sum, reward_count, loss, n_terms, n_computed = distributed.all_sum(
            [sum(stats.rewards), len(stats.rewards), stats.loss, stats.n_loss_terms, stats.n_computed])
        seconds = time.perf_counter() - t0
        trained += seconds
        last = step == cfg.steps or bool(distributed.all_max(int(0 < cfg.max_minutes * 60 <= trained)))
        metrics = {"step": step, "method": cfg.method, "reward_mean": reward_sum / reward_count, "loss": loss,
                   "n_loss_terms": int(n_terms), "n_computed": int(n_computed), "updates": counts["updates"],
                   "skipped_nonfinite": counts["skipped_nonfinite"],
                   "gen_tokens_per_s": counts["gen_tokens"] / max(counts["gen_seconds"], 1e-9),
                   "peak_mem_bytes": peak_memory_bytes(cfg.device), "seconds": seconds}
        if lead:
            append_line(out / "metrics.jsonl", metrics)
            if step % cfg.eval_every == 0 or last:
                evals.append(evaluate(step))
            if step % cfg.checkpoint_every == 0 or last:
                save_checkpoint(out, step, model, optimizer, replay.state_dict(), bad_in_row)
        distributed.barrier()
        window.append(seconds)
        if lead and (step % every == 0 or last or time.perf_counter() - printed > 60):  # a line a minute at least
            left = (time.perf_counter() - t_begin) / (step - start) * (cfg.steps - step)
            left = max(0.0, min(left, cfg.max_minutes * 60 - trained)) if cfg.max_minutes else left
            log(f"step {step}/{cfg.steps} | reward {metrics['reward_mean']:.2f} | accuracy "
                f"{100 * evals[-1]['accuracy']:.1f}% (step {evals[-1]['step']}) | "
                f"{sum(window) / len(window):.2f} s/step | {left / 60:.1f} min left")
            window, printed = [], time.perf_counter()
        if last and step < cfg.steps:
            log(f"stopped at step {step}: the training steps took {trained / 60:.1f} min (--max-minutes "
                f"{cfg.max_minutes:g}); --resume continues it")
            break

    if not lead:  # only rank 0 evaluates
        return {"base": None, "final": None, "n": len(test_set)}
    save_adapter(model, out / "adapter", base_model_name_or_path=cfg.model or "minirl-tiny")
    return {"base": evals[0]["accuracy"], "final": evals[-1]["accuracy"], "n": len(test_set)}


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.AdamW:
    """AdamW over the LoRA matrices. T-SPMO's penalty λ Σ‖W‖² is its decoupled weight decay 2λ, applied with
    each update (rl/tspmo.py says why it is not in the loss); the other methods have none."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=2 * cfg.lam if cfg.method == "tspmo" else 0.0)


def method_step(cfg: TrainConfig, model, replay, stops, sample, score, optimizer_step):
    """The chosen method's train_step with this run's settings: a function of the step's draws."""
    common = dict(temperature=cfg.temperature, train_batch=cfg.train_batch, max_new_tokens=cfg.max_new_tokens)
    if cfg.method == "grpo":
        return functools.partial(grpo.train_step, model, sample=sample, score=score, optimizer_step=optimizer_step,
                                 beta=cfg.beta, **common)
    if cfg.method == "sgrpo":
        return functools.partial(sgrpo.train_step, model, sample=sample, score=score, optimizer_step=optimizer_step,
                                 alpha=cfg.sgrpo_alpha, k=cfg.sgrpo_k, p=cfg.sgrpo_p, beta=cfg.beta, **common)
    return functools.partial(tspmo.train_step, model, sample=sample, score=score, optimizer_step=optimizer_step,
                             replay=replay, tree_pack=cfg.tree_pack, replay_success=cfg.replay_success,
                             replay_failure=cfg.replay_failure, stop_ids=stops, **common)


def check_same_run(saved: Path, cfg: TrainConfig):
    """A checkpoint must come from this run: its settings equal the run's, but for those a resume may change."""
    try:
        theirs = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{saved}: unreadable checkpoint settings ({e})") from None
    ours = asdict(cfg)
    differ = [k for k in ours if k not in RESUMABLE + ("out", "device") and (not isinstance(theirs, dict) or theirs.get(k) != ours[k])]
    if differ:
        theirs_value = theirs.get(differ[0]) if isinstance(theirs, dict) else theirs
        raise InputError(f"{saved}: the checkpoint was taken by another run ({differ[0]} is {theirs_value!r}, "
                         f"the run's is {ours[differ[0]]!r})")


# ----------------------------------------------------------------------------- command line


def main(argv=None):
    def run(args):
        cfg = resumed_config(args) if args.resume is not None else None
        if cfg is not None:
            args.model, args.dtype, args.device = cfg.model, cfg.dtype, cfg.device
        args.device = distributed.init(args.device or "cpu")
        model, tokenizer, defaults = load_model_for_cli(args)
        cfg = cfg or config_from_args(args, defaults)
        cfg.device = args.device
        torch.manual_seed(cfg.seed)
        lead = distributed.world()[0] == 0
        say = print if lead else (lambda *a, **k: None)
        say(f"minirl.train: {cfg.method} on {cfg.task}, model {cfg.model or 'built-in tiny'}, G = {cfg.group_size}, "
            f"{cfg.steps} steps, {distributed.world()[1]} rank(s), output in {cfg.out}")
        try:
            result = train(cfg, model, tokenizer, resume=args.resume is not None, overwrite=args.overwrite)
        except TrainingDiverged as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1)
        if lead:
            say(summary_table(cfg.method, result))
            say(plot_learning_curve(Path(cfg.out)))
        distributed.close()

    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
