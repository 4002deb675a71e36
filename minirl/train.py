"""Train LoRA adapters with GRPO, S-GRPO or T-SPMO: `python -m minirl.train --method tspmo`.

One training step takes one problem (the paper's batch of one), samples a group of G completions
from its prompt, scores them with the task's reward, and makes one update per group — for T-SPMO
also one per replayed group (rl/tspmo.py). With no `--model` the built-in tiny model is used, with the
settings it was tuned with; with a Hugging Face Qwen2 folder every knob defaults to the paper's value.

Every random choice of step s (the problem, the samples, S-GRPO's token subsets, the replay cuts)
is drawn from generators seeded with (seed, s). So a run resumed from a checkpoint taken after step
s repeats, from there on, exactly what the uninterrupted run did.

The output folder (DESIGN.md, "The command line and its output folder"):
config.json, metrics.jsonl, eval.jsonl, adapter/, checkpoint/, and learning_curve.png.
"""

import argparse
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minirl.cli import add_model_arguments, load_model_for_cli, non_negative, positive, run_cli
from minirl.errors import InputError
from minirl.evaluate import accuracy
from minirl.generate import generate
from minirl.lora import add_lora, load_adapter, lora_parameters, parse_layers, save_adapter
from minirl.rl import grpo, sgrpo, tspmo
from minirl.tasks import load_task, reward
from minirl.tokenizer import format_prompt

UPDATES = {"grpo": grpo.update, "sgrpo": sgrpo.update, "tspmo": tspmo.update}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the paper's (DESIGN.md, "Shared setup")."""
    method: str = "tspmo"
    model: str | None = None  # None: the built-in tiny model
    task: str = "multiplication"
    digits: int = 3
    prompt_style: str = "plain"
    steps: int = 1000
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    out: str | None = None
    group_size: int = 50  # G; 8 for GRPO and S-GRPO
    lr: float = 1e-4
    beta: float = 0.01  # β, GRPO's KL weight
    lam: float = 0.01  # λ, T-SPMO's L2 weight on the LoRA matrices
    lora_rank: int = 8  # 16 for SVAMP
    lora_alpha: float = 16.0
    lora_layers: str = "last-quarter"  # last-third for SVAMP
    lora_targets: str = "q_proj,v_proj"
    alpha: int = 8  # S-GRPO's α, k, P (rl/sgrpo.py says why)
    k: int = 32
    p: float = 0.5
    replay_success: int = 1  # C_success, C_failure, r
    replay_failure: int = 0
    replay_threshold: float = 1.0
    temperature: float = 0.3  # τ
    max_new_tokens: int = 300
    problems_per_step: int = 1  # per rank; the paper's batch is one problem per update
    train_batch: int = 8  # sequences per T-SPMO forward
    tree_pack: bool = False  # T-SPMO: the whole prefix tree in one forward (minirl/tree_pack.py)
    gen_batch: int = 0  # completions per generate call; 0 = the whole group at once
    checkpoint_layers: bool = False  # activation checkpointing in the layers that run with grad (model.py)
    eval_every: int = 100
    eval_n: int = 300
    checkpoint_every: int = 50
    max_bad_steps: int = 5  # stop after this many non-finite updates in a row


def paper_defaults(method: str, task: str) -> dict:
    """The values of DESIGN.md's shared setup that depend on the method or the task."""
    d = {"group_size": 50 if method == "tspmo" else 8}
    if task == "svamp":
        d.update(lora_rank=16, lora_alpha=32.0, lora_layers="last-third")
    return d


# ----------------------------------------------------------------------------- checkpoints


def fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_synced(path: Path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(out: Path, step: int, model, optimizer, replay_state: dict, bad_in_row: int):
    """out/checkpoint/step-NNNNNNN, written as a .tmp folder, fsynced, then renamed; older ones deleted after."""
    root = out / "checkpoint"
    root.mkdir(exist_ok=True)
    final, tmp = root / f"step-{step:07d}", root / f"step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_adapter(model, tmp / "adapter")
    state = optimizer.state_dict()
    tensors = {f"{i}.{name}": value.detach().cpu().contiguous().reshape(-1) if value.dim() == 0 else value.detach().cpu().contiguous()
               for i, s in state["state"].items() for name, value in s.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    with open(tmp / "optimizer.safetensors", "rb+") as f:
        os.fsync(f.fileno())
    meta = {"step": step, "bad_in_row": bad_in_row, "replay": replay_state}
    write_file_synced(tmp / "state.json", json.dumps(meta).encode())
    if (out / "config.json").is_file():  # the run's settings as they were at this step
        write_file_synced(tmp / "config.json", (out / "config.json").read_bytes())
    for sub in (tmp / "adapter", tmp):
        fsync_dir(sub)
    os.replace(tmp, final)  # the new checkpoint exists completely, or not at all
    fsync_dir(root)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / "checkpoint").glob("step-*") if not p.name.endswith(".tmp"))
    return done[-1] if done else None


