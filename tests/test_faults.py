"""Faults of the machine and damaged state: one line, a non-zero exit, and nothing good lost.

A full disk and a read-only folder are real: a small tmpfs is mounted for them (root can, on Linux; the
tests skip with the reason where the mount is refused). Damaged checkpoints and run configs are edited by
hand, one field at a time, and each must be refused with the file and the field named, exit 2.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minirl import run_state, train

FAST = ["--method", "tspmo", "--group-size", "8", "--eval-n", "20", "--eval-every", "100"]


@pytest.fixture
def tmpfs(tmp_path):
    """A 160 KiB file system of its own, unmounted afterwards."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def one_line(capsys, code, expected_code):
    err = capsys.readouterr().err
    assert code == expected_code and "Traceback" not in err and len(err.strip().splitlines()) == 1, (code, err)
    return err.strip()


def lines_whole(path: Path) -> list[dict]:
    """Every complete line parses; a last line torn by the fault (no newline) is what a resume drops."""
    return run_state.read_jsonl(path)


def test_a_full_disk_stops_the_run_with_one_line_and_the_last_checkpoint_whole(tmpfs, capsys):
    out = tmpfs / "run"
    code = train.main([*FAST, "--steps", "3000", "--checkpoint-every", "1", "--out", str(out)])
    line = one_line(capsys, code, 1)
    assert "No space left on device" in line
    checkpoint = run_state.latest_checkpoint(out)
    assert checkpoint is not None, "the disk filled before any checkpoint: make the tmpfs larger"
    state = json.loads((checkpoint / "state.json").read_text())
    assert len(lines_whole(out / "metrics.jsonl")) >= state["step"]  # every step up to the checkpoint is there
    shutil.copytree(out, tmpfs.parent / "copy", ignore=shutil.ignore_patterns("*.tmp"))
    capsys.readouterr()
    assert train.main(["--resume", str(tmpfs.parent / "copy"), "--steps", str(state["step"] + 2)]) == 0


