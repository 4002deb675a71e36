"""Issue 8, reliability: checkpoints and resume, the non-finite guard, and one line per bad input.

The command-line contract (minirl/cli.py): bad input prints one line `error: …` naming the file, field
or argument and what was expected, and exits with status 2 and no traceback. In-process calls of
`main` return that status (argparse raises SystemExit(2)); a few cases also run as real processes.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_model, write_hf_folder
from minirl import evaluate, tasks, train
from minirl.pretrained import load_pretrained
from minirl.errors import InputError
from minirl.kernels import gathered_logprobs
from minirl.logprobs import selected_logprobs
from minirl.lora import add_lora, lora_parameters
from minirl.rl import tspmo
from minirl.tiny import tiny_model_path

REPO = Path(__file__).resolve().parents[1]
TIMING = {"seconds", "gen_tokens_per_s", "peak_mem_bytes"}  # may differ between two identical runs
FAST = ["--method", "tspmo", "--group-size", "8", "--eval-n", "50"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def assert_same_run(a: Path, b: Path):
    """metrics.jsonl line by line on every field but timing and memory, and eval.jsonl exactly."""
    ma, mb = without_timing(records(a / "metrics.jsonl")), without_timing(records(b / "metrics.jsonl"))
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        assert x == y, f"step {x['step']} differs"
    assert records(a / "eval.jsonl") == records(b / "eval.jsonl")


def bad_input(capsys, main, argv, *patterns):
    """main(argv) exits 2 with one `error:` line matching every pattern, and no traceback."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and (lines[-1].startswith("error:") or ": error: " in lines[-1]), err
    for pattern in patterns:
        assert re.search(pattern, lines[-1]), (pattern, lines[-1])
    return lines[-1]


def fresh_tiny(tmp_path, **edits) -> Path:
    """A random HF folder as transformers writes it (conftest's tiny config with `edits`)."""
    folder = tmp_path / "model"
    write_hf_folder(folder, **edits)
    return folder


def bad_model_folder(capsys, folder: Path, *patterns):
    """Evaluating with the damaged model `folder` exits 2 with one error line matching every pattern."""
    bad_input(capsys, evaluate.main, ["--model", str(folder), "--n", "2"], *patterns)


