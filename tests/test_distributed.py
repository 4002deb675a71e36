"""Data parallelism: two gloo ranks on the CPU train exactly what one process does, resumed or not.

Under torchrun, rank q takes the problems of slots j = q·problems_per_step + b of each step, and the
LoRA gradients are summed over ranks and divided by world·problems_per_step (minirl/distributed.py).
T-SPMO's replay buffer is one logical buffer: every rank adds every rank's answers in slot order. So two
ranks of one problem each see the same problems, draw the same samples, replay the same answers and take
the same optimizer steps as one process with --problems-per-step 2 and the same seed — also when a
problem repeats (here the train split has 3 problems, so the 8 draws of 4 steps repeat every one), and
also across a resume. Rank 0 alone writes files and logs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from minirl import train

REPO = Path(__file__).resolve().parents[1]
RUN = ["--method", "tspmo", "--group-size", "8", "--eval-n", "20", "--eval-every", "100", "--seed", "0",
       "--checkpoint-every", "1"]
TRAIN_PROBLEMS = 3

# Runs minirl.train.main as torchrun starts it, except that every rank but 0 gets its own --out: whatever
# lands there was written by a rank that should have written nothing.
# The train split is cut to TRAIN_PROBLEMS problems, as small_train_split does in this process.
LAUNCHER = """
import os, sys
from minirl import train
real = train.load_task
train.load_task = lambda name, split, **kw: real(name, split, **kw)[:%d] if split == "train" else real(name, split, **kw)
argv, rank = sys.argv[1:], int(os.environ["RANK"])
if rank and "--out" in argv:
    i = argv.index("--out") + 1
    argv[i] = f"{argv[i]}-rank{rank}"
sys.exit(train.main(argv))
""" % TRAIN_PROBLEMS


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def torchrun(launcher: Path, logs: Path, env: dict, *argv) -> subprocess.Popen:
    # --standalone: a rendezvous on localhost with a free port of its own; --redirects 3: each rank's
    # stdout and stderr go to logs/<run>/attempt_0/<rank>/.
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "--log-dir", str(logs), "--redirects", "3", str(launcher), *argv],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_ranks_match_one_process_with_two_problems_per_step(tmp_path, capsys, monkeypatch):
    launcher, logs = tmp_path / "launch.py", tmp_path / "logs"
    launcher.write_text(LAUNCHER)
    two, one = tmp_path / "two-ranks", tmp_path / "one-process"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    real = train.load_task
    monkeypatch.setattr(train, "load_task", lambda name, split, **kw: real(name, split, **kw)[:TRAIN_PROBLEMS]
                        if split == "train" else real(name, split, **kw))
    assert len({train.draw_index(0, TRAIN_PROBLEMS, d) for d in range(8)}) == TRAIN_PROBLEMS  # 8 draws, 3 problems

    # Two ranks: steps 1–2, then a resume to step 4. One process: steps 1–4 at once, meanwhile.
    ranks = torchrun(launcher, logs / "first", env, *RUN, "--steps", "2", "--out", str(two))
    try:
        assert train.main([*RUN, "--steps", "4", "--problems-per-step", "2", "--out", str(one)]) == 0
    finally:
        output, _ = ranks.communicate(timeout=180)
    assert ranks.returncode == 0, output
    resumed = torchrun(launcher, logs / "resumed", env, "--resume", str(two), "--steps", "4")
    output, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, output
    capsys.readouterr()

    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert any(bool(v.abs().max() > 0) for k, v in a.items() if "lora_B" in k), "no update was taken: nothing compared"
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0, msg=key)

    m1, m2 = lines(one / "metrics.jsonl"), lines(two / "metrics.jsonl")
    assert [m["step"] for m in m2] == [1, 2, 3, 4]  # one line per step: rank 1 appended none
    assert sum(m["updates"] for m in m1) > 0
    for x, y in zip(m1, m2):
        assert y["reward_mean"] == x["reward_mean"], (x, y)
        assert (y["n_loss_terms"], y["n_computed"], y["updates"]) == (x["n_loss_terms"], x["n_computed"], x["updates"])
        assert abs(y["loss"] - x["loss"]) <= 1e-5 * max(1.0, abs(x["loss"]))
    assert [e["step"] for e in lines(two / "eval.jsonl")] == [0, 2, 4]  # the first run's end, then the resumed one's
    # The replay buffer of both ranks' problems, in the one order the single process keeps it in.
    (c1,), (c2,) = (list((d / "checkpoint").glob("step-*")) for d in (one, two))
    s1, s2 = (json.loads((c / "state.json").read_text()) for c in (c1, c2))
    assert s2 == s1 and len(s1["replay"]["store"]) == TRAIN_PROBLEMS

    # Rank 1 wrote no file and printed nothing; rank 0 logged every step.
    rank1_out = two.parent / f"{two.name}-rank1"
    assert not rank1_out.exists() or not any(rank1_out.rglob("*")), sorted(rank1_out.rglob("*"))
    for run in ("first", "resumed"):
        (attempt,) = (logs / run).glob("*/attempt_0")
        assert (attempt / "1" / "stdout.log").read_text() == ""
        assert (attempt / "1" / "stderr.log").read_text() == ""
    (attempt,) = (logs / "first").glob("*/attempt_0")
    log0 = (attempt / "0" / "stdout.log").read_text()
    assert "2 rank(s)" in log0 and "step 2/2" in log0
