"""The training loop's own promises (minirl/train.py), each on a short run of a random Hugging Face folder:

- no method takes an optimizer step when no group of a round carries a reward difference (T-SPMO's λ
  included: it is weight decay, applied with an update, never a reason for one);
- a replayed answer never outgrows --max-new-tokens;
- problems come in passes over the train split, none twice before all came once;
- peak_mem_bytes is the step's high-water mark, not the run's.
"""

import json
from pathlib import Path

import pytest
import torch

from minirl import run_state, train
from minirl.lora import lora_modules

G, MAX_NEW = 6, 6


def parity(text: str, answer) -> float:
    return float(sum(map(ord, text)) % 2)


def short_run(hf_folder: Path, out: Path, method: str, *extra: str) -> list[dict]:
    argv = ["--method", method, "--model", str(hf_folder), "--group-size", str(G), "--max-new-tokens", str(MAX_NEW),
            "--eval-n", "4", "--eval-every", "100", "--lr", "0.01", "--temperature", "1.0", "--out", str(out), *extra]
    assert train.main(argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["grpo", "sgrpo", "tspmo"])
def test_no_optimizer_step_without_a_signal(method, hf_folder, tmp_path, monkeypatch, capsys):
    """Step 1 has mixed rewards; from step 2 on every reward is 0: the weights must stay where step 1 left
    them, with T-SPMO at the paper's λ = 0.01 too. Adam's momentum would move them on zero gradients if a
    step were taken, and a penalty in the loss would pull every entry toward zero at a full step each."""
    tied = {"now": False}
    monkeypatch.setattr(train, "resolve_reward", lambda spec, problems=(): lambda text, answer:
                        0.0 if tied["now"] else parity(text, answer))
    adapters = []
    real_save = run_state.save_checkpoint

    def save(out, step, model, *args):  # the end of every step (--checkpoint-every 1)
        adapters.append({name: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for name, m in lora_modules(model)})
        tied["now"] = True
        real_save(out, step, model, *args)

    monkeypatch.setattr(train, "save_checkpoint", save)
    metrics = short_run(hf_folder, tmp_path / "run", method, "--steps", "3", "--checkpoint-every", "1", "--lam", "0.01")
    capsys.readouterr()
    assert metrics[0]["updates"] >= 1, "step 1 took no step: the comparison below would be empty"
    assert [m["updates"] for m in metrics[1:]] == [0, 0]
    assert any(bool(b.abs().max() > 0) for _, b in adapters[0].values())
    for name, (a, b) in adapters[0].items():
        assert torch.equal(adapters[2][name][0], a) and torch.equal(adapters[2][name][1], b), name


def test_replayed_answers_stay_within_the_cap(hf_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "resolve_reward", lambda spec, problems=(): parity)
    short_run(hf_folder, tmp_path / "run", "tspmo", "--steps", "4", "--replay-success", "2", "--replay-failure", "2",
              "--replay-threshold", "0.5")
    capsys.readouterr()
    state = json.loads(next((tmp_path / "run" / "checkpoint").glob("step-*/state.json")).read_text())
    answers = [a for entry in state["replay"]["store"].values() for kind in entry.values() for a in kind]
    assert len(answers) > 4 * G  # replayed groups were stored too, not only the fresh ones
    assert max(map(len, answers)) <= MAX_NEW


def test_problems_come_in_passes_without_repeats(hf_folder, tmp_path, monkeypatch, capsys):
    for n in (1, 3, 7):
        draws = [train.draw_index(5, n, d) for d in range(4 * n)]
        for p in range(4):
            assert sorted(draws[p * n:(p + 1) * n]) == list(range(n))  # each pass holds every problem once
    assert [train.draw_index(0, 50, d) for d in range(50)] != [train.draw_index(1, 50, d) for d in range(50)]
    assert [train.draw_index(0, 50, d) for d in range(50)] != [train.draw_index(0, 50, d) for d in range(50, 100)]

    # In a run: a train split of 3 problems, 2 per step for 3 steps, is two whole passes.
    real = train.load_task
    monkeypatch.setattr(train, "load_task", lambda name, split, **kw: real(name, split, **kw)[:3]
                        if split == "train" else real(name, split, **kw))
    seen = []
    real_step = train.tspmo.train_step
    monkeypatch.setattr(train.tspmo, "train_step", lambda model, draws, *a, **kw:
                        seen.append([d.key for d in draws]) or real_step(model, draws, *a, **kw))
    short_run(hf_folder, tmp_path / "run", "tspmo", "--steps", "3", "--problems-per-step", "2")
    capsys.readouterr()
    flat = [key for step in seen for key in step]
    assert sorted(flat[:3]) == sorted(flat[3:]) == ["0", "1", "2"], seen


def test_peak_memory_is_the_steps_own():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs here: peak RSS is the process's high-water mark (README, Limits)")
    train.reset_peak_memory("cpu")
    before = train.peak_memory_bytes("cpu")
    big = torch.ones(300 * 2**20, dtype=torch.uint8)  # 300 MiB, touched
    del big
    peak = train.peak_memory_bytes("cpu")
    assert peak >= before + 250 * 2**20
    train.reset_peak_memory("cpu")
    assert train.peak_memory_bytes("cpu") < peak - 250 * 2**20  # the next step does not inherit the last one's peak


def test_max_minutes_stops_early_with_a_checkpoint_and_an_evaluation(hf_folder, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = short_run(hf_folder, out, "grpo", "--steps", "5", "--max-minutes", "1e-9")
    assert [m["step"] for m in metrics] == [1]  # the first step already took longer than the budget
    evals = [json.loads(line)["step"] for line in (out / "eval.jsonl").read_text().splitlines()]
    assert evals == [0, 1] and run_state.latest_checkpoint(out).name == "step-0000001"
    assert "stopped at step 1" in capsys.readouterr().out
    assert train.main(["--resume", str(out), "--max-minutes", "0"]) == 0  # no limit: on to --steps
    capsys.readouterr()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