def test_a_read_only_folder_is_one_line_and_changes_nothing(tmpfs, capsys):
    out = tmpfs / "run"
    assert train.main([*FAST, "--steps", "2", "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    capsys.readouterr()
    line = one_line(capsys, train.main(["--resume", str(out), "--steps", "4"]), 1)
    assert "Read-only file system" in line and str(out) in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.fixture(scope="module")
def run_with_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert train.main([*FAST, "--steps", "2", "--checkpoint-every", "2", "--out", str(out)]) == 0
    return out


def damaged_copy(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out, out / "checkpoint" / "step-0000002"


def edit_tensors(path: Path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


CHECKPOINT_DAMAGE = {  # what is done to the checkpoint, the file it names, and what the line says
    "a future step": (lambda c: (c / "state.json").write_text(json.dumps({**json.loads((c / "state.json").read_text()), "step": 9})),
                      "state.json", "field 'step' is 9"),
    "a negative step": (lambda c: (c / "state.json").write_text(json.dumps({**json.loads((c / "state.json").read_text()), "step": -2})),
                        "state.json", "field 'step' is -2"),
    "a step of the wrong type": (lambda c: (c / "state.json").write_text(json.dumps({**json.loads((c / "state.json").read_text()), "step": "2"})),
                                 "state.json", "field 'step' is '2'"),
    "a malformed replay buffer": (lambda c: (c / "state.json").write_text(json.dumps({**json.loads((c / "state.json").read_text()), "replay": {"store": 3}})),
                                  "state.json", "field 'replay'"),
    "no RNG state": (lambda c: edit_tensors(c / "optimizer.safetensors", lambda t: t.pop("rng.cpu")),
                     "optimizer.safetensors", "rng.cpu"),
    "a malformed RNG state": (lambda c: edit_tensors(c / "optimizer.safetensors", lambda t: t.update({"rng.cpu": torch.zeros(3, dtype=torch.uint8)})),
                              "optimizer.safetensors", "rng.cpu"),
    "a malformed key": (lambda c: edit_tensors(c / "optimizer.safetensors", lambda t: t.update({"x.exp_avg": torch.zeros(1)})),
                        "optimizer.safetensors", "'x.exp_avg'"),
    "a wrong shape": (lambda c: edit_tensors(c / "optimizer.safetensors", lambda t: t.update({"0.exp_avg": torch.zeros(2, 2)})),
                      "optimizer.safetensors", "'0.exp_avg'"),
    "half-precision optimizer state": (lambda c: edit_tensors(c / "optimizer.safetensors", lambda t: t.update({"0.exp_avg": t["0.exp_avg"].half()})),
                                       "optimizer.safetensors", "expected finite float32"),
    "integer adapter weights": (lambda c: edit_tensors(c / "adapter" / "adapter_model.safetensors", lambda t: t.update({k: v.long() for k, v in t.items()})),
                                "adapter_model.safetensors", "expected finite float32"),
    "half-precision adapter weights": (lambda c: edit_tensors(c / "adapter" / "adapter_model.safetensors", lambda t: t.update({k: v.half() for k, v in t.items()})),
                                       "adapter_model.safetensors", "expected finite float32"),
    "NaN adapter weights": (lambda c: edit_tensors(c / "adapter" / "adapter_model.safetensors", lambda t: t.update({k: v * float("nan") for k, v in t.items()})),
                            "adapter_model.safetensors", "expected finite float32"),
}


@pytest.mark.parametrize("damage", sorted(CHECKPOINT_DAMAGE))
def test_a_damaged_checkpoint_is_named(run_with_checkpoint, tmp_path, capsys, damage):
    out, checkpoint = damaged_copy(run_with_checkpoint, tmp_path)
    edit, file, expected = CHECKPOINT_DAMAGE[damage]
    edit(checkpoint)
    line = one_line(capsys, train.main(["--resume", str(out), "--steps", "3"]), 2)
    assert file in line and expected in line, line


CONFIG_DAMAGE = {
    '"lr": "fast"': ("lr", "fast", "field 'lr' is 'fast'"),
    '"method": "ppo"': ("method", "ppo", "field 'method' is 'ppo'"),
    '"group_size": -5': ("group_size", -5, "field 'group_size' is -5"),
    '"beta": NaN': ("beta", float("nan"), "field 'beta' is nan"),
    '"tree_pack": "no"': ("tree_pack", "no", "field 'tree_pack' is 'no'"),
    'a field too many': ("colour", "blue", "unknown ['colour']"),
}


@pytest.mark.parametrize("damage", sorted(CONFIG_DAMAGE))
def test_a_damaged_run_config_is_named(run_with_checkpoint, tmp_path, capsys, damage):
    out, _ = damaged_copy(run_with_checkpoint, tmp_path)
    field, value, expected = CONFIG_DAMAGE[damage]
    config = json.loads((out / "config.json").read_text())
    config[field] = value
    (out / "config.json").write_text(json.dumps(config))
    line = one_line(capsys, train.main(["--resume", str(out)]), 2)
    assert "config.json" in line and expected in line, line


def test_a_run_config_that_is_not_utf8(run_with_checkpoint, tmp_path, capsys):
    out, _ = damaged_copy(run_with_checkpoint, tmp_path)
    (out / "config.json").write_bytes(b'{"method": "\xff"}')
    assert "expected UTF-8" in one_line(capsys, train.main(["--resume", str(out)]), 2)


# ----------------------------------------------------------------------------- a damaged model folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from conftest import write_hf_folder

    folder = tmp_path_factory.mktemp("model") / "model"
    write_hf_folder(folder)
    return folder


def edit_config(**fields):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(fields)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def edit_weight(change):
    return lambda folder: edit_tensors(folder / "model.safetensors", lambda t: t.update(
        {"model.norm.weight": change(t["model.norm.weight"])}))


MODEL_DAMAGE = {  # what is done to the folder, the file named, what the line says
    "a string for a number": (edit_config(rms_norm_eps="1e-6"), "config.json", "field 'rms_norm_eps' is '1e-6'"),
    "a boolean for a count": (edit_config(num_attention_heads=True), "config.json", "field 'num_attention_heads' is True"),
    "an infinite rope_theta": (edit_config(rope_theta=float("inf"), rope_parameters={"rope_type": "default", "rope_theta": float("inf")}),
                               "config.json", "field 'rope_theta' is inf"),
    "a string for a flag": (edit_config(tie_word_embeddings="no"), "config.json", "field 'tie_word_embeddings' is 'no'"),
    "an EOS past the vocabulary": (edit_config(eos_token_id=10**6), "config.json", "field 'eos_token_id' is 1000000"),
    "integer weights": (edit_weight(lambda w: w.long()), "model.safetensors", "torch.int64, expected floating-point"),
    "boolean weights": (edit_weight(lambda w: w > 0), "model.safetensors", "torch.bool, expected floating-point"),
    "NaN weights": (edit_weight(lambda w: w * float("nan")), "model.safetensors", "NaN or infinite"),
    "infinite weights": (edit_weight(lambda w: w / 0.0), "model.safetensors", "NaN or infinite"),
}


@pytest.mark.parametrize("damage", sorted(MODEL_DAMAGE))
def test_a_damaged_model_folder_is_named(model_folder, tmp_path, capsys, damage):
    from minirl import evaluate

    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    edit, file, expected = MODEL_DAMAGE[damage]
    edit(folder)
    line = one_line(capsys, evaluate.main(["--model", str(folder), "--n", "2"]), 2)
    assert file in line and expected in line, line
