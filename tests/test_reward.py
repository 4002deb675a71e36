"""The rewards and `--reward SPEC` (minirl/reward.py; DESIGN.md, "Reward")."""

import importlib
import itertools
import os
import sys
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minirl.errors import InputError
from minirl.reward import last_integer, last_number, numeric_reward, resolve_reward, reward
from minirl.tasks import Problem

# (decoded completion, the last integer in it or None)
LAST_INTEGER = [
    ("", None),
    ("no digits here", None),
    ("408", 408),
    ("The answer is 408.", 408),  # a sentence-ending period is no decimal point
    ("The answer is 408.\n", 408),
    ("408 apples in total", 408),
    ("12abc", 12),
    ("abc12", 12),
    ("1,234", 1234),
    ("it costs $1,234,567 today", 1234567),
    ("1, 2, 3", 3),  # a list, not a number with separators
    ("1,2,3", 3),
    ("12,34", 34),  # not thousands groups: two integers
    ("1,2345", 2345),
    ("1,234.", 1234),
    ("-5", -5),
    ("the result is -17", -17),
    ("the result is \u221217", -17),  # the Unicode minus sign
    ("12-5", 5),  # a subtraction: the minus after a digit is no sign
    ("x-5", 5),
    ("(3)-5", 5),
    ("x = -5", -5),
    ("12.5", None),  # a decimal is not an integer, nor are its two halves
    ("7 then 12.5", 7),
    ("12.0", 12),  # a whole number written as a decimal
    ("12.000 and more", 12),
    ("-3.0", -3),
    ("1,234.50", None),
    ("1,234.00", 1234),
    (".5", None),
    ("v3.14.15", None),  # 3.14 is a decimal and ".15" starts with a point: no integer
    ("12*34=408", 408),
    ("0", 0),
    ("-0", 0),
    ("007", 7),
    ("first 5, then 6;", 6),
    ("99999999999999999999", 99999999999999999999),
]


@pytest.mark.parametrize("text, value", LAST_INTEGER)
def test_last_integer(text, value):
    assert last_integer(text) == value


@pytest.mark.parametrize("text, value", [(t, v) for t, v in LAST_INTEGER if v is not None])
def test_reward_is_exact_match_of_the_last_integer(text, value):
    assert reward(text, value) == 1.0
    assert reward(text, value + 1) == 0.0
    assert reward(text, -value if value else 1) == 0.0
    assert isinstance(reward(text, value), float)


@pytest.mark.parametrize("text", [t for t, v in LAST_INTEGER if v is None])
def test_no_integer_gives_zero(text):
    for answer in (0, 5, 12, -1):
        assert reward(text, answer) == 0.0


@settings(max_examples=200, deadline=None)
@given(st.integers(-10**12, 10**12), st.text(alphabet="abc ,.;=:\n", max_size=8),
       st.text(alphabet="abc ,;:=\n", max_size=8).filter(lambda s: not s.startswith(",")))
def test_reward_reads_any_integer_written_plainly_or_with_thousands_commas(n, before, after):
    before = before + " " if before else ""  # keeps a '-' of n from reading as a subtraction or decimal
    assert reward(f"{before}{n}{after}", n) == 1.0
    assert reward(f"{before}{n:,}{after}", n) == 1.0
    assert reward(f"{before}{n}{after}", n + 1) == 0.0



def test_the_old_import_path_still_gives_the_same_reward():
    from minirl import tasks
    assert tasks.reward is reward


# ----------------------------------------------------------------------------- numeric

F = Fraction
# (decoded completion, the last number in it or None)
LAST_NUMBER = [
    ("", None),
    ("no digits here", None),
    ("408", 408),
    ("The answer is 408.", 408),  # a sentence-ending period is no decimal point
    ("12.5", F(25, 2)),
    ("it is 0.75.", F(3, 4)),
    ("0.1", F(1, 10)),  # exactly a tenth, not the float nearest to it
    (".5", F(1, 2)),
    ("x = -.5", F(-1, 2)),
    ("12.0", 12),
    ("3/4", F(3, 4)),
    ("-1/2", F(-1, 2)),
    ("\u22121/2", F(-1, 2)),  # the Unicode minus sign
    ("6/4", F(3, 2)),
    ("8/4", 2),
    ("1.5/2", F(3, 4)),
    ("1/1,000", F(1, 1000)),
    ("3/0", None),  # no number, and neither 3 nor 0
    ("7 and then 3/0", 7),
    ("1,234", 1234),
    ("1,234.75", F(4939, 4)),
    ("it costs $1,234,567.00", 1234567),
    ("1, 2, 3", 3),
    ("12,34", 34),
    ("12-5", 5),  # a subtraction
    ("x-5", 5),
    ("is -5", -5),
    ("-0.0", 0),
    ("12.50 then 7/8", F(7, 8)),
    ("first 0.5 then 17 apples", 17),
    ("1e5", 5),  # no exponents
    ("1 1/2", F(1, 2)),  # no mixed numbers
    ("v3.14.15", F(157, 50)),
    ("3/4/2024", 2024),
    ("50%", 50),
    ("#### 42", 42),
    ("99999999999999999999.5", F(199999999999999999999, 2)),
]


