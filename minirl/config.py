"""The settings of a training run, where they come from, and the `python -m minirl.train` command line.

A setting takes, in order: the flag given on the command line; else, on the built-in tiny model, the
value it was tuned with (minirl/data/tiny/recipe.json, "train_defaults"); else the paper's default
(DESIGN.md, "Shared setup"). `--help` prints both defaults beside each flag that has two.
A resumed run takes config.json from its folder and accepts only the flags that may change on a
resume (RESUMABLE); any other flag is refused rather than silently ignored.
"""

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from minirl.cli import ArgumentParser, add_model_arguments, task_file, tiny_defaults
from minirl.errors import InputError
from minirl.tasks import TASKS, load_task

METHODS = ("grpo", "sgrpo", "tspmo")
RESUMABLE = ("steps", "max_minutes", "eval_every", "checkpoint_every")  # may change when a run is resumed


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the paper's."""
    method: str = "tspmo"
    model: str | None = None  # None: the built-in tiny model
    task: str = "multiplication"
    train_file: str | None = None  # --task jsonl: the user's problems (tasks.py)
    test_file: str | None = None
    reward: str = "last-integer"  # or numeric, or module:function (reward.py)
    digits: int = 3
    prompt_style: str = "plain"
    steps: int = 1000
    max_minutes: float = 0.0  # stop once the training steps (evaluations not counted) took this long; 0: no limit
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
    sgrpo_alpha: int = 8  # S-GRPO's α, k, P (rl/sgrpo.py says why)
    sgrpo_k: int = 32
    sgrpo_p: float = 0.5
    replay_success: int = 1  # C_success, C_failure, r
    replay_failure: int = 0
    replay_threshold: float = 1.0
    temperature: float = 0.3  # τ
    max_new_tokens: int = 300
    problems_per_step: int = 1  # per rank; the paper's batch is one problem per update
    train_batch: int = 8  # completions per training forward and backward (every method)
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


# ----------------------------------------------------------------------------- checks

def _integer(lo, hi=None):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def _number(lo, low_open=False, hi=None):
    def ok(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > lo if low_open else v >= lo) and (hi is None or v <= hi)
    return ok


def _one_of(*values):
    return lambda v: v in values


def _text(v):
    return isinstance(v, str) and v.strip() != ""


CHECKS = {  # field: (test, what a good value is)
    "method": (_one_of(*METHODS), f"one of {', '.join(METHODS)}"),
    "model": (lambda v: v is None or _text(v), "null (the tiny model) or a folder"),
    "task": (_one_of(*TASKS), f"one of {', '.join(TASKS)}"),
    "train_file": (lambda v: v is None or _text(v), "null or a file"),
    "test_file": (lambda v: v is None or _text(v), "null or a file"),
    "reward": (_text, "last-integer, numeric or module:function"),
    "digits": (_integer(1, 8), "an integer from 1 to 8"),
    "prompt_style": (_one_of("plain", "chatml", "template"), "plain, chatml or template"),
    "steps": (_integer(1), "a positive integer"),
    "max_minutes": (_number(0), "a finite number ≥ 0 (0: no limit)"),
    "seed": (_integer(0, 2**63 - 1), "an integer in [0, 2^63)"),
    "device": (_text, "a device such as cpu or cuda:0"),
    "dtype": (_one_of("fp32", "bf16", "fp16"), "fp32, bf16 or fp16"),
    "out": (_text, "a folder"),
    "group_size": (_integer(1), "a positive integer"),
    "lr": (_number(0, low_open=True), "a finite number > 0"),
    "beta": (_number(0), "a finite number ≥ 0"),
    "lam": (_number(0), "a finite number ≥ 0"),
    "lora_rank": (_integer(1), "a positive integer"),
    "lora_alpha": (_number(0, low_open=True), "a finite number > 0"),
    "lora_layers": (_text, "a layer spec"),
    "lora_targets": (_text, "a comma list of module names"),
    "sgrpo_alpha": (_integer(0), "a non-negative integer"),
    "sgrpo_k": (_integer(1), "a positive integer"),
    "sgrpo_p": (_number(0, hi=1), "a probability in [0, 1]"),
    "replay_success": (_integer(0), "a non-negative integer"),
    "replay_failure": (_integer(0), "a non-negative integer"),
    "replay_threshold": (_number(-math.inf), "a finite number"),
    "temperature": (_number(0, low_open=True), "a finite number > 0"),
    "max_new_tokens": (_integer(1), "a positive integer"),
    "problems_per_step": (_integer(1), "a positive integer"),
    "train_batch": (_integer(1), "a positive integer"),
    "tree_pack": (_one_of(True, False), "true or false"),
    "gen_batch": (_integer(0), "a non-negative integer"),
    "checkpoint_layers": (_one_of(True, False), "true or false"),
    "eval_every": (_integer(1), "a positive integer"),
    "eval_n": (_integer(1), "a positive integer"),
    "checkpoint_every": (_integer(1), "a positive integer"),
    "max_bad_steps": (_integer(1), "a positive integer"),
}
FLAGS = {"sgrpo_alpha": "--alpha", "sgrpo_k": "--k", "sgrpo_p": "--p"}  # fields whose flag is not --field-name


def flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def validate(cfg: TrainConfig, source: str | None = None) -> TrainConfig:
    """Every field against CHECKS; the error names the flag (source None) or the file's field."""
    for name, (ok, expected) in CHECKS.items():
        value = getattr(cfg, name)
        if not ok(value):
            where = f"{flag(name)} {value}" if source is None else f"{source}: field '{name}' is {value!r}"
            raise InputError(f"{where}: expected {expected}")
    return cfg


# ----------------------------------------------------------------------------- the command line

def build_parser() -> argparse.ArgumentParser:
    tiny = tiny_defaults()
    paper = asdict(TrainConfig())

    def default(name, paper_text=None) -> str:
        """'(default: X)', or '(paper: X; tiny model: Y)' where the tiny model was tuned otherwise."""
        text = paper_text or str(paper[name])
        if name in tiny and str(tiny[name]) != str(paper[name]):
            return f"(paper: {text}; tiny model: {tiny[name]})"
        return f"(default: {text})"

    ap = ArgumentParser(prog="python -m minirl.train", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--method", choices=METHODS, help="the RL method (default: tspmo)")
    add_model_arguments(ap)
    add("--steps", type=int, help=f"training steps, one problem each per rank {default('steps')}")
    add("--max-minutes", type=float, help="stop early, with a checkpoint and a final evaluation, once the training "
                                           "steps took this many minutes, evaluations not counted (default: 0, no limit)")
    add("--seed", type=int, help="seed of every random choice (default: 0)")
    add("--out", help="output folder (default: runs/<method>-<task>-<time>)")
    add("--overwrite", action="store_true", help="start afresh in an --out that holds another run, deleting it")
    add("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint; only --steps, "
                                        "--max-minutes, --eval-every and --checkpoint-every may be given with it")
    add("--group-size", type=int, help=f"G, completions per group {default('group_size', '50 for T-SPMO, 8 otherwise')}")
    add("--lr", type=float, help=f"AdamW learning rate {default('lr')}")
    add("--beta", type=float, help=f"β, KL weight of GRPO and S-GRPO {default('beta')}")
    add("--lam", type=float, help=f"λ, L2 weight on LoRA matrices in T-SPMO {default('lam')}")
    add("--lora-rank", type=int, help=f"LoRA rank {default('lora_rank', '8; 16 for SVAMP')}")
    add("--lora-alpha", type=float, help="LoRA scale numerator (default: 2 × rank)")
    add("--lora-layers", help="adapted layers: all, last-third, last-quarter, last-half, last:N, a fraction, or 0,3,5 "
                              f"{default('lora_layers', 'last-quarter; last-third for SVAMP')}")
    add("--lora-targets", help=f"comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj {default('lora_targets')}")
    add("--alpha", dest="sgrpo_alpha", type=int, help=f"S-GRPO α: leading tokens always kept {default('sgrpo_alpha')}")
    add("--k", dest="sgrpo_k", type=int, help=f"S-GRPO k: at most this many tokens kept per completion {default('sgrpo_k')}")
    add("--p", dest="sgrpo_p", type=float, help=f"S-GRPO P: keep probability after the first α tokens {default('sgrpo_p')}")
    add("--replay-success", type=int, help=f"T-SPMO C_success: replayed successes per step {default('replay_success')}")
    add("--replay-failure", type=int, help=f"T-SPMO C_failure: replayed failures per step {default('replay_failure')}")
    add("--replay-threshold", type=float, help=f"T-SPMO r: an answer with reward ≥ r is a success {default('replay_threshold')}")
    add("--temperature", type=float, help=f"τ, sampling temperature {default('temperature')}")
    add("--max-new-tokens", type=int, help=f"longest answer, replayed part included {default('max_new_tokens')}")
    add("--problems-per-step", type=int, help=f"problems per optimizer step on each rank {default('problems_per_step')}")
    add("--train-batch", type=int, help=f"completions per training forward and backward {default('train_batch')}")
    add("--tree-pack", action="store_true", default=None,
        help="T-SPMO: run the group's prefix tree as one sequence, each shared token once; pays off when "
             "completions share long prefixes, costs a T×T attention mask when they do not (default: off)")
    add("--gen-batch", type=int, help="completions per generate call, 0 = all G at once (default: 0)")
    add("--checkpoint-layers", action="store_true", default=None,
        help="activation checkpointing in the adapted layers: each keeps only its input, the backward recomputes "
             "the rest one layer at a time; less memory, one more forward of those layers (default: off)")
    add("--eval-every", type=int, help=f"steps between evaluations {default('eval_every')}")
    add("--eval-n", type=int, help=f"held-out problems per evaluation, the first N of the test split {default('eval_n')}")
    add("--checkpoint-every", type=int, help=f"steps between checkpoints {default('checkpoint_every')}")
    add("--max-bad-steps", type=int, help=f"stop after this many non-finite updates in a row {default('max_bad_steps')}")
    return ap


def given_settings(args) -> dict:
    """The TrainConfig fields the command line set explicitly."""
    names = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def config_from_args(args, defaults: dict) -> TrainConfig:
    """Explicit flags win, then the tiny model's tuned settings (no --model), then the paper's defaults."""
    given = given_settings(args)
    task_file(args, "train"), task_file(args, "test")  # the task's flags fit together
    method, task = given.get("method", "tspmo"), given.get("task", "multiplication")
    merged = {f.name: f.default for f in fields(TrainConfig)}
    merged.update(paper_defaults(method, task))
    merged.update({k: v for k, v in defaults.items() if k in merged})
    if "lora_rank" in given and "lora_alpha" not in given:
        given["lora_alpha"] = 2.0 * given["lora_rank"]
    merged.update(given)
    if merged["out"] is None:
        merged["out"] = f"runs/{merged['method']}-{merged['task']}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = validate(TrainConfig(**merged))
    available = len(load_task(cfg.task, "test", digits=cfg.digits, path=cfg.test_file))
    if cfg.eval_n > available:  # a default larger than the split shrinks to it; a flag must fit
        if "eval_n" in given:
            raise InputError(f"--eval-n {cfg.eval_n}: the {cfg.task} test split has only {available} problems")
        cfg.eval_n = available
    return cfg


def resumed_config(args) -> TrainConfig:
    """The run's own config.json, with the flags that may change on a resume applied; any other flag is refused."""
    if not args.resume.strip():
        raise InputError("--resume: expected a run folder, got an empty path")
    saved = Path(args.resume) / "config.json"
    if not saved.is_file():
        raise InputError(f"--resume {args.resume}: no config.json there (not a minirl run folder)")
    given = given_settings(args)
    refused = [name for name in given if name not in RESUMABLE]
    if refused or args.overwrite:
        names = ", ".join(flag(n) for n in refused) or "--overwrite"
        raise InputError(f"--resume {args.resume}: {names} cannot change on a resume (the run's config.json fixes "
                         f"it); only {', '.join(flag(n) for n in RESUMABLE)} may be given")
    try:
        d = json.loads(saved.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{saved}: expected UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{saved}: not valid JSON ({e})") from None
    names = {f.name for f in fields(TrainConfig)}
    if not isinstance(d, dict) or set(d) != names:
        missing, extra = sorted(names - set(d or {})), sorted(set(d or {}) - names) if isinstance(d, dict) else []
        raise InputError(f"{saved}: not a minirl run config (missing {missing or 'nothing'}, unknown {extra or 'nothing'})")
    if Path(d["out"] or "").resolve() != Path(args.resume).resolve():
        d["out"] = args.resume  # the folder was moved: it is where it is now
    cfg = validate(TrainConfig(**d), source=str(saved))
    for name, value in given.items():
        setattr(cfg, name, value)
    return validate(cfg)
