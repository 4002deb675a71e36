"""The rewards R(completion text, answer) -> float, and `--reward SPEC` (DESIGN.md, "Reward").

An answer is an `int` when it is a whole number and a `fractions.Fraction` otherwise, so that 0.1
is exactly 1/10 and equality never hinges on binary rounding. `resolve_reward(spec)` turns the
spec that config.json records into the callable that training and evaluation both use:

last-integer (the default). R = 1.0 when the last integer in the text equals the answer, else 0.0.
An integer, as `last_integer` reads it:
  - ASCII digits, with commas allowed only as thousands separators: "1,234" is 1234, while
    "1, 2, 3" and "1,2,3" are lists whose last integer is 3;
  - a minus sign ("-" or the Unicode "−") is kept unless it follows a letter, digit or closing
    bracket, where it reads as a subtraction: "is -5" gives −5, "12-5" gives 5;
  - a decimal point followed by digits makes a decimal: "12.0" counts as 12 (a whole number
    written as a decimal, as SVAMP's own file writes its answers), "12.5" is no integer at all and is
    skipped (neither 12 nor 5), ".5" too; a period not followed by a digit ends a sentence: "is 408." is 408;
  - anything may follow the number: "408 apples", "12abc".
No integer in the text gives 0.0. An answer that is not whole can never match, so `resolve_reward`
refuses last-integer for problems with such answers rather than train on a reward that is always 0.

numeric. The last number x in the text, as `last_number` reads it: the integers above, decimals
("12.5", ".5", "1,234.75") and simple fractions a/b with integer b ("3/4", "-1/2", "1.5/2"; a/0 is no
number). A sign, a comma and a sentence-ending period read as for last-integer; no exponents ("1e5"
is 1 then 5), no mixed numbers ("1 1/2" is 1/2). R = 1.0 when |x − a| ≤ 1e-6·|a| for the answer a,
in exact arithmetic; for a = 0, where no relative tolerance exists, when |x| ≤ 1e-9, else 0.0.

module:function. A callable (completion_text, answer) -> float of the user's, imported with
importlib (the current directory is importable, as under `python -m`). Its answer argument is an
int or a Fraction as above. Whatever goes wrong — the import, the attribute, a value that is not a
finite real number, an exception inside it — is an InputError naming the spec, one line.
"""

import importlib
import math
import numbers
import os
import re
import sys
from fractions import Fraction

from minirl.errors import InputError

DEFAULT_REWARD = "last-integer"
BUILT_IN = ("last-integer", "numeric")
RELATIVE_TOLERANCE = Fraction(1, 10**6)
ZERO_TOLERANCE = Fraction(1, 10**9)  # |x| allowed when the answer is 0

SIGN = r"(?:(?<![\w)\]])(?P<minus>[-\u2212]))?"  # a sign, unless it reads as a subtraction
DIGITS = r"[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+"  # thousands groups, or plain digits
NUMBER = re.compile(SIGN + rf"(?<![0-9.])(?P<whole>{DIGITS})(?:\.(?P<fraction>[0-9]+))?")
RATIONAL = re.compile(SIGN + rf"(?<![0-9.])(?:(?P<whole>{DIGITS})(?:\.(?P<fraction>[0-9]+))?|\.(?P<bare>[0-9]+))"
                      rf"(?:/(?P<denominator>{DIGITS}))?")


def exact(value: Fraction):
    """int when whole, else the Fraction itself: the one representation of an answer."""
    return value.numerator if value.denominator == 1 else value


def last_integer(text: str) -> int | None:
    """The last integer in `text` under the last-integer rules of the module docstring, or None."""
    value = None
    for match in NUMBER.finditer(text):
        if match["fraction"] and match["fraction"].strip("0"):
            continue  # 12.5 is not an integer, and neither of its parts is one
        n = int(match["whole"].replace(",", ""))
        value = -n if match["minus"] else n
    return value


