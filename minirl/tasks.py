"""The two tasks — n-digit multiplication and SVAMP — and their reward (DESIGN.md, "Reward" and "Data").

A task is a list of `Problem`s: the question text (before any prompt style is applied) and the
integer answer. Both tasks have a fixed held-out test split, so accuracies compare from run to run:
the draws below use only `random.Random(seed).random()`, the one part of Python's `random` whose
sequence is guaranteed not to change between Python versions.

Reward. R = 1.0 when the last integer in the decoded completion equals the answer, else 0.0.
An integer, as `last_integer` reads it:
  - ASCII digits, with commas allowed only as thousands separators: "1,234" is 1234, while
    "1, 2, 3" and "1,2,3" are lists whose last integer is 3;
  - a minus sign ("-" or the Unicode "−") is kept unless it follows a letter, digit or closing
    bracket, where it reads as a subtraction: "is -5" gives −5, "12-5" gives 5;
  - a decimal point followed by digits makes a decimal: "12.0" counts as 12 (a whole number
    written as a decimal, as SVAMP's own file writes its answers), "12.5" is no integer at all and is
    skipped (neither 12 nor 5), ".5" too; a period not followed by a digit ends a sentence: "is 408." is 408;
  - anything may follow the number: "408 apples", "12abc".
No integer in the text gives 0.0.
"""

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from minirl.errors import InputError

TASKS = ("multiplication", "svamp")
SPLITS = ("train", "test")

# Fixed forever: changing either changes the test sets and breaks comparisons with earlier runs.
MULTIPLICATION_TEST_SEED = 20240607
SVAMP_SPLIT_SEED = 20240607

MULTIPLICATION_TEST_SIZE = 3000  # the paper's n; small spaces get a third of their pairs instead
MULTIPLICATION_TRAIN_SIZE = 100_000  # default number of train problems (all of them when fewer remain)
MAX_DIGITS = 8  # (9·10^7)² pairs < 2^53, so int(random() · space) still reaches every pair

SVAMP_PATH = Path(__file__).parent / "data" / "svamp" / "SVAMP.json"
SVAMP_TEST_SIZE = 300  # the paper's test size; the other 700 problems are the train split
SVAMP_INSTRUCTION = "End your reply with the final answer as a number."


@dataclass(frozen=True)
class Problem:
    question: str  # what the model is asked, before tokenizer.format_prompt applies a style
    answer: int


# ----------------------------------------------------------------------------- reward

NUMBER = re.compile(
    r"(?:(?<![\w)\]])(?P<minus>[-\u2212]))?"  # a sign, unless it reads as a subtraction
    r"(?<![0-9.])(?P<whole>[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)"  # thousands groups, or plain digits
    r"(?:\.(?P<fraction>[0-9]+))?"
)


def last_integer(text: str) -> int | None:
    """The last integer in `text` under the rules of the module docstring, or None."""
    value = None
    for match in NUMBER.finditer(text):
        if match["fraction"] and match["fraction"].strip("0"):
            continue  # 12.5 is not an integer, and neither of its parts is one
        n = int(match["whole"].replace(",", ""))
        value = -n if match["minus"] else n
    return value


def reward(text: str, answer: int) -> float:
    """R = 1.0 if the last integer in the decoded text equals the answer, else 0.0."""
    value = last_integer(text)
    return 1.0 if value is not None and value == answer else 0.0


# ----------------------------------------------------------------------------- argument checks

def check_split(split: str):
    if split not in SPLITS:
        raise InputError(f"split: expected 'train' or 'test', got {split!r}")


def check_n(n, available: int | None = None, what: str = ""):
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n: expected a positive integer number of problems, got {n!r}")
    if available is not None and n > available:
        raise InputError(f"n: {n} problems asked, but the {what} has only {available}")


# ----------------------------------------------------------------------------- multiplication

def factor_range(digits: int) -> tuple[int, int]:
    """Factors 10^(d−1)+1 .. 10^d−1, as in the paper (d = 3: 101..999, so no factor is a power of ten)."""
    return 10 ** (digits - 1) + 1, 10 ** digits - 1


