"""The user's own problems (`--task jsonl`, minirl/tasks.py) and `python -m minirl.evaluate`'s command line.

Bad input is one line `error: …` naming the file, line and field or the flag, exit 2, no traceback,
and is caught before the model loads or the evaluation runs.
"""

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from minirl import evaluate
from minirl.errors import InputError
from minirl.tasks import Problem, load_jsonl, load_task, svamp

REPO = Path(__file__).resolve().parents[1]
F = Fraction


def write_lines(tmp_path, *lines, name="data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def record(question="What is 6*7?", answer=42, **extra) -> str:
    return json.dumps({"question": question, "answer": answer, **extra})


def raw(question, answer) -> str:
    """A record with its non-ASCII characters as they are, not escaped."""
    return json.dumps({"question": question, "answer": answer}, ensure_ascii=False)


GSM8K = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
         "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72")


@pytest.mark.parametrize("answer, value", [
    (42, 42),
    (-7, -7),
    (12.0, 12),  # a whole number written as a decimal is an int
    (1e3, 1000),
    (0.1, F(1, 10)),  # a JSON decimal is read exactly, not through a binary float
    (2.5, F(5, 2)),
    (10**30, 10**30),
    ("42", 42),
    ("3/4", F(3, 4)),
    ("-1/2", F(-1, 2)),
    ("The answer is 17 apples.", 17),  # no "####": the last number of the text
    ("2 boxes of 6 make 12", 12),
    (GSM8K[1], 72),  # the numbers before "####" are the working, not the answer
    ("#### 1,234", 1234),
    ("so 5 - 10 = -5\n#### -5", -5),
    ("#### 3.5", F(7, 2)),
    ("#### 72\n", 72),
    ("12 #### 40 #### 41", 41),  # the last "####" counts
])
def test_answers(tmp_path, answer, value):
    [problem] = load_jsonl(write_lines(tmp_path, record(answer=answer)))
    assert problem.answer == value and type(problem.answer) is type(value)


def test_a_good_file(tmp_path):
    path = write_lines(tmp_path, record(*GSM8K), "", "   ", record("  12*34=  ", 408, id="x", level=3),
                       record("Half of 1?", "1/2"))
    problems = load_jsonl(path)
    assert problems == [Problem(GSM8K[0], 72), Problem("  12*34=  ", 408), Problem("Half of 1?", F(1, 2))]
    # the line of each record, counting blank lines, for later messages; the question is kept as written
    assert [p.source for p in problems] == [f"{path}, line {n}" for n in (1, 4, 5)]
    assert load_task("jsonl", "train", path=path) == problems  # the whole file, in file order
    assert load_task("jsonl", "test", path=path, seed=3) == problems
    assert load_task("jsonl", "test", n=2, path=str(path)) == problems[:2]  # the first n


def test_windows_line_endings_a_byte_order_mark_and_no_final_newline(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + raw("caf\u00e9?", 1).encode() + b"\r\n\r\n" + raw("b", 2).encode())
    assert load_jsonl(path) == [Problem("caf\u00e9?", 1), Problem("b", 2)]


@pytest.mark.parametrize("lines, line, message", [
    (["[1, 2]"], 1, "expected a JSON object with 'question' and 'answer', got"),
    (['"just text"'], 1, "expected a JSON object"),
    (["42"], 1, "expected a JSON object"),
    (["null"], 1, "expected a JSON object"),
    ([record(), '{"answer": 3}'], 2, "field 'question' is missing"),
    ([record(), "", '{"question": "q"}'], 3, "field 'answer' is missing"),
    ([record(question="")], 1, "field 'question': expected non-empty text"),
    ([record(question=" \n\t")], 1, "field 'question': expected non-empty text"),
    ([record(question=5)], 1, "field 'question': expected non-empty text, got 5"),
    ([record(question=None)], 1, "field 'question'"),
    ([record(answer="no number here")], 1, "field 'answer': expected a number, or text with one"),
    ([record(answer="")], 1, "field 'answer'"),
    ([record(answer="12 apples\n####")], 1, "field 'answer'"),  # a number only before the marker
    ([record(answer=True)], 1, "field 'answer'"),
    ([record(answer=None)], 1, "field 'answer'"),
    ([record(answer=[3])], 1, "field 'answer'"),
    ([record(answer={"value": 3})], 1, "field 'answer'"),
    (['{"question": "q", "answer": NaN}'], 1, "field 'answer'"),
    (['{"question": "q", "answer": -Infinity}'], 1, "field 'answer'"),
    ([record(), '{"question": "q", "answer": 3'], 2, "not valid JSON"),
    ([record(), record() + " " + record()], 2, "not valid JSON"),  # two records on one line
    (['{"question": "q", "answer": 1' + "0" * 5000 + "}"], 1, "not readable JSON"),
])
def test_bad_record_names_file_line_and_field(tmp_path, lines, line, message):
    path = write_lines(tmp_path, *lines)
    with pytest.raises(InputError, match=message) as err:
        load_jsonl(path)
    text = str(err.value)
    assert text.startswith(f"{path}, line {line}: ") and "\n" not in text


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(record().encode() + b"\n" + raw("caf\u00e9?", 1).encode("latin-1") + b"\n")
    with pytest.raises(InputError, match=r"line 2: not UTF-8 \(byte 0xe9 .*must be UTF-8") as err:
        load_jsonl(path)
    assert str(err.value).startswith(str(path))


