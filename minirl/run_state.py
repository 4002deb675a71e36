"""A run folder's state on disk: its checkpoints, its JSONL logs, and the lock that keeps it to one run.

    out/config.json                 every setting (config.py)
    out/metrics.jsonl, eval.jsonl   a line per step, a line per evaluation
    out/checkpoint/step-NNNNNNN/    adapter/, optimizer.safetensors (AdamW state and RNG states),
                                    state.json (step, non-finite streak, replay buffer), config.json
    out/run.lock                    held (flock) by the process that trains in the folder

A checkpoint is written as a .tmp folder, fsynced, and renamed, so a kill never leaves a half-written
one; only then is the previous one deleted. Every file a run rewrites goes through files.write_atomic.
Only safetensors and JSON are read back: no pickle is ever loaded.
"""

import contextlib
import fcntl
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from minirl.errors import InputError
from minirl.files import fsync_dir, write_atomic
from minirl.lora import load_adapter, save_adapter


@contextlib.contextmanager
def lock_run_folder(out: Path):
    """Hold out/run.lock while the block runs; a second run in the same folder meanwhile is refused."""
    handle = open(out / "run.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise InputError(f"{out}: a run is already training in this folder (process {holder}); "
                         f"wait for it or choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        handle.close()  # closing the file releases the lock


def save_checkpoint(out: Path, step: int, model, optimizer, replay_state: dict, bad_in_row: int):
    """out/checkpoint/step-NNNNNNN: written as a .tmp folder, fsynced, renamed; older ones deleted after."""
    root = out / "checkpoint"
    root.mkdir(exist_ok=True)
    final, tmp = root / f"step-{step:07d}", root / f"step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_adapter(model, tmp / "adapter")
    tensors = {f"{i}.{name}": value.detach().cpu().reshape(-1).clone() if value.dim() == 0 else value.detach().cpu().contiguous()
               for i, s in optimizer.state_dict()["state"].items() for name, value in s.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    write_atomic(tmp / "optimizer.safetensors", save(tensors))
    state = {"step": step, "bad_in_row": bad_in_row, "replay": replay_state}
    write_atomic(tmp / "state.json", json.dumps(state).encode())
    write_atomic(tmp / "config.json", (out / "config.json").read_bytes())  # the settings as they were
    os.replace(tmp, final)  # the new checkpoint exists completely, or not at all
    fsync_dir(root)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / "checkpoint").glob("step-*") if not p.name.endswith(".tmp"))
    return done[-1] if done else None


def load_checkpoint(folder: Path, model, optimizer, replay) -> tuple[int, int]:
    """Restore LoRA weights, optimizer state, RNG and replay buffer; returns (step, bad_in_row).

    Everything is checked before anything is restored: a checkpoint that does not fit this run is an
    InputError naming the file and what was wrong, never a run that silently differs.
    """
    state_path, optimizer_path = folder / "state.json", folder / "optimizer.safetensors"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{state_path}: unreadable checkpoint state ({e})") from None
    if not isinstance(state, dict) or not {"step", "bad_in_row", "replay"} <= state.keys():
        raise InputError(f"{state_path}: expected an object with step, bad_in_row and replay")
    step, bad = state["step"], state["bad_in_row"]
    if isinstance(step, bool) or not isinstance(step, int) or folder.name != f"step-{step:07d}":
        raise InputError(f"{state_path}: field 'step' is {step!r}, expected {folder.name.removeprefix('step-').lstrip('0')}, "
                         f"the step its folder is named after")
    if isinstance(bad, bool) or not isinstance(bad, int) or bad < 0:
        raise InputError(f"{state_path}: field 'bad_in_row' is {bad!r}, expected a non-negative integer")
    check_replay_state(state["replay"], state_path)
    try:
        tensors = load_file(str(optimizer_path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{optimizer_path}: unreadable checkpoint ({e})") from None
    rng = tensors.pop("rng.cpu", None)
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise InputError(f"{optimizer_path}: tensor 'rng.cpu' is missing or not a CPU generator state")
    cuda_rng = tensors.pop("rng.cuda", None)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    restored = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(params) or name not in ("step", "exp_avg", "exp_avg_sq"):
            raise InputError(f"{optimizer_path}: tensor {key!r} is no AdamW state of this run's {len(params)} parameters")
        want = () if name == "step" else tuple(params[int(index)].shape)
        got = tuple(value.shape) if name != "step" else tuple(value.reshape(()).shape) if value.numel() == 1 else None
        if value.dtype != torch.float32 or got != want or not bool(torch.isfinite(value).all()):
            raise InputError(f"{optimizer_path}: tensor {key!r} is {value.dtype} of shape {tuple(value.shape)}, "
                             f"expected finite float32 of shape {want}")
        restored.setdefault(int(index), {})[name] = value.reshape(()) if name == "step" else value
    adapter = folder / "adapter" / "adapter_model.safetensors"
    try:
        lora = load_file(str(adapter))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{adapter}: unreadable checkpoint adapter ({e})") from None
    for key, value in lora.items():  # training keeps LoRA weights finite and in fp32: anything else it did not save
        if value.dtype != torch.float32 or not bool(torch.isfinite(value).all()):
            raise InputError(f"{adapter}: tensor {key!r} is {value.dtype}, expected finite float32")
    load_adapter(model, folder / "adapter")
    optimizer.load_state_dict({"state": restored, "param_groups": optimizer.state_dict()["param_groups"]})
    torch.set_rng_state(rng)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    replay.load_state_dict(state["replay"])
    return step, bad


def check_replay_state(replay, source: Path):
    ok = (isinstance(replay, dict) and {"threshold", "capacity", "store"} <= replay.keys()
          and isinstance(replay["threshold"], (int, float)) and math.isfinite(replay["threshold"])
          and isinstance(replay["capacity"], int) and replay["capacity"] > 0 and isinstance(replay["store"], dict)
          and all(isinstance(entry, dict) and set(entry) == {"success", "failure"}
                  and all(isinstance(answers, list) and all(isinstance(a, list) and all(isinstance(t, int) for t in a)
                                                            for a in answers) for answers in entry.values())
                  for entry in replay["store"].values()))
    if not ok:
        raise InputError(f"{source}: field 'replay' is not a replay buffer (threshold, capacity, store of token lists)")


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSONL log, each an object with an integer 'step' (None at evaluate's)."""
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: expected UTF-8 text") from None
    records = []
    for number, line in enumerate(text.split("\n")[:-1], 1):  # a torn last line (no "\n" yet) falls off here
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {number} is not JSON ({e})") from None
        if not isinstance(record, dict) or isinstance(record.get("step"), bool) or not isinstance(record.get("step"), int):
            raise InputError(f"{path}: line {number}: expected an object with an integer 'step' field")
        records.append(record)
    return records


def truncate_jsonl(path: Path, last_step: int) -> list[dict]:
    """Keep the lines of steps ≤ last_step (what the resumed run writes next must not be there twice);
    the file is replaced atomically, so a kill here loses nothing. Returns the kept records."""
    if not path.exists():
        return []
    kept = [r for r in read_jsonl(path) if r["step"] <= last_step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    return kept