@pytest.mark.parametrize("text, value", LAST_NUMBER)
def test_last_number(text, value):
    got = last_number(text)
    assert got == value
    assert type(got) is type(value)  # an int when whole, a Fraction otherwise, None for no number


@pytest.mark.parametrize("text, value", [(t, v) for t, v in LAST_NUMBER if v is not None])
def test_numeric_reward_matches_the_last_number(text, value):
    assert numeric_reward(text, value) == 1.0
    assert numeric_reward(text, value + max(1, abs(value)) / 1000) == 0.0  # 1e-3 off
    assert numeric_reward(text, -value if value else 1) == 0.0
    assert isinstance(numeric_reward(text, value), float)


@pytest.mark.parametrize("text, answer, expected", [
    # relative 1e-6 of the answer, boundary included, in exact arithmetic
    ("1000001", 1_000_000, 1.0),
    ("999999", 1_000_000, 1.0),
    ("1000001.000001", 1_000_000, 0.0),
    ("999998.999999", 1_000_000, 0.0),
    ("0.5000005", F(1, 2), 1.0),
    ("0.5000006", F(1, 2), 0.0),
    ("-3.000003", -3, 1.0),
    ("-3.0000031", -3, 0.0),
    ("3", -3, 0.0),
    ("0.333333", F(1, 3), 1.0),  # 1/3 − 0.333333 is exactly 1e-6 · 1/3
    ("0.33333", F(1, 3), 0.0),
    ("1/3", F(1, 3), 1.0),
    ("0.1", F(1, 10), 1.0),
    ("0.1000001", F(1, 10), 1.0),
    ("0.1000002", F(1, 10), 0.0),
    ("408", 408, 1.0),
    ("408.0004", 408, 1.0),
    ("408.001", 408, 0.0),
    ("the answer is 0.000001", F(1, 10**6), 1.0),
    ("the answer is 0.0000011", F(1, 10**6), 0.0),  # relative, not absolute: 10 % off is wrong
    # an answer of 0: |x| ≤ 1e-9
    ("0", 0, 1.0),
    ("-0", 0, 1.0),
    ("0.000", 0, 1.0),
    ("0.000000001", 0, 1.0),
    ("-0.000000001", 0, 1.0),
    ("0.0000000011", 0, 0.0),
    ("0.000001", 0, 0.0),
    ("no number", 0, 0.0),
])
def test_numeric_tolerance(text, answer, expected):
    assert numeric_reward(text, answer) == expected


@settings(max_examples=200, deadline=None)
@given(st.integers(-10**9, 10**9), st.integers(0, 6), st.sampled_from(["", "The answer is ", "x = ", "so "]),
       st.sampled_from(["", ".", " apples", "\n", ";"]))
def test_numeric_reads_any_decimal_written_plainly_or_with_thousands_commas(units, places, before, after):
    value = F(units, 10 ** places)
    whole, fraction = divmod(abs(units), 10 ** places)
    sign = "-" if units < 0 else ""
    tail = f".{fraction:0{places}d}" if places else ""
    for written in (f"{whole}", f"{whole:,}"):
        text = f"{before}{sign}{written}{tail}{after}"
        assert last_number(text) == value, text
        assert numeric_reward(text, value) == 1.0


@settings(max_examples=200, deadline=None)
@given(st.integers(-10**6, 10**6), st.integers(1, 10**6))
def test_numeric_reads_any_fraction(a, b):
    assert last_number(f"so it is {a}/{b}.") == F(a, b)
    assert numeric_reward(f"{a}/{b}", F(a, b)) == 1.0


# ----------------------------------------------------------------------------- --reward SPEC

def test_built_in_specs():
    assert resolve_reward("last-integer") is reward
    assert resolve_reward("numeric") is numeric_reward
    whole = [Problem("q", 3), Problem("r", -12)]
    assert resolve_reward("last-integer", whole) is reward


def test_last_integer_refuses_an_answer_it_could_never_reward():
    problems = [Problem("q", 3), Problem("half of 1?", F(1, 2), "data.jsonl, line 2")]
    with pytest.raises(InputError, match=r"^--reward last-integer: the answer 1/2 \(data.jsonl, line 2\) .*numeric"):
        resolve_reward("last-integer", problems)
    with pytest.raises(InputError, match="half of 1"):  # a problem from no file is named by its question
        resolve_reward("last-integer", [Problem("half of 1?", F(1, 2))])
    assert resolve_reward("numeric", problems) is numeric_reward