def load_checkpoint(folder: Path, model, optimizer, replay) -> tuple[int, int]:
    """Restore LoRA weights, optimizer state, RNG and replay buffer; returns (step, bad_in_row)."""
    load_adapter(model, folder / "adapter")
    try:
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{folder / 'optimizer.safetensors'}: unreadable checkpoint ({e})") from None
    torch.set_rng_state(tensors.pop("rng.cpu"))
    cuda_rng = tensors.pop("rng.cuda", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    state = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value.reshape(()) if name == "step" else value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    try:
        meta = json.loads((folder / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{folder / 'state.json'}: unreadable checkpoint state ({e})") from None
    if not isinstance(meta, dict) or not {"step", "bad_in_row", "replay"} <= meta.keys():
        raise InputError(f"{folder / 'state.json'}: expected an object with step, bad_in_row and replay")
    replay.load_state_dict(meta["replay"])
    return meta["step"], meta["bad_in_row"]


def truncate_jsonl(path: Path, last_step: int):
    """Keep the lines of steps ≤ last_step: what the resumed run writes next must not be there twice.

    A last line without its newline was being written when the run was killed: it is dropped.
    """
    if not path.exists():
        return
    text = path.read_text()
    lines = text.split("\n")[:-1]  # a torn last line (no "\n" yet) falls off here
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise InputError(f"{path}: line {number} is not a JSON object with a 'step' field ({e})") from None
        if not isinstance(step, int):
            raise InputError(f"{path}: line {number}: field 'step' is {step!r}, expected an integer")
        if step <= last_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- the loop


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def sample_group(model, tokenizer, root: list[int], cfg: TrainConfig, generator) -> list[list[int]]:
    G, chunk = cfg.group_size, cfg.gen_batch or cfg.group_size
    completions = []
    for start in range(0, G, chunk):
        n = min(chunk, G - start)
        completions += generate(model, [root] * n, cfg.max_new_tokens, cfg.temperature, tokenizer.eos_token_id, generator)
    return completions


def gradients_finite(params) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)


class TrainingDiverged(RuntimeError):
    pass


# ----------------------------------------------------------------------------- data parallelism
# Under torchrun every rank runs this same loop on its own problems. After each round of updates the
# LoRA gradients are averaged with one all-reduce, so all ranks take the same optimizer step and keep
# identical weights. Without torchrun, world size is 1 and every collective below is the identity.


def world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_sum(values: list[float], device) -> list[float]:
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def average_gradients(params, n_slots: int):
    """grad ← (Σ over ranks of grad) / n_slots: every problem of the step weighs the same."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if world()[1] > 1:
            torch.distributed.all_reduce(p.grad)
        p.grad /= n_slots


def merged_replay_state(replay) -> dict:
    """Rank 0 checkpoints the union of every rank's buffer (they hold different problems)."""
    state = replay.state_dict()
    if world()[1] > 1:
        states = [None] * world()[1]
        torch.distributed.all_gather_object(states, state)
        for other in states:
            state["store"].update(other["store"])
    return state


# ----------------------------------------------------------------------------- the loop


@dataclass
class Slot:
    """One problem of the current step and the generators all its random choices come from."""
    index: int
    problem: object
    prompt: list[int]
    rng: random.Random
    sampler: torch.Generator
    subsets: torch.Generator
    roots: list
    rewards: list | None = None


def train(cfg: TrainConfig, model, tokenizer, resume: bool = False, log=print) -> dict:
    """Run cfg.steps steps; returns {"base": accuracy at step 0, "final": accuracy at the end, "n": test size}."""
    rank, world_size = world()
    lead = rank == 0
    log = log if lead else (lambda *a, **k: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or not targets:
        raise InputError(f"--lora-targets: {','.join(bad) or 'empty'} is not a module name, expected some of {','.join(LORA_TARGETS)}")
    layers = parse_layers(cfg.lora_layers, model.config.num_hidden_layers)
    add_lora(model, targets=targets, layers=layers, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
             generator=torch.Generator().manual_seed(cfg.seed))
    model.checkpoint_layers = cfg.checkpoint_layers
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    replay = tspmo.ReplayBuffer(cfg.replay_threshold)
    update = UPDATES[cfg.method]
    train_set = load_task(cfg.task, "train", digits=cfg.digits, seed=cfg.seed)
    test_set = load_task(cfg.task, "test", n=cfg.eval_n, digits=cfg.digits)
    encode = lambda p: tokenizer.encode(format_prompt(p.question, cfg.prompt_style))  # noqa: E731
    longest = max(len(encode(p)) for p in test_set[:50])
    if longest + cfg.max_new_tokens > model.config.max_position_embeddings:
        raise InputError(f"--max-new-tokens {cfg.max_new_tokens}: prompts of up to {longest} tokens plus new tokens "
                         f"exceed the model's max_position_embeddings ({model.config.max_position_embeddings})")

    def evaluate(step):
        acc = accuracy(model, tokenizer, test_set, cfg.prompt_style, cfg.max_new_tokens)
        with open(out / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "accuracy": acc, "n": len(test_set), "split": "test"}) + "\n")
        return acc

    start, bad_in_row = 0, 0
    checkpoint = latest_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        raise InputError(f"--resume {out}: no complete checkpoint in {out / 'checkpoint'}")
    if checkpoint is not None:
        start, bad_in_row = load_checkpoint(checkpoint, model, optimizer, replay)
        if lead:
            truncate_jsonl(out / "metrics.jsonl", start)
            truncate_jsonl(out / "eval.jsonl", start)
        log(f"resumed from {checkpoint} at step {start}")
    elif lead:
        for name in ("metrics.jsonl", "eval.jsonl"):
            (out / name).unlink(missing_ok=True)
    if lead:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()] if start and lead else []
    base = evals[0]["accuracy"] if evals else evaluate(0) if lead else 0.0
    last_acc = evals[-1]["accuracy"] if evals else base
    log(f"step 0: base accuracy {100 * base:.1f}% on {len(test_set)} held-out problems")
    t_begin, every = time.perf_counter(), max(1, cfg.steps // 20)
    n_slots = world_size * cfg.problems_per_step

    def new_slot(step, b) -> Slot:
        j = rank * cfg.problems_per_step + b  # this problem's place among all ranks' problems of the step
        seed = (cfg.seed * 1_000_003 + step) * 1_009 + j
        rng = random.Random(seed)
        index = rng.randrange(len(train_set))
        prompt = encode(train_set[index])
        return Slot(index, train_set[index], prompt, rng, torch.Generator(device=cfg.device).manual_seed(seed),
                    torch.Generator().manual_seed(seed), [prompt])

    for step in range(start + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        slots = [new_slot(step, b) for b in range(cfg.problems_per_step)]
        line = {"loss": 0.0, "n_loss_terms": 0, "n_computed": 0, "updates": 0, "skipped_nonfinite": 0}
        gen_time, gen_tokens, round_ = 0.0, 0, 0
        # Round 0 takes each problem's fresh group; later rounds its replayed groups (T-SPMO only).
        # Each round ends in one optimizer step over the gradients of all problems, on all ranks.
        while round_ == 0 or all_sum([max(len(s.roots) for s in slots)], cfg.device)[0] > 0:
            signal, round_loss = 0.0, 0.0
            for slot in slots:
                if not slot.roots:
                    continue
                root = slot.roots.pop(0)
                tg = time.perf_counter()
                completions = sample_group(model, tokenizer, root, cfg, slot.sampler)
                gen_time += time.perf_counter() - tg
                gen_tokens += sum(map(len, completions))
                tail = root[len(slot.prompt):]
                rewards = [reward(tokenizer.decode(tail + c), slot.problem.answer) for c in completions]
                stats = update(model, root, completions, rewards, cfg, slot.subsets)
                signal += 0.0 if stats.skipped and cfg.method != "tspmo" else 1.0
                round_loss += stats.loss
                line["loss"] += stats.loss
                line["n_loss_terms"] += stats.n_loss_terms
                line["n_computed"] += stats.n_computed
                if slot.rewards is None:
                    slot.rewards = rewards
                if cfg.method == "tspmo":
                    replay.add(str(slot.index), [tail + c for c in completions], rewards)
                    if round_ == 0:
                        slot.roots += replay.roots(str(slot.index), slot.prompt, cfg.replay_success,
                                                   cfg.replay_failure, tokenizer.eos_token_id, slot.rng)
            round_ += 1
            signal, round_loss = all_sum([signal, round_loss], cfg.device)
            if signal == 0:  # no group of this round carried a reward difference: no step at all
                optimizer.zero_grad(set_to_none=True)
                continue
            average_gradients(params, n_slots)
            if math.isfinite(round_loss) and gradients_finite(params):
                optimizer.step()
                line["updates"] += 1
                bad_in_row = 0
            else:
                line["skipped_nonfinite"] += 1
                bad_in_row += 1
                log(f"step {step}: non-finite loss or gradient, update skipped ({bad_in_row} in a row)")
                if bad_in_row >= cfg.max_bad_steps:
                    raise TrainingDiverged(f"{bad_in_row} non-finite updates in a row at step {step}; stopping. "
                                           f"The last good checkpoint is in {out / 'checkpoint'}")
            optimizer.zero_grad(set_to_none=True)

        main_rewards = [r for s in slots for r in s.rewards]
        reward_sum, reward_count, *totals = all_sum(
            [sum(main_rewards), len(main_rewards), line["loss"], line["n_loss_terms"], line["n_computed"]], cfg.device)
        line.update(loss=totals[0], n_loss_terms=int(totals[1]), n_computed=int(totals[2]))
        seconds = time.perf_counter() - t0
        metrics = {"step": step, "method": cfg.method, "reward_mean": reward_sum / reward_count, **line,
                   "gen_tokens_per_s": gen_tokens / max(gen_time, 1e-9), "peak_mem_bytes": peak_memory_bytes(cfg.device),
                   "seconds": seconds}
        replay_state = merged_replay_state(replay) if step % cfg.checkpoint_every == 0 or step == cfg.steps else None
        if lead:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                last_acc = evaluate(step)
            if replay_state is not None:
                save_checkpoint(out, step, model, optimizer, replay_state, bad_in_row)
        if world_size > 1:
            torch.distributed.barrier()
        if step % every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - t_begin
            left = elapsed / (step - start) * (cfg.steps - step)
            log(f"step {step}/{cfg.steps} | reward {metrics['reward_mean']:.2f} | accuracy {100 * last_acc:.1f}% "
                f"| {seconds:.2f} s/step | {left / 60:.1f} min left")

    if lead:
        save_adapter(model, out / "adapter", base_model_name_or_path=cfg.model or "minirl-tiny")
    return {"base": base, "final": last_acc, "n": len(test_set)}


# ----------------------------------------------------------------------------- summary and plot


def plot_learning_curve(out: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no learning_curve.png: matplotlib is not installed (pip install 'minirl[plot]')"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    steps, rewards = [m["step"] for m in metrics], [m["reward_mean"] for m in metrics]
    window = max(1, len(rewards) // 20)
    smooth = [sum(rewards[max(0, i - window + 1):i + 1]) / len(rewards[max(0, i - window + 1):i + 1]) for i in range(len(rewards))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, smooth, label=f"group reward (mean of {window} steps)", alpha=0.7)
    ax.plot([e["step"] for e in evals], [e["accuracy"] for e in evals], "o-", label="held-out accuracy (greedy)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(f"{json.loads((out / 'config.json').read_text())['method']} on the {out.name} run")
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=120)
    plt.close(fig)
    return f"learning curve: {out / 'learning_curve.png'}"


def summary_table(method: str, result: dict) -> str:
    rows = [("base model", result["base"]), (f"after {method.upper()}", result["final"])]
    lines = [f"{'':<16}{'accuracy':>10}{'n':>7}"]
    lines += [f"{name:<16}{100 * acc:>9.1f}%{result['n']:>7}" for name, acc in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m minirl.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="tspmo", choices=sorted(UPDATES), help="the RL method (default: tspmo)")
    add_model_arguments(ap)
    add = ap.add_argument
    add("--steps", type=positive(int), help="training steps, one problem each (default: 1000; tiny model: its own)")
    add("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    add("--out", help="output folder (default: runs/<method>-<task>-<time>)")
    add("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    add("--group-size", type=positive(int), help="G, completions per group (paper: 50 for T-SPMO, 8 otherwise)")
    add("--lr", type=positive(float), help="AdamW learning rate (paper: 1e-4)")
    add("--beta", type=non_negative(float), help="β, KL weight of GRPO and S-GRPO (paper: 0.01)")
    add("--lam", type=non_negative(float), help="λ, L2 weight on LoRA matrices in T-SPMO (paper: 0.01)")
    add("--lora-rank", type=positive(int), help="LoRA rank (paper: 8 multiplication, 16 SVAMP)")
    add("--lora-alpha", type=positive(float), help="LoRA scale numerator (default: 2 × rank)")
    add("--lora-layers", help="adapted layers: all, last-third, last-quarter, last-half, last:N, a fraction, or 0,3,5 "
                              "(paper: last-quarter multiplication, last-third SVAMP)")
    add("--lora-targets", help="comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (paper: q_proj,v_proj)")
    add("--alpha", type=non_negative(int), help="S-GRPO α: leading tokens always kept (default: 8)")
    add("--k", type=positive(int), help="S-GRPO k: at most this many tokens kept per completion (default: 32)")
    add("--p", type=float, help="S-GRPO P: keep probability after the first α tokens (default: 0.5)")
    add("--replay-success", type=non_negative(int), help="T-SPMO C_success: replayed successes per step (default: 1)")
    add("--replay-failure", type=non_negative(int), help="T-SPMO C_failure: replayed failures per step (default: 0)")
    add("--replay-threshold", type=float, help="T-SPMO r: a completion with reward ≥ r is a success (default: 1.0)")
    add("--temperature", type=positive(float), help="τ, sampling temperature (paper: 0.3)")
    add("--max-new-tokens", type=positive(int), help="longest completion (paper: 300)")
    add("--problems-per-step", type=positive(int), help="problems per optimizer step on each rank (paper: 1)")
    add("--train-batch", type=positive(int), help="sequences per T-SPMO training forward (default: 8)")
    add("--tree-pack", action="store_true", default=None,
        help="T-SPMO: run the group's prefix tree as one sequence, each shared token once; pays off when "
             "completions share long prefixes, costs a T×T attention mask when they do not (default: off)")
    add("--gen-batch", type=non_negative(int), help="completions per generate call, 0 = all G at once (default: 0)")
    add("--checkpoint-layers", action="store_true", default=None,
        help="activation checkpointing in the adapted layers: each keeps only its input, the backward recomputes "
             "the rest one layer at a time; less memory, one more forward of those layers (default: off)")
    add("--eval-every", type=positive(int), help="steps between evaluations (default: 100)")
    add("--eval-n", type=positive(int), help="held-out problems per evaluation (default: 300)")
    add("--checkpoint-every", type=positive(int), help="steps between checkpoints (default: 50)")
    add("--max-bad-steps", type=positive(int), help="stop after this many non-finite updates in a row (default: 5)")
    return ap


def config_from_args(args, defaults: dict) -> TrainConfig:
    """Explicit flags win, then the tiny model's tuned settings (no --model), then the paper's defaults."""
    merged = {f.name: f.default for f in fields(TrainConfig)}
    merged.update(paper_defaults(args.method, args.task))
    merged.update({k: v for k, v in defaults.items() if k in merged})
    if args.lora_rank is not None and args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank
    merged.update({k: v for k, v in vars(args).items() if k in merged and v is not None})
    cfg = TrainConfig(**merged)
    if not 0 <= cfg.p <= 1:
        raise InputError(f"--p {cfg.p}: expected a probability in [0, 1]")
    if cfg.out is None:
        cfg.out = f"runs/{cfg.method}-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg


def init_distributed(args):
    """Under torchrun (WORLD_SIZE > 1): join the process group; nccl on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    cuda = args.device.startswith("cuda")
    if cuda:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(args.device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")


def main(argv=None):
    def run(args):
        cfg = None
        if args.resume:
            saved = Path(args.resume) / "config.json"
            if not saved.is_file():
                raise InputError(f"--resume {args.resume}: no config.json there (not a minirl run folder)")
            try:
                cfg = TrainConfig(**json.loads(saved.read_text()))
            except (json.JSONDecodeError, TypeError) as e:
                raise InputError(f"{saved}: not a minirl run config ({e})") from None
            cfg.out, cfg.steps = args.resume, args.steps or cfg.steps
            args.model, args.dtype, args.device = cfg.model, cfg.dtype, cfg.device
        init_distributed(args)
        model, tokenizer, defaults = load_model_for_cli(args)
        cfg = cfg or config_from_args(args, defaults)
        cfg.device = args.device
        torch.manual_seed(cfg.seed)
        lead = world()[0] == 0
        say = print if lead else (lambda *a, **k: None)
        say(f"minirl.train: {cfg.method} on {cfg.task}, model {cfg.model or 'built-in tiny'}, G = {cfg.group_size}, "
              f"{cfg.steps} steps, {world()[1]} rank(s), output in {cfg.out}")
        try:
            result = train(cfg, model, tokenizer, resume=bool(args.resume))
        except TrainingDiverged as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1)
        say(summary_table(cfg.method, result))
        if lead:
            say(plot_learning_curve(Path(cfg.out)))
        if world()[1] > 1:
            torch.distributed.destroy_process_group()

    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