def edit_config(folder: Path, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


# ----------------------------------------------------------------------------- bad model folders


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_missing_file(tmp_path, capsys, name):
    folder = fresh_tiny(tmp_path)
    (folder / name).unlink()
    bad_model_folder(capsys, folder, re.escape(name), "not found")


@pytest.mark.parametrize("name, text, message", [
    ("config.json", '{"vocab_size": 96, "hidden_size": ', "not valid JSON"),
    ("tokenizer.json", '{"model": {"type": "NoSuchModel"}}', "not a valid tokenizers file"),
])
def test_malformed_file(tmp_path, capsys, name, text, message):
    folder = fresh_tiny(tmp_path)
    (folder / name).write_text(text)
    bad_model_folder(capsys, folder, re.escape(name), message)


def test_config_field_of_the_wrong_kind(tmp_path, capsys):
    folder = fresh_tiny(tmp_path)
    edit_config(folder, num_attention_heads=0)
    bad_model_folder(capsys, folder, r"config\.json", "num_attention_heads", "positive integer")


def test_safetensors_garbage_header(tmp_path, capsys):
    folder = fresh_tiny(tmp_path)
    garbage = b"{this is not a JSON header}"
    (folder / "model.safetensors").write_bytes(len(garbage).to_bytes(8, "little") + garbage + bytes(64))
    bad_model_folder(capsys, folder, r"model\.safetensors", "not a valid safetensors")


def test_safetensors_cut_short(tmp_path, capsys):
    folder = fresh_tiny(tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    bad_model_folder(capsys, folder, r"model\.safetensors")


def test_tensor_of_the_wrong_shape(tmp_path, capsys):
    folder = fresh_tiny(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()  # (32, 31) where the config says (32, 32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    bad_model_folder(capsys, folder, re.escape(str(folder)), re.escape(name), r"\(32, 31\)", r"expected \(32, 32\)")


def test_tokenizer_larger_than_the_vocabulary(tmp_path, capsys):
    folder = fresh_tiny(tmp_path)
    edit_config(folder, vocab_size=50, eos_token_id=1)  # the character tokenizer has 87 tokens
    bad_model_folder(capsys, folder, r"tokenizer\.json", "vocab_size 50")


def test_real_process_exits_2_without_traceback(tmp_path):
    """The in-process cases above, as a user sees them: a process that exits 2, no traceback."""
    folder = fresh_tiny(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 5)
    proc = subprocess.run([sys.executable, "-m", "minirl.train", "--model", str(folder), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {folder / 'model.safetensors'}")


# ----------------------------------------------------------------------------- bad data files


def test_svamp_file_malformed_json_names_the_line(tmp_path, capsys, monkeypatch):
    """tasks.load_svamp reads any path; the CLI reads tasks.SVAMP_PATH (no flag gives another file)."""
    path = tmp_path / "SVAMP.json"
    path.write_text('[\n {"Body": "a", "Question": "b?", "Answer": 3.0},\n {"Body": "c", "Question": }\n]\n')
    with pytest.raises(InputError, match=re.escape(str(path)) + r".*line 3"):
        tasks.load_svamp(path)
    monkeypatch.setattr(tasks, "SVAMP_PATH", path)
    bad_input(capsys, evaluate.main, ["--task", "svamp", "--n", "2"], re.escape(str(path)), "line 3, column")


def test_svamp_file_bad_record_names_the_problem_and_field(tmp_path, capsys, monkeypatch):
    path = tmp_path / "SVAMP.json"
    good = {"Body": "a", "Question": "b?", "Answer": 3.0}
    path.write_text(json.dumps([good, good, {**good, "ID": "chal-9", "Answer": 2.5}]))
    monkeypatch.setattr(tasks, "SVAMP_PATH", path)
    bad_input(capsys, evaluate.main, ["--task", "svamp", "--n", "2"],
              re.escape(str(path)), r"problem 2 \(ID chal-9\)", "'Answer'", "whole number")


def test_malformed_jsonl_line_in_a_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*FAST, "--steps", "4", "--checkpoint-every", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-5]  # a line cut in the middle, not at the end of the file
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    bad_input(capsys, train.main, ["--resume", str(out)], re.escape(str(out / "metrics.jsonl")), "line 2")


def test_damaged_checkpoint_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*FAST, "--steps", "2", "--checkpoint-every", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    folder = out / "checkpoint" / "step-0000002"
    data = (folder / "optimizer.safetensors").read_bytes()
    (folder / "optimizer.safetensors").write_bytes(data[:len(data) // 3])
    bad_input(capsys, train.main, ["--resume", str(out)], re.escape(str(folder / "optimizer.safetensors")), "unreadable")
    (folder / "state.json").write_text('{"step": 2}')
    (folder / "optimizer.safetensors").write_bytes(data)
    bad_input(capsys, train.main, ["--resume", str(out)], re.escape(str(folder / "state.json")), "replay")


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("argv, patterns", [
    (["--group-size", "0"], ["--group-size 0", "positive integer"]),
    (["--lr", "-0.001"], ["--lr -0.001", "finite number > 0"]),
    (["--lr=-1e-4"], ["--lr -0.0001", "finite number > 0"]),
    (["--steps", "many"], ["--steps", "invalid int value", "'many'"]),
    (["--method", "ppo"], ["--method", "invalid choice", "'ppo'"]),
    (["--lora-layers", "7"], ["--lora-layers", "layer 7", "3 layers"]),  # the tiny model has 3
    (["--lora-layers", "last:9"], ["--lora-layers", "last 9 layers", "has 3"]),
    (["--lora-targets", "q_proj,wq"], ["--lora-targets", "wq", "q_proj"]),
    (["--p", "1.5"], ["--p", r"\[0, 1\]"]),
    (["--resume", "/nonexistent/run"], ["--resume", "config.json"]),
])
def test_bad_train_arguments(tmp_path, capsys, argv, patterns):
    bad_input(capsys, train.main, [*FAST, "--steps", "2", "--out", str(tmp_path / "run"), *argv], *patterns)


def test_bad_evaluate_arguments(capsys):
    bad_input(capsys, evaluate.main, ["--task", "chess"], "--task", "invalid choice")
    bad_input(capsys, evaluate.main, ["--n", "0"], "argument --n", "positive int", "'0'")
    bad_input(capsys, evaluate.main, ["--max-new-tokens", "-3"], "argument --max-new-tokens", "positive int")
    bad_input(capsys, evaluate.main, ["--n", "100000"], r"\bn\b", "test split has only")


def test_prompt_longer_than_the_model_positions(tmp_path, capsys):
    folder = fresh_tiny(tmp_path, max_position_embeddings=6)  # "123*456=" alone is 8 tokens
    bad_input(capsys, evaluate.main, ["--model", str(folder), "--n", "2", "--max-new-tokens", "1"],
              "prompt of 8 tokens", r"max_position_embeddings \(6\)")
    bad_input(capsys, train.main, [*FAST, "--model", str(folder), "--steps", "1", "--max-new-tokens", "1",
                                   "--out", str(tmp_path / "run")],
              "--max-new-tokens 1", "prompts of up to 8 tokens", r"max_position_embeddings \(6\)")


def test_token_ids_outside_the_vocabulary():
    model = random_model()
    V = model.config.vocab_size
    for bad in (V, -1):
        with pytest.raises(InputError, match=rf"input_ids: token id {bad} is outside the vocabulary \[0, {V}\)"):
            model(torch.tensor([[1, 2, bad]]))
    hidden, weight = torch.randn(3, 8), torch.randn(V, 8)
    for bad in (V, -1):
        with pytest.raises(InputError, match=rf"targets\[2\] = {bad} is outside the vocabulary \[0, {V}\)"):
            gathered_logprobs(hidden, weight, torch.tensor([0, 1, bad]))
    with pytest.raises(InputError, match=rf"sequences\[0\]\[2\] = {V}: expected a token id in \[0, {V}\)"):
        selected_logprobs(model, [[1, 2, V, 3]], [(0, 2)])


# ----------------------------------------------------------------------------- no pickle anywhere


def test_no_pickle_is_ever_loaded():
    # torch.distributed's *_object collectives unpickle what other ranks send: they are pickle too.
    pattern = re.compile(r"torch\.load\b|\bimport pickle\b|\bpickle\.|\bcPickle\b|\bjoblib\b|weights_only|"
                         r"_object\b|_object_list\b")
    hits = [f"{path.relative_to(REPO)}:{i}" for folder in ("minirl", "kernels") for path in (REPO / folder).rglob("*.py")
            for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits
    assert not list((REPO / "minirl").rglob("*.bin")) and not list((REPO / "minirl").rglob("*.pt"))


# ----------------------------------------------------------------------------- checkpoints and resume


def load_into_fresh_model(folder: Path):
    """Load a checkpoint the way --resume does, into a fresh tiny model.

    Returns (step, bad_in_row, LoRA parameters, optimizer, replay buffer).
    """
    model, _ = load_pretrained(tiny_model_path())
    cfg = train.TrainConfig(**json.loads((folder.parents[1] / "config.json").read_text()))
    add_lora(model, targets=tuple(cfg.lora_targets.split(",")), layers=train.parse_layers(cfg.lora_layers, 3),
             rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    replay = tspmo.ReplayBuffer(cfg.replay_threshold)
    step, bad = train.load_checkpoint(folder, model, optimizer, replay)
    return step, bad, params, optimizer, replay


def test_checkpoint_holds_every_part_of_the_state(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*FAST, "--steps", "4", "--checkpoint-every", "2", "--out", str(out)]) == 0
    (folder,) = (out / "checkpoint").iterdir()  # older checkpoints are deleted once a newer one is complete
    assert folder.name == "step-0000004"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter", "config.json", "optimizer.safetensors", "state.json"]
    assert json.loads((folder / "config.json").read_text())["steps"] == 4
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 4 and state["bad_in_row"] == 0 and state["replay"]["store"]  # T-SPMO stored completions
    tensors = load_file(str(folder / "optimizer.safetensors"))
    assert "rng.cpu" in tensors and any(k.endswith(".exp_avg_sq") for k in tensors)
    torch.manual_seed(12345)
    step, bad, params, optimizer, replay = load_into_fresh_model(folder)
    assert (step, bad) == (4, 0)
    assert torch.equal(torch.get_rng_state(), tensors["rng.cpu"])
    assert replay.store == state["replay"]["store"]
    assert any(bool(p.abs().sum() > 0) for p in params[1::2])  # B matrices moved off their zero start
    assert all(float(s["step"]) > 0 for s in optimizer.state.values())


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    reference, out = tmp_path / "reference", tmp_path / "run"
    argv = [*FAST, "--steps", "8", "--checkpoint-every", "4", "--eval-every", "4"]
    assert train.main([*argv, "--out", str(reference)]) == 0
    real_replace = os.replace

    def crash_on_second_checkpoint(src, dst):
        if Path(dst).name == "step-0000008":
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second_checkpoint)
    assert train.main([*argv, "--out", str(out)]) == 1  # a fault of the machine: one line, exit 1
    assert "disk full (simulated)" in capsys.readouterr().err
    monkeypatch.setattr(os, "replace", real_replace)
    assert train.latest_checkpoint(out) == out / "checkpoint" / "step-0000004"
    assert (out / "checkpoint" / "step-0000008.tmp").is_dir()  # the half-done one, never taken for complete
    assert load_into_fresh_model(out / "checkpoint" / "step-0000004")[:2] == (4, 0)
    capsys.readouterr()
    assert train.main(["--resume", str(out)]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert_same_run(reference, out)
    assert [p.name for p in (out / "checkpoint").iterdir()] == ["step-0000008"]


def test_resume_drops_a_torn_last_line(tmp_path, capsys):
    """SIGKILL can land inside the write of a metrics line; that line is past the checkpoint, so it goes."""
    reference, out = tmp_path / "reference", tmp_path / "run"
    argv = [*FAST, "--checkpoint-every", "3", "--eval-every", "3"]
    assert train.main([*argv, "--steps", "6", "--out", str(reference)]) == 0
    assert train.main([*argv, "--steps", "3", "--out", str(out)]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "method": "tsp')
    assert train.main(["--resume", str(out), "--steps", "6"]) == 0
    assert_same_run(reference, out)


def test_kill_and_resume_repeats_the_uninterrupted_run(tmp_path):
    """SIGKILL once a checkpoint exists; `--resume` then writes exactly what the run never killed wrote."""
    steps = 40
    for attempt in range(4):
        reference, out = tmp_path / f"reference-{attempt}", tmp_path / f"run-{attempt}"
        argv = [sys.executable, "-m", "minirl.train", *FAST, "--steps", str(steps), "--checkpoint-every", "3",
                "--eval-every", "20"]
        ref = subprocess.Popen([*argv, "--out", str(reference)], env=env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        victim = subprocess.Popen([*argv, "--out", str(out)], env=env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while victim.poll() is None and time.monotonic() < deadline:
            if (out / "checkpoint").is_dir() and train.latest_checkpoint(out) is not None:
                victim.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        victim.wait()
        assert ref.wait(timeout=300) == 0, ref.stderr.read()
        if victim.returncode == -signal.SIGKILL:
            break
        assert victim.returncode == 0, victim.stderr.read()
        steps *= 4  # it finished before the kill: a longer run leaves more time
    else:
        pytest.fail("the run always finished before it could be killed")
    written = len((out / "metrics.jsonl").read_text().splitlines())
    assert written < steps, "the run was not stopped before its end"
    resumed = subprocess.run([sys.executable, "-m", "minirl.train", "--resume", str(out)], env=env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    match = re.search(r"resumed from .*step-(\d+) at step (\d+)", resumed.stdout)
    assert match and 0 < int(match[2]) < steps, resumed.stdout
    assert_same_run(reference, out)
    assert len(records(out / "metrics.jsonl")) == steps


# ----------------------------------------------------------------------------- non-finite guard


def poison_from(monkeypatch, out: Path, steps, kind="nan"):
    """Every update of the given steps leaves one NaN gradient entry ("nan") or an infinite loss ("inf").

    The step is read off metrics.jsonl, which has one line per finished step.
    """
    real = tspmo.accumulate_gradients

    def update(model, root, completions, rewards, **settings):
        stats = real(model, root, completions, rewards, **settings)
        path = out / "metrics.jsonl"
        step = 1 + (len(path.read_text().splitlines()) if path.exists() else 0)
        if step in steps and kind == "nan":
            p = lora_parameters(model)[-1]
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.clone()  # None: equal rewards and λ = 0
            p.grad.view(-1)[0] = math.nan  # one bad entry, the loss left finite
        elif step in steps:
            stats.loss = math.inf
        return stats

    monkeypatch.setattr(tspmo, "accumulate_gradients", update)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_a_nonfinite_update_is_skipped_logged_and_counted(tmp_path, capsys, monkeypatch, kind):
    out = tmp_path / "run"
    poison_from(monkeypatch, out, {3}, kind)
    assert train.main([*FAST, "--steps", "5", "--checkpoint-every", "5", "--max-bad-steps", "3",
                       "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "step 3: non-finite loss or gradient, update skipped" in stdout
    metrics = records(out / "metrics.jsonl")
    assert [m["skipped_nonfinite"] for m in metrics][:2] + [m["skipped_nonfinite"] for m in metrics][3:] == [0] * 4
    assert metrics[2]["skipped_nonfinite"] >= 1 and metrics[2]["updates"] == 0  # no step taken at step 3
    assert all(m["updates"] >= 1 for m in metrics[3:])  # the run went on
    step, bad, params, *_ = load_into_fresh_model(out / "checkpoint" / "step-0000005")
    assert (step, bad) == (5, 0) and all(bool(torch.isfinite(p).all()) for p in params)


def test_too_many_nan_updates_stop_the_run_with_its_checkpoint_intact(tmp_path, capsys, monkeypatch):
    out, real_accumulate = tmp_path / "run", tspmo.accumulate_gradients
    poison_from(monkeypatch, out, set(range(5, 100)))
    with pytest.raises(SystemExit) as stop:
        train.main([*FAST, "--steps", "20", "--checkpoint-every", "2", "--max-bad-steps", "3", "--out", str(out)])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"error: 3 non-finite updates in a row at step \d+; stopping\. The last good checkpoint is "
                     + re.escape(str(out / "checkpoint" / "step-0000004")), err), err
    assert train.latest_checkpoint(out) == out / "checkpoint" / "step-0000004"
    step, bad, params, *_ = load_into_fresh_model(out / "checkpoint" / "step-0000004")
    assert (step, bad) == (4, 0) and all(bool(torch.isfinite(p).all()) for p in params)
    monkeypatch.setattr(tspmo, "accumulate_gradients", real_accumulate)
    assert train.main(["--resume", str(out), "--steps", "6"]) == 0  # the good checkpoint carries on
    assert [m["step"] for m in records(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