names = (f"user_reward_{i}" for i in itertools.count())


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """write(source) -> a fresh module name, importable only because the current directory is tmp_path.

    The current directory is taken off sys.path first, so these tests fail unless resolve_reward
    puts it back, as `python -m` users expect.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", os.getcwd(), str(tmp_path))])

    def write(source: str) -> str:
        name = next(names)
        (tmp_path / f"{name}.py").write_text(source)
        importlib.invalidate_caches()
        monkeypatch.delitem(sys.modules, name, raising=False)
        return name

    return write


def test_a_user_reward_from_the_current_directory(user_module):
    name = user_module("def score(text, answer):\n    return 2.5 if str(answer) in text else -1\n")
    fn = resolve_reward(f"{name}:score", [Problem("q", F(3, 4))])
    assert fn("so 3/4", F(3, 4)) == 2.5 and fn("no", 7) == -1.0
    assert isinstance(fn("no", 7), float)
    bools = user_module("def score(text, answer):\n    return text == str(answer)\n")
    assert resolve_reward(f"{bools}:score")("7", 7) == 1.0  # a bool is a number: True is 1.0


def test_a_user_reward_in_a_package(user_module, tmp_path):
    (tmp_path / "mypkg_rewards").mkdir()
    (tmp_path / "mypkg_rewards" / "__init__.py").write_text("")
    (tmp_path / "mypkg_rewards" / "maths.py").write_text("def exact(text, answer):\n    return 1.0\n")
    assert resolve_reward("mypkg_rewards.maths:exact")("x", 1) == 1.0


@pytest.mark.parametrize("spec, message", [
    ("exact", "expected last-integer, numeric or module:function"),
    ("", "expected last-integer, numeric or module:function"),
    ("Numeric", "expected last-integer, numeric or module:function"),
    ("mod:", "dotted module path and a function name"),
    (":fn", "dotted module path and a function name"),
    ("my mod:fn", "dotted module path and a function name"),
    ("mod:fn:extra", "dotted module path and a function name"),
    ("path/to/file.py:fn", "dotted module path and a function name"),
    ("no_such_module_anywhere:fn", r"cannot import no_such_module_anywhere \(ModuleNotFoundError"),
])
def test_bad_spec(spec, message):
    with pytest.raises(InputError, match=message) as err:
        resolve_reward(spec)
    assert str(err.value).startswith(f"--reward {spec}: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("source, message", [
    ("raise RuntimeError('no GPU here')", r"cannot import .*RuntimeError: no GPU here"),
    ("def score(text, answer:\n    pass", r"cannot import .*SyntaxError"),
    ("import no_such_dependency_xyz", r"cannot import .*No module named 'no_such_dependency_xyz'"),
    ("def other(text, answer):\n    return 1.0", r"\.py has no attribute 'score'"),
    ("score = 3", r"\.score is a int, not a function"),
])
def test_bad_user_module(user_module, source, message):
    name = user_module(source)
    with pytest.raises(InputError, match=message) as err:
        resolve_reward(f"{name}:score")
    assert str(err.value).startswith(f"--reward {name}:score: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("body, message", [
    ("return 1 / 0", r"raised ZeroDivisionError: division by zero \(completion '3/4', answer 3/4\)"),
    ("raise ValueError('line one\\nline two')", "raised ValueError: line one line two"),
    ("return float('nan')", "returned nan, expected a finite float"),
    ("return float('-inf')", "returned -inf, expected a finite float"),
    ("return None", r"returned None \(NoneType\), expected a float"),
    ("return '1.0'", r"returned '1.0' \(str\), expected a float"),
    ("return [1.0]", r"\(list\), expected a float"),
    ("return 1j", r"\(complex\), expected a float"),
])
def test_a_user_reward_that_misbehaves_is_one_line_naming_the_spec(user_module, body, message):
    name = user_module(f"def score(text, answer):\n    {body}\n")
    spec = f"{name}:score"
    fn = resolve_reward(spec)  # without problems nothing is called yet
    for call in (lambda: fn("3/4", F(3, 4)), lambda: resolve_reward(spec, [Problem("q", F(3, 4))])):
        with pytest.raises(InputError, match=message) as err:
            call()  # and with problems, the check runs before any training or evaluation
        assert str(err.value).startswith(f"--reward {spec}: ") and "\n" not in str(err.value)


def test_a_user_reward_with_the_wrong_signature(user_module):
    name = user_module("def score(text):\n    return 1.0\n")
    with pytest.raises(InputError, match=rf"^--reward {name}:score: raised TypeError"):
        resolve_reward(f"{name}:score", [Problem("q", 1)])


def test_a_user_reward_may_return_numpy_and_integer_values(user_module):
    pytest.importorskip("numpy")
    name = user_module("import numpy as np\ndef score(text, answer):\n    return np.float32(0.25)\n"
                       "def count(text, answer):\n    return len(text)\n")
    assert resolve_reward(f"{name}:score")("x", 1) == 0.25
    assert resolve_reward(f"{name}:count")("abc", 1) == 3.0