def last_number(text: str) -> int | Fraction | None:
    """The last number in `text` under the numeric rules of the module docstring, or None."""
    value = None
    for match in RATIONAL.finditer(text):
        whole = (match["whole"] or "0").replace(",", "")
        x = Fraction(f"{whole}.{match['fraction'] or match['bare'] or '0'}")
        if match["denominator"]:
            d = int(match["denominator"].replace(",", ""))
            if d == 0:
                continue  # 3/0 is no number, and neither of its parts is the answer
            x /= d
        value = exact(-x if match["minus"] else x)
    return value


def reward(text: str, answer) -> float:
    """last-integer: R = 1.0 if the last integer in the decoded text equals the answer, else 0.0."""
    value = last_integer(text)
    return 1.0 if value is not None and value == answer else 0.0


def numeric_reward(text: str, answer) -> float:
    """numeric: R = 1.0 if the last number x satisfies |x − a| ≤ 1e-6·|a| (|x| ≤ 1e-9 for a = 0), else 0.0."""
    x = last_number(text)
    if x is None:
        return 0.0
    a = Fraction(answer)
    tolerance = RELATIVE_TOLERANCE * abs(a) if a else ZERO_TOLERANCE
    return 1.0 if abs(x - a) <= tolerance else 0.0


# ----------------------------------------------------------------------------- --reward SPEC

def one_line(text, width: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def import_reward(spec: str):
    """The callable that "module:function" names, wrapped so that every failure is one InputError line."""
    module_name, _, name = spec.partition(":")
    if not all(part.isidentifier() for part in module_name.split(".")) or not name.isidentifier():
        raise InputError(f"--reward {spec}: expected {', '.join(BUILT_IN)} or module:function "
                         f"(a dotted module path and a function name)")
    if os.getcwd() not in [os.path.abspath(p or ".") for p in sys.path]:
        sys.path.append(os.getcwd())  # what `python -m` gives; torchrun and console scripts do not
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a missing module, or any error while running the module's code
        raise InputError(f"--reward {spec}: cannot import {module_name} ({type(e).__name__}: {one_line(e)})") from None
    fn = getattr(module, name, None)
    where = getattr(module, "__file__", None) or module_name
    if fn is None:
        raise InputError(f"--reward {spec}: {where} has no attribute {name!r}")
    if not callable(fn):
        raise InputError(f"--reward {spec}: {module_name}.{name} is a {type(fn).__name__}, not a function")

    def checked(text: str, answer) -> float:
        try:
            value = fn(text, answer)
        except Exception as e:
            raise InputError(f"--reward {spec}: raised {type(e).__name__}: {one_line(e)} "
                             f"(completion {one_line(repr(text), 40)}, answer {answer})") from None
        if not isinstance(value, numbers.Real):
            raise InputError(f"--reward {spec}: returned {one_line(repr(value), 40)} ({type(value).__name__}), "
                             f"expected a float (completion {one_line(repr(text), 40)}, answer {answer})")
        value = float(value)
        if not math.isfinite(value):
            raise InputError(f"--reward {spec}: returned {value}, expected a finite float "
                             f"(completion {one_line(repr(text), 40)}, answer {answer})")
        return value

    checked.__name__ = checked.__qualname__ = spec
    return checked


def resolve_reward(spec: str, problems=()):
    """The reward callable (completion_text, answer) -> float that `spec` names.

    With `problems`, also checks them against it before anything runs: last-integer refuses a
    non-whole answer (it could never be rewarded), and a user callable is called once, on the first
    problem's answer written out, so a broken one fails here and not mid-run.
    """
    if spec == "last-integer":
        for p in problems:
            if not isinstance(p.answer, int):
                where = p.source or f"question {one_line(repr(p.question), 40)}"
                raise InputError(f"--reward last-integer: the answer {p.answer} ({where}) is not a whole number and "
                                 f"could never be rewarded; --reward numeric reads decimals and fractions")
        return reward
    if spec == "numeric":
        return numeric_reward
    if not isinstance(spec, str) or ":" not in spec:
        raise InputError(f"--reward {spec}: expected {', '.join(BUILT_IN)} or module:function")
    fn = import_reward(spec)
    for p in problems[:1]:
        fn(str(p.answer), p.answer)  # str writes 42 as "42", Fraction(-3, 4) as "-3/4"
    return fn
