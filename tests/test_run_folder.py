"""One run per folder, resumes that refuse what they cannot honour, and rewrites that a kill cannot tear.

- a folder that is training is locked (run.lock): a second run there gets one line naming the process;
- a new run refuses a folder that holds another run unless --overwrite; --out "" and --out FILE are refused;
- --resume accepts only --steps, --eval-every and --checkpoint-every; it refuses --steps below the
  checkpoint, says a finished run has nothing to do, and never re-measures the base model;
- every file a resume rewrites (config.json, metrics.jsonl, eval.jsonl) is replaced atomically: a SIGKILL
  in the middle of that write leaves the old file whole, and the next resume repeats the uninterrupted run.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minirl import run_state, train

REPO = Path(__file__).resolve().parents[1]
FAST = ["--method", "tspmo", "--group-size", "8", "--eval-n", "20", "--eval-every", "2", "--checkpoint-every", "2"]


def error_line(capsys, argv) -> str:
    code = train.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (code, err)
    return err.strip()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Four steps of the tiny model, checkpointed at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert train.main([*FAST, "--steps", "4", "--out", str(out)]) == 0
    return out


def snapshot(out: Path) -> dict:
    return {name: (out / name).read_bytes() for name in ("config.json", "metrics.jsonl", "eval.jsonl")}


def test_a_folder_in_training_is_locked(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with run_state.lock_run_folder(out):
        line = error_line(capsys, [*FAST, "--steps", "1", "--out", str(out)])
    assert re.search(rf"{re.escape(str(out))}: a run is already training in this folder \(process {os.getpid()}\)", line)
    assert train.main([*FAST, "--steps", "1", "--out", str(out)]) == 0  # the lock went with its holder


def test_a_new_run_does_not_delete_another_unless_asked(finished_run, tmp_path, capsys):
    before = snapshot(finished_run)
    line = error_line(capsys, [*FAST, "--steps", "1", "--out", str(finished_run)])
    assert "holds another run" in line and "--overwrite" in line
    assert snapshot(finished_run) == before
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(finished_run), str(copy)], check=True)
    assert train.main([*FAST, "--steps", "1", "--overwrite", "--out", str(copy)]) == 0
    capsys.readouterr()
    assert [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()] == [1]
    assert [p.name for p in (copy / "checkpoint").iterdir()] == ["step-0000001"]


@pytest.mark.parametrize("out, expected", [("", "--out : expected a folder"), ("FILE", "is a file, expected a folder")])
def test_bad_out_folders(tmp_path, capsys, out, expected):
    if out == "FILE":
        out = str(tmp_path / "file")
        Path(out).write_text("not a folder")
    assert expected in error_line(capsys, [*FAST, "--steps", "1", "--out", out])


@pytest.mark.parametrize("flag", [["--lr", "0.5"], ["--method", "grpo"], ["--seed", "3"], ["--out", "elsewhere"],
                                  ["--model", "some/folder"], ["--group-size", "4"], ["--eval-n", "10"],
                                  ["--overwrite"]])
def test_resume_refuses_a_flag_that_contradicts_the_run(finished_run, capsys, flag):
    before = snapshot(finished_run)
    line = error_line(capsys, ["--resume", str(finished_run), *flag])
    assert f"{flag[0]} cannot change on a resume" in line
    assert snapshot(finished_run) == before


def test_resume_checks_its_step_count(finished_run, capsys):
    before = snapshot(finished_run)
    assert "--steps 3: the run is already at step 4" in error_line(capsys, ["--resume", str(finished_run), "--steps", "3"])
    assert train.main(["--resume", str(finished_run)]) == 0
    printed = capsys.readouterr().out
    assert "nothing to do" in printed and "step 0:" not in printed
    assert snapshot(finished_run) == before


def test_resume_applies_the_cadence_flags_and_never_remeasures_the_base(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(out)], check=True)
    assert train.main(["--resume", str(out), "--steps", "7", "--eval-every", "3", "--checkpoint-every", "5"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "step 0:" not in printed
    config = json.loads((out / "config.json").read_text())
    assert (config["steps"], config["eval_every"], config["checkpoint_every"]) == (7, 3, 5)
    evals = [json.loads(line)["step"] for line in (out / "eval.jsonl").read_text().splitlines()]
    assert evals == [0, 2, 4, 6, 7]  # one base line, kept; then every 3 steps and the last


def test_resume_needs_the_base_line_and_a_checkpoint_of_this_run(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(out)], check=True)
    (out / "eval.jsonl").write_text("")
    assert "no step-0 line" in error_line(capsys, ["--resume", str(out), "--steps", "6"])
    subprocess.run(["cp", str(finished_run / "eval.jsonl"), str(out / "eval.jsonl")], check=True)
    saved = out / "checkpoint" / "step-0000004" / "config.json"
    saved.write_text(saved.read_text().replace('"method": "tspmo"', '"method": "grpo"'))
    assert "taken by another run (method is 'grpo', the run's is 'tspmo')" in error_line(capsys, ["--resume", str(out), "--steps", "6"])


# A resume whose process is killed in the middle of rewriting one of its files: the launcher writes half of
# the new content to the temporary file, as a write interrupted by SIGKILL would, then kills itself.
KILL_IN_WRITE = """
import os, signal, sys
from pathlib import Path
from minirl import files, train
target = sys.argv[1]
real = files.write_atomic

def write_then_die(path, data):
    if Path(path).name == target:
        Path(str(path) + ".tmp").write_bytes(data[:len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)

files.write_atomic = write_then_die
train.write_atomic = write_then_die
import minirl.run_state
minirl.run_state.write_atomic = write_then_die
sys.exit(train.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("target", ["config.json", "metrics.jsonl", "eval.jsonl"])
def test_a_kill_while_resume_rewrites_a_file_loses_nothing(finished_run, tmp_path, capsys, target):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(out)], check=True)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "method": "tsp')  # a torn line, so that the resume has to rewrite metrics.jsonl
    before = snapshot(out)
    launcher = tmp_path / "launch.py"
    launcher.write_text(KILL_IN_WRITE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, str(launcher), target, "--resume", str(out), "--steps", "6"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    after = snapshot(out)
    assert after[target] == before[target]  # the file being rewritten is whole, as it was
    for name in after:  # and every other is as it was or already rewritten whole (the torn line dropped)
        assert after[name] in (before[name], before[name][:before[name].rfind(b"\n") + 1]), name
    assert train.main(["--resume", str(out), "--steps", "6"]) == 0
    reference = tmp_path / "reference"
    subprocess.run(["cp", "-r", str(finished_run), str(reference)], check=True)
    assert train.main(["--resume", str(reference), "--steps", "6"]) == 0
    capsys.readouterr()
    timing = {"seconds", "gen_tokens_per_s", "peak_mem_bytes"}
    for name in ("metrics.jsonl", "eval.jsonl"):
        ours, theirs = ([{k: v for k, v in json.loads(line).items() if k not in timing}
                         for line in (folder / name).read_text().splitlines()] for folder in (out, reference))
        assert ours == theirs, name
