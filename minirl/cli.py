"""What the command-line tools share: the model arguments, loading, and the bad-input contract.

Bad input (an `InputError` anywhere below) is printed as one line, `error: …`, and the process exits
with status 2 and no traceback, as argparse does for a malformed command line.
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

from minirl.pretrained import load_pretrained
from minirl.errors import InputError
from minirl.tasks import TASKS


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a malformed command line gets the one line that matters, not the whole usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_model_arguments(ap):
    ap.add_argument("--model", help="a Hugging Face Qwen2/Qwen2.5, Qwen3 or Llama folder (default: the built-in tiny model)")
    ap.add_argument("--task", default=None, choices=TASKS,
                    help="the problems to train or evaluate on: built-in multiplication or SVAMP, or jsonl, "
                         "your own files (--train-file, --test-file) (default: multiplication)")
    ap.add_argument("--train-file", metavar="PATH",
                    help="--task jsonl: the train split, one JSON object per line with question and answer "
                         "(README, \"Your own problems\")")
    ap.add_argument("--test-file", metavar="PATH", help="--task jsonl: the test split, in the same format")
    ap.add_argument("--reward", metavar="SPEC",
                    help="last-integer (exact match of the last integer), numeric (the last number, decimals and "
                         "fractions allowed, within a relative 1e-6) or module:function, your own "
                         "(completion_text, answer) -> float (default: last-integer)")
    ap.add_argument("--digits", type=int, default=None,
                    help="multiplication: digits per factor (default: 3 as in the paper; the tiny model's own)")
    ap.add_argument("--prompt-style", default=None, choices=["plain", "chatml", "template"],
                    help="plain text, Qwen's chat format, or the chat template the model folder carries (default: plain)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cpu)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                    help="dtype of the frozen base weights; LoRA weights stay fp32 (default: fp32, as the paper)")


def task_file(args, split: str) -> str | None:
    """The file --task jsonl reads `split` from (--train-file, --test-file); None for a built-in task.

    A task flag that the chosen task does not read is an error, not silently ignored.
    """
    task = args.task or "multiplication"
    if args.digits is not None and task != "multiplication":
        raise InputError(f"--digits {args.digits}: only --task multiplication has digits (--task is {task})")
    if task != "jsonl":
        for flag, value in (("--train-file", args.train_file), ("--test-file", args.test_file)):
            if value is not None:
                raise InputError(f"{flag} {value}: only --task jsonl reads files (--task is {task})")
        return None
    path = args.train_file if split == "train" else args.test_file
    if path is None:
        raise InputError(f"--task jsonl: the {split} split needs --{split}-file PATH")
    return path


def tiny_defaults(folder=None) -> dict:
    """The settings a model folder was tuned with, which a run on it takes where no flag is given: its
    recipe.json's train_defaults, as the built-in tiny model (folder None) and the folders that
    tools/make_tiny_model.py builds record them; {} for a folder without them (a real checkpoint)."""
    from minirl.tiny import tiny_model_path

    path = (tiny_model_path() if folder is None else Path(folder)) / "recipe.json"
    try:
        recipe = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid UTF-8 JSON ({e})") from None
    tuned = recipe.get("train_defaults") if isinstance(recipe, dict) else None
    return {"digits": recipe.get("digits", 2), **tuned} if isinstance(tuned, dict) else {}


def check_device(device: str):
    """--device names a device this machine has: one line, not torch's traceback from deep in the load."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"--device {device}: expected cpu, cuda, cuda:N, mps, …") from None
    if d.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {device}: expected cpu, cuda, cuda:N or mps (no computation runs on {d.type})")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {device}: this machine has no MPS device")
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def load_model_for_cli(args):
    """(model, tokenizer, defaults): defaults are the folder's tuned settings (tiny_defaults), {} for a checkpoint."""
    args.device, args.dtype = args.device or "cpu", args.dtype or "fp32"
    check_device(args.device)
    if args.model is None:
        from minirl.tiny import tiny_model_path

        model, tokenizer = load_pretrained(tiny_model_path(), dtype=args.dtype, device=args.device)
        return model, tokenizer, tiny_defaults()
    model, tokenizer = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    return model, tokenizer, tiny_defaults(args.model)


def run_cli(parser, run, argv=None) -> int:
    """Run a command: bad input exits 2, a fault of the machine (disk, memory) 1, each with one line."""
    import torch

    args = parser.parse_args(argv)
    try:
        run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a read-only or vanished folder: what was written before stays whole
        print(f"error: {e.filename or 'a file'}: {e.strerror or e}", file=sys.stderr)
        return 1
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
            raise  # only the allocators' out-of-memory is a fault of the machine
        asked = re.search(r"allocate (\d+) bytes|Tried to allocate ([\d.]+ \w+)", str(e))
        size = "" if asked is None else f": {int(asked[1]) / 2**30:.1f} GiB asked for" if asked[1] else f": {asked[2]} asked for"
        print(f"error: out of memory{size}; lower --group-size, --gen-batch or --train-batch, or use "
              f"--checkpoint-layers", file=sys.stderr)
        return 1
    return 0


def positive(kind):
    """An argparse type: a number of `kind` that must be > 0 (and finite: "nan" and "inf" are refused)."""
    def parse(text):
        value = kind(text)
        if not value > 0 or value == math.inf:
            raise ValueError(text)
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def non_negative(kind):
    def parse(text):
        value = kind(text)
        if not value >= 0 or value == math.inf:
            raise ValueError(text)
        return value
    parse.__name__ = f"non-negative {kind.__name__}"
    return parse