def multiplication_test_size(digits: int) -> int:
    """3,000 problems, or a third of all ordered pairs when that is fewer (d = 2: 89² = 7,921 → 2,640)."""
    lo, hi = factor_range(digits)
    return min(MULTIPLICATION_TEST_SIZE, (hi - lo + 1) ** 2 // 3)


def draw_distinct(rng: random.Random, space: int, k: int, exclude: frozenset = frozenset()) -> list[int]:
    """k distinct indices from range(space) minus `exclude`, uniformly, in the order drawn."""
    free = space - len(exclude)
    if 2 * k > free:
        # Most of the space is wanted: shuffle all of it rather than reject ever more repeats.
        pool = [i for i in range(space) if i not in exclude]
        keys = [rng.random() for _ in pool]
        return [pool[j] for j in sorted(range(len(pool)), key=keys.__getitem__)[:k]]
    seen, out = set(exclude), []
    while len(out) < k:
        i = int(rng.random() * space)
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def multiplication(split: str, n: int | None = None, digits: int = 3, seed: int = 0) -> list[Problem]:
    """d-digit × d-digit products; the question is the compact "a*b=", the answer a·b.

    The tiny char-level model learns exactly this form, the product's digits following the "=".
    test: a fixed set of multiplication_test_size(digits) ordered pairs (a, b), drawn with
    MULTIPLICATION_TEST_SEED whatever `seed` says; n takes its first n, so a smaller test set is a
    prefix of the larger one.
    train: n (default: MULTIPLICATION_TRAIN_SIZE, or every remaining pair when fewer remain)
    distinct pairs outside the test set, drawn with `seed`. Past the number of remaining pairs it
    repeats: each pass is a fresh shuffle of all of them, so no pair comes twice before all came once.
    Pairs are ordered: 12*34= and 34*12= are two problems and may fall in different splits.
    """
    check_split(split)
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= MAX_DIGITS:
        raise InputError(f"digits: expected an integer from 1 to {MAX_DIGITS}, got {digits!r}")
    lo, hi = factor_range(digits)
    m = hi - lo + 1
    space = m * m
    test = draw_distinct(random.Random(MULTIPLICATION_TEST_SEED + digits), space, multiplication_test_size(digits))
    if split == "test":
        check_n(n, len(test), f"{digits}-digit multiplication test split")
        indices = test[:n]
    else:
        check_n(n)  # any positive count: the train split repeats when exhausted
        free = space - len(test)
        k = min(free, MULTIPLICATION_TRAIN_SIZE) if n is None else n
        rng, exclude = random.Random(seed), frozenset(test)
        indices = []
        while len(indices) < k:
            indices += draw_distinct(rng, space, min(k - len(indices), free), exclude)
    return [Problem(f"{lo + i // m}*{lo + i % m}=", (lo + i // m) * (lo + i % m)) for i in indices]


# ----------------------------------------------------------------------------- SVAMP

def short(value, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def load_svamp(path=SVAMP_PATH) -> list[Problem]:
    """Every problem of a SVAMP.json file, in file order; question = Body + " " + Question + instruction.

    Whitespace runs collapse to one space. Answers are stored as floats; each must be a whole number.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot read the SVAMP file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: expected UTF-8 JSON text") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list) or not data:
        raise InputError(f"{path}: expected a non-empty JSON list of problems, got {type(data).__name__}")
    problems = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise InputError(f"{path}: problem {i}: expected an object with Body, Question and Answer, "
                             f"got {short(item)}")
        where = f"{path}: problem {i}" + (f" (ID {item['ID']})" if isinstance(item.get("ID"), str) else "")
        for field in ("Body", "Question", "Answer"):
            if field not in item:
                raise InputError(f"{where}: field {field!r} is missing")
        for field in ("Body", "Question"):
            if not isinstance(item[field], str) or not item[field].strip():
                raise InputError(f"{where}: field {field!r}: expected non-empty text, got {short(item[field])}")
        answer = item["Answer"]
        if (isinstance(answer, bool) or not isinstance(answer, (int, float)) or not math.isfinite(answer)
                or answer != int(answer)):
            raise InputError(f"{where}: field 'Answer': expected a whole number, got {short(answer)}")
        text = " ".join(f"{item['Body']} {item['Question']} {SVAMP_INSTRUCTION}".split())
        problems.append(Problem(text, int(answer)))
    return problems


def svamp_split(count: int) -> tuple[list[int], list[int]]:
    """(train, test) indices: a seeded shuffle of range(count); its first SVAMP_TEST_SIZE are the test split."""
    rng = random.Random(SVAMP_SPLIT_SEED)
    keys = [rng.random() for _ in range(count)]
    order = sorted(range(count), key=keys.__getitem__)
    return order[SVAMP_TEST_SIZE:], order[:SVAMP_TEST_SIZE]


def svamp(split: str, n: int | None = None) -> list[Problem]:
    """The shipped SVAMP problems (minirl/data/svamp/): 700 train, 300 test, fixed by SVAMP_SPLIT_SEED.

    Both splits come in the shuffled order, so the first n of a split are a random sample of it.
    """
    check_split(split)
    problems = load_svamp(SVAMP_PATH)
    if len(problems) <= SVAMP_TEST_SIZE:
        raise InputError(f"{SVAMP_PATH}: expected more than {SVAMP_TEST_SIZE} problems, got {len(problems)}")
    train, test = svamp_split(len(problems))
    indices = test if split == "test" else train
    check_n(n, len(indices), f"SVAMP {split} split")
    return [problems[i] for i in indices[:n]]


def load_task(name: str, split: str, n: int | None = None, digits: int = 3, seed: int = 0) -> list[Problem]:
    """The problems of one task's split; `digits` and `seed` matter only to multiplication's draws."""
    if name == "multiplication":
        return multiplication(split, n=n, digits=digits, seed=seed)
    if name == "svamp":
        return svamp(split, n=n)
    raise InputError(f"task: expected one of {', '.join(TASKS)}, got {name!r}")
