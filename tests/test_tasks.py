"""The built-in tasks (DESIGN.md, "Data"); the JSONL task is in test_jsonl.py, the rewards in test_reward.py."""

import hashlib
import json
import shutil

import pytest

from minirl.errors import InputError
from minirl.tasks import (SVAMP_PATH, Problem, factor_range, load_svamp, load_task, multiplication,
                          multiplication_test_size, svamp, svamp_split)


# ----------------------------------------------------------------------------- multiplication

@pytest.mark.parametrize("digits", [1, 2, 3])
def test_multiplication_splits_are_disjoint_and_in_range(digits):
    lo, hi = factor_range(digits)
    assert (lo, hi) == (10 ** (digits - 1) + 1, 10 ** digits - 1)
    test = multiplication("test", digits=digits)
    train = multiplication("train", digits=digits, n=min(5000, (hi - lo + 1) ** 2 - len(test)))
    assert len(test) == multiplication_test_size(digits)
    assert len(set(test)) == len(test) and len(set(train)) == len(train)
    assert not set(test) & set(train)
    for p in test + train:
        a, b = map(int, p.question.removesuffix("=").split("*"))
        assert p.question == f"{a}*{b}="
        assert lo <= a <= hi and lo <= b <= hi
        assert p.answer == a * b


def test_multiplication_3_digits_as_in_the_paper():
    assert factor_range(3) == (101, 999)
    test = multiplication("test")
    assert len(test) == 3000
    factors = [int(x) for p in test for x in p.question[:-1].split("*")]
    assert min(factors) >= 101 and max(factors) <= 999
    assert min(factors) < 120 and max(factors) > 980  # the whole range is drawn, not a corner of it


def test_multiplication_test_set_is_fixed():
    test = multiplication("test", digits=3)
    assert multiplication("test", digits=3, seed=123) == test  # the seed moves only the train draws
    assert multiplication("test", n=300, digits=3) == test[:300]
    assert load_task("multiplication", "test", n=10, seed=7) == test[:10]
    # Pinned: the test set must never change silently, or results stop being comparable across runs.
    digest = hashlib.sha256("\n".join(p.question for p in test).encode()).hexdigest()
    assert digest == PINNED_MULTIPLICATION_TEST_SHA256
    assert multiplication_test_size(2) == 7921 // 3


def test_multiplication_train_draws_follow_the_seed():
    a = multiplication("train", n=500, digits=3, seed=1)
    assert multiplication("train", n=500, digits=3, seed=1) == a
    b = multiplication("train", n=500, digits=3, seed=2)
    assert a != b and len(set(a) & set(b)) < 50
    assert len(multiplication("train", digits=3)) == 100_000


def test_multiplication_train_repeats_only_after_exhausting_the_pairs():
    free = 89 * 89 - multiplication_test_size(2)
    train = multiplication("train", n=2 * free + 7, digits=2)
    first, second = train[:free], train[free:2 * free]
    assert len(set(first)) == free and set(first) == set(second) and first != second
    assert not set(train) & set(multiplication("test", digits=2))
    assert multiplication("train", digits=2) == first  # the default: every remaining pair once


@pytest.mark.parametrize("kwargs, named", [
    (dict(split="dev"), "split"),
    (dict(split="test", digits=0), "digits"),
    (dict(split="test", digits=9), "digits"),
    (dict(split="test", digits=2.0), "digits"),
    (dict(split="test", n=0), "n"),
    (dict(split="train", n=-3), "n"),
    (dict(split="test", n=2641, digits=2), "n"),
])
def test_multiplication_bad_arguments(kwargs, named):
    with pytest.raises(InputError, match=rf"^{named}: "):
        multiplication(**kwargs)


# ----------------------------------------------------------------------------- SVAMP

def test_svamp_split_sizes_disjoint_and_stable():
    train, test = svamp("train"), svamp("test")
    assert len(train) == 700 and len(test) == 300
    everything = load_svamp()
    assert len(everything) == 1000
    assert sorted(train + test, key=everything.index) == everything  # a partition of the file
    assert not {p.question for p in train} & {p.question for p in test}
    assert svamp("test") == test and svamp("test", n=50) == test[:50]
    assert load_task("svamp", "test", digits=5, seed=9) == test
    # pinned like the multiplication test set: which problems are held out, whatever the prompt wording
    assert [everything.index(p) for p in test] == svamp_split(1000)[1]
    assert hashlib.sha256(repr(svamp_split(1000)[1]).encode()).hexdigest() == PINNED_SVAMP_TEST_SHA256


