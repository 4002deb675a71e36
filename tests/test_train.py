"""Issues 6 and 7: short end-to-end runs of `python -m minirl.train`, in process.

Each method runs three steps on a random Hugging Face folder (conftest.write_hf_folder) and leaves the
output folder DESIGN.md describes ("The command line and its output folder"): config.json,
metrics.jsonl, eval.jsonl, adapter/, checkpoint/. Then the default run, shortened, on the built-in tiny
model: its printed table and progress lines, its evaluations against `python -m minirl.evaluate`, and
its settings against the tiny model's recipe.json. Last, tools/compare_methods.py's table against its runs. Resume, bad input and the non-finite guard are
tests/test_reliability.py's; data parallelism is tests/test_distributed.py's.
"""

import contextlib
import importlib.util
import io
import json
import math
import re
import statistics
import sys
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

from minirl import config as config_module
from minirl import evaluate, train
from minirl.pretrained import load_pretrained
from minirl.lora import load_adapter, lora_modules
from minirl.tiny import tiny_model_path

DESIGN_METRICS = {"step", "method", "reward_mean", "loss", "n_loss_terms", "gen_tokens_per_s", "peak_mem_bytes",
                  "seconds"}
STEPS, G, MAX_NEW, EVAL_N = 3, 4, 6, 8
TOOLS = Path(__file__).resolve().parents[1] / "tools"


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def lora_state(model) -> dict:
    return {f"{name}.{ab}": getattr(m, f"lora_{ab}").detach().clone() for name, m in lora_modules(model) for ab in "AB"}


def parity_reward(text: str, answer: int) -> float:
    """A reward a random model earns about half the time, so that every method's groups carry a signal
    and its updates move the adapter (exact match would be 0 on every sample)."""
    return float(sum(map(ord, text)) % 2)


# ----------------------------------------------------------------------------- every method, a random HF folder


