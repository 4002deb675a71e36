"""Issue 9, data parallelism: two gloo ranks on the CPU train exactly what one process does.

Under torchrun, rank q takes the problems of slots j = q·problems_per_step + b of each step, and the
LoRA gradients are summed over ranks and divided by world·problems_per_step (minirl/train.py). So two
ranks of one problem each see the same problems, draw the same samples and take the same optimizer
steps as one process with --problems-per-step 2 and the same seed. Rank 0 alone writes files and logs.
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
RUN = ["--method", "tspmo", "--steps", "3", "--group-size", "8", "--eval-n", "20", "--eval-every", "100", "--seed", "0"]

# Runs minirl.train.main as torchrun starts it, except that every rank but 0 gets its own --out: whatever
# lands there was written by a rank that should have written nothing.
LAUNCHER = """
import os, sys
from minirl.train import main
argv, rank = sys.argv[1:], int(os.environ["RANK"])
if rank:
    i = argv.index("--out") + 1
    argv[i] = f"{argv[i]}-rank{rank}"
sys.exit(main(argv))
"""


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_ranks_match_one_process_with_two_problems_per_step(tmp_path, capsys):
    launcher, logs = tmp_path / "launch.py", tmp_path / "logs"
    launcher.write_text(LAUNCHER)
    two, one = tmp_path / "two-ranks", tmp_path / "one-process"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # --standalone: a rendezvous on localhost with a free port of its own; --redirects 3: each rank's
    # stdout and stderr go to logs/<run>/attempt_0/<rank>/.
    ranks = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "--log-dir", str(logs), "--redirects", "3", str(launcher), *RUN, "--out", str(two)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert train.main([*RUN, "--problems-per-step", "2", "--out", str(one)]) == 0
    finally:
        output, _ = ranks.communicate(timeout=120)
    capsys.readouterr()
    assert ranks.returncode == 0, output

    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert any(bool(v.abs().max() > 0) for k, v in a.items() if "lora_B" in k), "no update was taken: nothing compared"
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0, msg=key)

    m1, m2 = lines(one / "metrics.jsonl"), lines(two / "metrics.jsonl")
    assert [m["step"] for m in m2] == [1, 2, 3]  # one line per step: rank 1 appended none
    assert sum(m["updates"] for m in m1) > 0
    for x, y in zip(m1, m2):
        assert y["reward_mean"] == x["reward_mean"], (x, y)
        assert (y["n_loss_terms"], y["n_computed"], y["updates"]) == (x["n_loss_terms"], x["n_computed"], x["updates"])
        assert abs(y["loss"] - x["loss"]) <= 1e-5 * max(1.0, abs(x["loss"]))
    assert [e["step"] for e in lines(two / "eval.jsonl")] == [0, 3]
    # The checkpoint holds the replay buffers of both ranks' problems, as the one process's does.
    (c1,), (c2,) = (list((d / "checkpoint").glob("step-*")) for d in (one, two))
    assert json.loads((c2 / "state.json").read_text()) == json.loads((c1 / "state.json").read_text())

    # Rank 1 wrote no file and printed nothing; rank 0 logged every step.
    rank1_out = two.parent / f"{two.name}-rank1"
    assert not rank1_out.exists() or not any(rank1_out.rglob("*")), sorted(rank1_out.rglob("*"))
    (attempt,) = logs.glob("*/attempt_0")
    assert (attempt / "1" / "stdout.log").read_text() == ""
    assert (attempt / "1" / "stderr.log").read_text() == ""
    log0 = (attempt / "0" / "stdout.log").read_text()
    assert "2 rank(s)" in log0 and "step 3/3" in log0