@pytest.mark.parametrize("content", [b"", b"\n\n", b"  \n\t\n"])
def test_a_file_without_records(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=rf"^{path}: no records"):
        load_jsonl(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputError, match=rf"^{tmp_path / 'nowhere.jsonl'}: cannot read"):
        load_jsonl(tmp_path / "nowhere.jsonl")
    with pytest.raises(InputError, match=rf"^{tmp_path}: cannot read"):
        load_jsonl(tmp_path)


def test_load_task_arguments(tmp_path):
    path = write_lines(tmp_path, record(), record())
    with pytest.raises(InputError, match=rf"^n: 3 problems asked, but the file {path} has only 2"):
        load_task("jsonl", "test", n=3, path=path)
    with pytest.raises(InputError, match=r"^path: task jsonl reads its test split from a file; none given"):
        load_task("jsonl", "test")
    with pytest.raises(InputError, match="^split: "):
        load_task("jsonl", "validation", path=path)
    with pytest.raises(InputError, match="^path: task svamp is built in"):
        load_task("svamp", "test", path=path)


# ----------------------------------------------------------------------------- python -m minirl.evaluate


def evaluate_fails(capsys, argv, *patterns) -> str:
    """evaluate.main(argv) exits 2 with exactly one line on stderr, `error: …`, matching every pattern."""
    try:
        code = evaluate.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for pattern in patterns:
        assert pattern in lines[0], (pattern, lines[0])
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model would load: these inputs must be refused before."""
    def refuse(args):
        raise AssertionError("the model was loaded before the bad input was refused")
    monkeypatch.setattr(evaluate, "load_model_for_cli", refuse)


@pytest.mark.parametrize("argv, patterns", [
    (["--task", "chess"], ["argument --task: invalid choice: 'chess'"]),
    (["--n", "0"], ["argument --n: invalid positive int value: '0'"]),
    (["--batch-size", "-1"], ["argument --batch-size"]),
    (["--temperature", "nan"], ["argument --temperature: invalid non-negative float value: 'nan'"]),
    (["--temperature", "inf"], ["argument --temperature"]),
    (["--max-new-tokens", "0"], ["argument --max-new-tokens"]),
    (["--seed", "1.5"], ["argument --seed"]),
    (["--split", "dev"], ["argument --split: invalid choice: 'dev'"]),
    (["--steps", "3"], ["unrecognized arguments: --steps 3"]),
])
def test_a_malformed_command_line_is_one_line_not_the_usage_block(capsys, no_model, argv, patterns):
    evaluate_fails(capsys, argv, *patterns, "(see python -m minirl.evaluate --help)")


def test_bad_flags_are_refused_before_the_model_loads(capsys, tmp_path, no_model):
    good = write_lines(tmp_path, record(), record(answer="#### 7"))
    half = write_lines(tmp_path, record(), record("Half of 1?", 0.5), name="half.jsonl")
    bad = write_lines(tmp_path, record(), '{"question": "q"}', name="bad.jsonl")
    cases = [
        (["--digits", "0"], ["digits", "got 0"]),  # was silently read as the tiny model's 2
        (["--digits", "9"], ["digits", "from 1 to 8"]),
        (["--task", "svamp", "--digits", "2"], ["--digits 2: only --task multiplication has digits"]),
        (["--task", "jsonl", "--digits", "2", "--test-file", str(good)], ["--digits 2"]),
        (["--out", str(tmp_path)], [f"--out {tmp_path}: is a folder"]),
        (["--out", str(tmp_path / "no" / "eval.jsonl")], ["does not exist"]),
        (["--task", "jsonl"], ["--task jsonl: the test split needs --test-file PATH"]),
        (["--task", "jsonl", "--test-file", str(good), "--split", "train"], ["needs --train-file PATH"]),
        (["--test-file", str(good)], [f"--test-file {good}: only --task jsonl reads files (--task is multiplication)"]),
        (["--task", "svamp", "--train-file", str(good)], ["--train-file", "--task is svamp"]),
        (["--task", "jsonl", "--test-file", str(bad)], [f"{bad}, line 2: field 'answer' is missing"]),
        (["--task", "jsonl", "--test-file", str(tmp_path / "none.jsonl")], ["none.jsonl: cannot read"]),
        (["--task", "jsonl", "--test-file", str(good), "--n", "3"], [f"the file {good} has only 2"]),
        (["--task", "svamp", "--n", "301"], ["SVAMP test split has only 300"]),
        (["--task", "jsonl", "--test-file", str(half)], [f"--reward last-integer: the answer 1/2 ({half}, line 2)",
                                                         "--reward numeric"]),
        (["--reward", "exact"], ["--reward exact: expected last-integer, numeric or module:function"]),
        (["--reward", "no_such_module_anywhere:score"], ["cannot import no_such_module_anywhere"]),
    ]
    for argv, patterns in cases:
        evaluate_fails(capsys, argv, *patterns)


@pytest.mark.parametrize("device, message", [("bogus", "--device bogus: expected cpu, cuda"),
                                             ("cuda:99", "--device cuda:99: this machine has"),
                                             ("meta", "--device meta: expected cpu, cuda, cuda:N or mps")])
def test_a_device_this_machine_lacks(capsys, device, message):
    evaluate_fails(capsys, ["--device", device, "--n", "2"], message)


def fake_load(args):
    """No model: which problems are scored is settled before it loads."""
    args.device = "cpu"
    return None, None, {}


def fake_accuracy(seen):
    def accuracy(model, tokenizer, problems, *args):
        seen.append(problems)
        return 0.25
    return accuracy


def test_default_n_is_what_training_evaluates_on(capsys, tmp_path, monkeypatch):
    from minirl.cli import tiny_defaults
    from minirl.config import TrainConfig

    assert evaluate.DEFAULT_N == TrainConfig().eval_n == 300
    assert tiny_defaults()["eval_n"] == 1000
    seen = []
    monkeypatch.setattr(evaluate, "accuracy", fake_accuracy(seen))
    monkeypatch.setattr(evaluate, "load_model_for_cli", fake_load)
    small = write_lines(tmp_path, record(), record(answer=8), record(answer=9))
    for argv, n in [([], 1000),  # the tiny model's runs evaluate on 1,000, not its whole split of 2,640
                    (["--model", str(tmp_path / "model")], 300),  # a user model's: 300
                    (["--task", "svamp"], 300),  # a split smaller than the default is scored whole
                    (["--task", "jsonl", "--test-file", str(small)], 3),
                    (["--n", "5"], 5)]:
        assert evaluate.main(argv) == 0
        assert len(seen[-1]) == n, argv
        assert f"accuracy 25.0% on {n} " in capsys.readouterr().out
    assert seen[0] == load_task("multiplication", "test", n=1000, digits=2)
    assert seen[2] == svamp("test")


def test_evaluate_a_jsonl_file_with_the_numeric_reward(capsys, tmp_path):
    data = write_lines(tmp_path, record("12*34=", "#### 408"), record("21*11=", 231.0), record("Half?", "1/2"))
    out = tmp_path / "eval.jsonl"
    assert evaluate.main(["--task", "jsonl", "--test-file", str(data), "--reward", "numeric", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    [line] = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["n"] == 3 and line["split"] == "test" and 0.0 <= line["accuracy"] <= 1.0
    assert f"accuracy {100 * line['accuracy']:.1f}% on 3 problems of {data} (test split, reward numeric)" in printed
    assert evaluate.main(["--task", "jsonl", "--test-file", str(data), "--reward", "numeric", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2  # appended, never overwritten


def run_module(args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "minirl.evaluate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_user_reward_from_the_current_directory_as_a_real_process(tmp_path):
    """As a user types it: a reward module beside the data, `python -m` from that folder. The callable
    passes the check on the answer itself but returns NaN for what the model writes: one line, mid-run."""
    write_lines(tmp_path, record("12*34=", 408), record("21*11=", 231), name="my.jsonl")
    (tmp_path / "my_reward.py").write_text("import math\n\ndef score(text, answer):\n"
                                           "    return 1.0 if text == str(answer) else math.nan\n")
    done = run_module(["--task", "jsonl", "--test-file", "my.jsonl", "--reward", "my_reward:score"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: --reward my_reward:score: returned nan, expected a finite float")
    assert not done.stdout