@pytest.mark.parametrize("method", ["grpo", "sgrpo", "tspmo"])
def test_short_run_writes_the_design_output_folder(method, hf_folder, tmp_path, capsys, monkeypatch):
    trained = {}
    real_train = train.train

    def keep_model(cfg, model, tokenizer, **kw):  # the trained model, to compare the saved adapter with
        trained["model"] = model
        return real_train(cfg, model, tokenizer, **kw)

    monkeypatch.setattr(train, "train", keep_model)
    out = tmp_path / "run"
    argv = ["--method", method, "--model", str(hf_folder), "--group-size", str(G), "--max-new-tokens", str(MAX_NEW),
            "--steps", str(STEPS), "--eval-every", "2", "--eval-n", str(EVAL_N), "--checkpoint-every", "2",
            "--lr", "0.003", "--temperature", "1.0", "--reward", "test_train:parity_reward", "--out", str(out)]
    assert train.main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()

    # config.json: every TrainConfig field; the flags given; the paper's defaults for the rest (no tiny defaults
    # leak into a run on a user's model).
    config = json.loads((out / "config.json").read_text())
    assert set(config) == {f.name for f in fields(train.TrainConfig)}
    given = dict(method=method, model=str(hf_folder), group_size=G, max_new_tokens=MAX_NEW, steps=STEPS, eval_every=2,
                 eval_n=EVAL_N, checkpoint_every=2, lr=0.003, temperature=1.0, reward="test_train:parity_reward",
                 out=str(out))
    assert {k: config[k] for k in given} == given
    paper = asdict(train.TrainConfig())
    assert {k: v for k, v in config.items() if k not in given} == {k: v for k, v in paper.items() if k not in given}

    # metrics.jsonl: steps 1..3 in order, DESIGN.md's keys, sensible values.
    metrics = records(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    groups = 1 + config["replay_success"] + config["replay_failure"] if method == "tspmo" else 1
    for m in metrics:
        assert DESIGN_METRICS <= set(m), DESIGN_METRICS - set(m)
        assert m["method"] == method
        assert 0.0 <= m["reward_mean"] <= 1.0 and m["reward_mean"] * G == round(m["reward_mean"] * G)
        assert math.isfinite(m["loss"])
        assert isinstance(m["n_loss_terms"], int) and 0 <= m["n_loss_terms"] <= groups * G * MAX_NEW
        assert m["gen_tokens_per_s"] > 0 and m["seconds"] > 0
        assert isinstance(m["peak_mem_bytes"], int) and m["peak_mem_bytes"] > 0
        assert m["skipped_nonfinite"] == 0
        if method == "tspmo":  # |U| pairs counted; only the branch points (A ≠ 0) computed
            assert 1 <= m["n_loss_terms"] and m["n_computed"] <= m["n_loss_terms"], m
        elif method == "sgrpo":  # |T_i| ≤ max(α, k) tokens of each completion
            assert m["n_loss_terms"] <= G * min(MAX_NEW, max(config["sgrpo_alpha"], config["sgrpo_k"]))
    assert sum(m["updates"] for m in metrics) > 0, "no update was taken: the adapter checks below would be vacuous"
    if method == "tspmo":
        assert any(m["n_computed"] < m["n_loss_terms"] for m in metrics)  # shared prefixes: fewer branch points

    # eval.jsonl: the base model at step 0, then every 2 steps and the last one.
    evals = records(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 3]
    for e in evals:
        assert 0.0 <= e["accuracy"] <= 1.0 and e["n"] == EVAL_N and e["split"] == "test"

    # adapter/: PEFT files that load into a fresh copy of the model as the trained adapter.
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    want = lora_state(trained["model"])
    assert any(bool(v.abs().max() > 0) for k, v in want.items() if k.endswith(".B")), "B matrices never moved"
    fresh, _ = load_pretrained(hf_folder)
    load_adapter(fresh, out / "adapter")
    got = lora_state(fresh)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    ids = torch.randint(0, fresh.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), trained["model"](ids), rtol=0, atol=0)

    # checkpoint/: only the last step's, holding the same adapter.
    assert [p.name for p in (out / "checkpoint").iterdir()] == [f"step-{STEPS:07d}"]
    last = out / "checkpoint" / f"step-{STEPS:07d}"
    assert json.loads((last / "state.json").read_text())["step"] == STEPS
    assert (last / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (out / "adapter" / "adapter_model.safetensors").read_bytes()


# ----------------------------------------------------------------------------- the default run, shortened

TINY_STEPS, TINY_EVAL_N = 4, 20


def tiny_recipe() -> dict:
    return json.loads((tiny_model_path() / "recipe.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`python -m minirl.train --method tspmo` on the built-in tiny model, four steps, one explicit --lr.

    Returns (output folder, printed text, the flags given as TrainConfig fields)."""
    default_lr = tiny_recipe().get("train_defaults", {}).get("lr", train.TrainConfig.lr)
    given = dict(method="tspmo", steps=TINY_STEPS, eval_n=TINY_EVAL_N, eval_every=2, lr=default_lr / 2)
    out = tmp_path_factory.mktemp("tiny") / "run"
    argv = ["--method", "tspmo", "--steps", str(TINY_STEPS), "--eval-n", str(TINY_EVAL_N), "--eval-every", "2",
            "--lr", repr(given["lr"]), "--out", str(out)]
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = train.main(argv)
    assert code == 0, errors.getvalue()
    return out, printed.getvalue(), {**given, "out": str(out)}


def evaluate_line(capsys, tmp_path, *argv) -> dict:
    """Run `python -m minirl.evaluate ... --out FILE` in process; its one JSON line."""
    capsys.readouterr()
    result = tmp_path / f"eval-{len(list(tmp_path.glob('eval-*')))}.jsonl"
    assert evaluate.main([*argv, "--out", str(result)]) == 0, capsys.readouterr().err
    (line,) = records(result)
    printed = capsys.readouterr().out
    assert f"accuracy {100 * line['accuracy']:.1f}% on {line['n']} multiplication problems (test split)" in printed
    return line


def test_default_run_prints_the_table_and_progress(tiny_run):
    out, printed, _ = tiny_run
    evals, metrics = records(out / "eval.jsonl"), records(out / "metrics.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 4] and all(e["n"] == TINY_EVAL_N for e in evals)
    assert [m["step"] for m in metrics] == list(range(1, TINY_STEPS + 1))
    assert "model built-in tiny" in printed

    # The before/after table: the first and the last evaluation.
    base = re.search(r"^base model\s+([\d.]+)%\s+(\d+)$", printed, re.M)
    after = re.search(r"^after TSPMO\s+([\d.]+)%\s+(\d+)$", printed, re.M)
    assert base and after, printed
    assert (base[1], int(base[2])) == (f"{100 * evals[0]['accuracy']:.1f}", TINY_EVAL_N)
    assert (after[1], int(after[2])) == (f"{100 * evals[-1]['accuracy']:.1f}", TINY_EVAL_N)
    # Four steps rarely move the accuracy, so the rows are also checked apart on made-up figures.
    table = train.summary_table("tspmo", {"base": 0.05, "final": 0.625, "n": 40}).splitlines()
    assert [row.split() for row in table] == [["accuracy", "n"], ["base", "model", "5.0%", "40"],
                                              ["after", "TSPMO", "62.5%", "40"]]

    # A progress line per step here (every max(1, steps // 20) steps): the step's reward, the latest accuracy and
    # the step it was measured at, the mean time of the steps since the last line.
    progress = re.findall(r"^step (\d+)/(\d+) \| reward ([\d.]+) \| accuracy ([\d.]+)% \(step (\d+)\) \| ([\d.]+) s/step "
                          r"\| ([\d.]+) min left$", printed, re.M)
    assert [(int(s), int(n)) for s, n, *_ in progress] == [(s, TINY_STEPS) for s in range(1, TINY_STEPS + 1)], printed
    latest = {e["step"]: e["accuracy"] for e in evals}
    for (step, _, reward, acc, at, per_step, _), m in zip(progress, metrics):
        assert reward == f"{m['reward_mean']:.2f}"
        measured = max(s for s in latest if s <= int(step))
        assert (acc, int(at)) == (f"{100 * latest[measured]:.1f}", measured)
        assert per_step == f"{m['seconds']:.2f}"  # one step per line here: the window is that step
    assert progress[-1][6] == "0.0"  # nothing left after the last step


def test_default_run_evaluations_match_minirl_evaluate(tiny_run, tmp_path, capsys):
    out, _, _ = tiny_run
    evals = records(out / "eval.jsonl")
    base = evaluate_line(capsys, tmp_path, "--n", str(TINY_EVAL_N))
    assert base["n"] == evals[0]["n"] and base["split"] == evals[0]["split"]
    assert base["accuracy"] == evals[0]["accuracy"]
    final = evaluate_line(capsys, tmp_path, "--n", str(TINY_EVAL_N), "--adapter", str(out / "adapter"))
    assert final["accuracy"] == evals[-1]["accuracy"]


def test_default_run_draws_the_learning_curve(tiny_run, monkeypatch):
    out, printed, _ = tiny_run
    try:
        import matplotlib  # noqa: F401
        assert f"learning curve: {out / 'learning_curve.png'}" in printed
        assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert "pip install 'minirl[plot]'" in printed
        assert not (out / "learning_curve.png").exists()
    # Without matplotlib the run still finishes and says how to get the plot.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    (out / "learning_curve.png").unlink(missing_ok=True)
    assert "pip install 'minirl[plot]'" in train.plot_learning_curve(out)
    assert not (out / "learning_curve.png").exists()


def test_default_run_takes_the_tiny_models_settings_unless_a_flag_is_given(tiny_run):
    out, _, given = tiny_run
    recipe = tiny_recipe()
    defaults = recipe.get("train_defaults", {})
    names = {f.name for f in fields(train.TrainConfig)}
    assert set(defaults) <= names, f"recipe.json train_defaults keys that are no setting: {set(defaults) - names}"
    config = json.loads((out / "config.json").read_text())
    assert set(config) == names
    assert config["model"] is None and config["task"] == recipe["task"] and config["digits"] == recipe["digits"]
    for key, value in defaults.items():
        assert config[key] == given.get(key, value), key
    # The flags win over the tiny model's settings; --lr differs from what the run would otherwise take.
    assert {k: config[k] for k in given} == given
    assert config["lr"] != defaults.get("lr", train.TrainConfig.lr)
    # The same order with settings the recipe may not hold today: a flag beats a tuned setting beats the paper.
    args = train.build_parser().parse_args(["--lr", "0.5", "--lam", "0"])
    cfg = train.config_from_args(args, {"lr": 0.1, "group_size": 3, "lam": 0.2, "digits": 2})
    assert (cfg.lr, cfg.group_size, cfg.lam, cfg.digits, cfg.beta) == (0.5, 3, 0.0, 2, train.TrainConfig.beta)
    # Everything else is the paper's default for T-SPMO.
    paper = {**asdict(train.TrainConfig()), **config_module.paper_defaults("tspmo", recipe["task"])}
    rest = names - set(defaults) - set(given) - {"model", "digits"}
    assert {k: config[k] for k in rest} == {k: paper[k] for k in rest}


def test_tspmo_lambda_is_weight_decay_of_two_lambda_and_the_other_methods_have_none():
    """One AdamW step with λ against one without, from the same weights and gradients: T-SPMO's weights differ
    by exactly −lr · 2λ · W, the plain gradient step of λ‖W‖²; GRPO and S-GRPO do not read λ at all."""
    w0, grad = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 0.1, -0.2])
    for method, decay in (("tspmo", 2 * 0.25), ("grpo", 0.0), ("sgrpo", 0.0)):
        after = {}
        for lam in (0.0, 0.25):
            w = torch.nn.Parameter(w0.clone())
            w.grad = grad.clone()
            train.make_optimizer(train.TrainConfig(method=method, lr=0.1, lam=lam), [w]).step()
            after[lam] = w.detach()
        torch.testing.assert_close(after[0.25] - after[0.0], -0.1 * decay * w0, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- tools/compare_methods.py


def test_compare_methods_table_is_the_mean_and_sd_of_its_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compare_methods", TOOLS / "compare_methods.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "compare"
    tool.main(["--seeds", "0", "1", "--methods", "tspmo", "--jobs", "2", "--out", str(out), "--",
               "--steps", "2", "--eval-n", "10", "--eval-every", "1"])
    runs = json.loads((out / "results.json").read_text())
    assert sorted(r["seed"] for r in runs) == [0, 1]
    for r in runs:  # each figure is the run's own eval.jsonl
        evals = records(out / f"tspmo-seed{r['seed']}" / "eval.jsonl")
        assert (r["base"], r["final"], r["n"]) == (evals[0]["accuracy"], evals[-1]["accuracy"], 10)
        assert [s for s, _ in r["curve"]] == [0, 1, 2]
    finals = [r["final"] for r in runs]
    row = f"| T-SPMO | {100 * statistics.mean(finals):.1f} ± {100 * statistics.stdev(finals):.1f} |"
    assert row in (out / "table.md").read_text()
    assert row in capsys.readouterr().out