def test_svamp_problems_match_the_file():
    raw = json.loads(SVAMP_PATH.read_text())
    problems = load_svamp()
    for item, p in zip(raw, problems):
        assert p.answer == item["Answer"] and isinstance(p.answer, int)
        assert p.question.startswith(" ".join(f"{item['Body']} {item['Question']}".split()) + " ")
        assert "  " not in p.question
    # the shipped copy carries its licence
    assert (SVAMP_PATH.parent / "LICENSE").read_text().startswith("MIT License")


def test_svamp_bad_arguments():
    with pytest.raises(InputError, match="^split: "):
        svamp("validation")
    with pytest.raises(InputError, match="^n: .*300"):
        svamp("test", n=301)


def write(tmp_path, data, raw=False):
    path = tmp_path / "SVAMP.json"
    path.write_text(data if raw else json.dumps(data))
    return path


GOOD = {"ID": "chal-1", "Body": "Tom has 3 apples.", "Question": "How many apples?", "Equation": "3.0",
        "Answer": 3.0, "Type": "Addition"}


@pytest.mark.parametrize("data, message", [
    ('[{"Body": "x",', "not valid JSON"),
    ({"Body": "x"}, "expected a non-empty JSON list"),
    ([], "expected a non-empty JSON list"),
    ([GOOD, "oops"], "problem 1: expected an object"),
    ([GOOD, {**GOOD, "ID": "chal-2", "Answer": 2.5}], r"problem 1 \(ID chal-2\): field 'Answer': expected a whole"),
    ([{**GOOD, "Answer": "3"}], "field 'Answer'"),
    ([{**GOOD, "Answer": True}], "field 'Answer'"),
    ([{**GOOD, "Answer": None}], "field 'Answer'"),
    ([GOOD, GOOD, {k: v for k, v in GOOD.items() if k != "Question"}], "problem 2 .*'Question' is missing"),
    ([{**GOOD, "Body": "  "}], "field 'Body': expected non-empty text"),
    ([{**GOOD, "Body": 7}], "field 'Body'"),
])
def test_malformed_svamp_file_names_file_problem_and_field(tmp_path, data, message):
    path = write(tmp_path, data, raw=isinstance(data, str))
    with pytest.raises(InputError, match=message) as err:
        load_svamp(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_svamp_nan_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="field 'Answer'"):
        load_svamp(write(tmp_path, '[{"Body": "a", "Question": "b", "Answer": NaN}]', raw=True))
    missing = tmp_path / "nowhere.json"
    with pytest.raises(InputError, match=str(missing)):
        load_svamp(missing)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe[")
    with pytest.raises(InputError, match="bin.json"):
        load_svamp(tmp_path / "bin.json")


def test_a_good_svamp_file_loads(tmp_path):
    src = tmp_path / "copy.json"
    shutil.copy(SVAMP_PATH, src)
    assert load_svamp(src) == load_svamp()
    assert load_svamp(write(tmp_path, [{**GOOD, "Body": "Tom  has\n3 apples."}])) == [
        Problem(load_svamp(write(tmp_path, [GOOD]))[0].question, 3)]


def test_load_task_rejects_unknown_names():
    with pytest.raises(InputError, match="^task: .*'chess'"):
        load_task("chess", "test")
    with pytest.raises(InputError, match="^split: "):
        load_task("multiplication", "val")
    with pytest.raises(InputError, match="^split: "):
        load_task("svamp", "val")


PINNED_MULTIPLICATION_TEST_SHA256 = "3c9768a4597b25e184c05963b894df6ea6ba9858878344f1ed0dae63cf730518"
PINNED_SVAMP_TEST_SHA256 = "5dd7d77d2dd1ba88289f5beee1d37ab567113ada93d1006540594cbf9c73eec4"
