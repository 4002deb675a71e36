"""The tasks — n-digit multiplication, SVAMP and the user's own JSONL file (DESIGN.md, "Data").

A task is a list of `Problem`s: the question text (before any prompt style is applied) and the
answer, an int when whole and a fractions.Fraction otherwise (minirl/reward.py scores completions
against it). The built-in tasks have a fixed held-out test split, so accuracies compare from run to
run: the draws below use only `random.Random(seed).random()`, the one part of Python's `random` whose
sequence is guaranteed not to change between Python versions. A JSONL task's splits are its two files.
"""

import json
import math
import random
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from minirl.errors import InputError
from minirl.reward import exact, last_number, reward  # noqa: F401  (reward: its import path before reward.py)

# Worded arithmetic for chat models: name -> (operator, digits of a, digits of b) (worded(), below).
WORDED = {"addition-2+2": ("+", 2, 2), "multiplication-2x1": ("*", 2, 1), "multiplication-2x2": ("*", 2, 2)}
TASKS = ("multiplication", "svamp", "jsonl", *WORDED)
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
    answer: int | Fraction  # int when whole
    source: str = field(default="", compare=False)  # "FILE, line N" for a JSONL record, for error messages


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


def shuffled(n: int, rng: random.Random) -> list[int]:
    """range(n) in a random order made with rng.random() alone, whose sequence Python keeps across versions."""
    keys = [rng.random() for _ in range(n)]
    return sorted(range(n), key=keys.__getitem__)


def draw_distinct(rng: random.Random, space: int, k: int, exclude: frozenset = frozenset()) -> list[int]:
    """k distinct indices from range(space) minus `exclude`, uniformly, in the order drawn."""
    free = space - len(exclude)
    if 2 * k > free:
        # Most of the space is wanted: shuffle all of it rather than reject ever more repeats.
        pool = [i for i in range(space) if i not in exclude]
        return [pool[j] for j in shuffled(len(pool), rng)[:k]]
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
        for name in ("Body", "Question", "Answer"):
            if name not in item:
                raise InputError(f"{where}: field {name!r} is missing")
        for name in ("Body", "Question"):
            if not isinstance(item[name], str) or not item[name].strip():
                raise InputError(f"{where}: field {name!r}: expected non-empty text, got {short(item[name])}")
        answer = item["Answer"]
        if (isinstance(answer, bool) or not isinstance(answer, (int, float)) or not math.isfinite(answer)
                or answer != int(answer)):
            raise InputError(f"{where}: field 'Answer': expected a whole number, got {short(answer)}")
        text = " ".join(f"{item['Body']} {item['Question']} {SVAMP_INSTRUCTION}".split())
        problems.append(Problem(text, int(answer)))
    return problems


def svamp_split(count: int) -> tuple[list[int], list[int]]:
    """(train, test) indices: a seeded shuffle of range(count); its first SVAMP_TEST_SIZE are the test split."""
    order = shuffled(count, random.Random(SVAMP_SPLIT_SEED))
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


# ----------------------------------------------------------------------------- JSONL: the user's own problems

def read_answer(value):
    """A record's answer: a JSON number as it is, or text whose number is read, under the numeric reward's
    rules (minirl/reward.py), from the part after the last "####" when there is one (a GSM8K solution
    ends in "#### 42") and else from the last number of the text. None when there is no number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, Fraction):  # a JSON decimal, parsed exactly (load_jsonl's parse_float)
        return exact(value)
    if isinstance(value, str):
        return last_number(value.rpartition("####")[2])
    return None


def load_jsonl(path) -> list[Problem]:
    """Every record of a JSONL file, in file order.

    One JSON object per line, with "question" (non-empty text, before a prompt style is applied) and
    "answer" (see read_answer); other fields are ignored, blank lines skipped. UTF-8 only.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read the JSONL file ({e.strerror or e})") from None
    problems = []
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        where = f"{path}, line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); "
                             f"JSONL files must be UTF-8") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_float=Fraction)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # a number of over 4,300 digits, nesting too deep
            raise InputError(f"{where}: not readable JSON ({type(e).__name__}: {str(e)[:80]})") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object with 'question' and 'answer', got {short(record)}")
        for name in ("question", "answer"):
            if name not in record:
                raise InputError(f"{where}: field {name!r} is missing")
        question = record["question"]
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"{where}: field 'question': expected non-empty text, got {short(question)}")
        answer = read_answer(record["answer"])
        if answer is None:
            raise InputError(f"{where}: field 'answer': expected a number, or text with one (after '####' "
                             f"if present), got {short(record['answer'])}")
        problems.append(Problem(question, answer, where))
    if not problems:
        raise InputError(f"{path}: no records; expected one JSON object per line with 'question' and 'answer'")
    return problems


def jsonl(split: str, path, n: int | None = None) -> list[Problem]:
    """One split of a JSONL task: the file's records in file order, the first n with n.

    The file is the split: training draws its problems from the train file at random, as from a
    built-in train split, and evaluates on the first n of the test file.
    """
    check_split(split)
    problems = load_jsonl(path)
    check_n(n, len(problems), f"file {path}")
    return problems[:n]


# ----------------------------------------------------------------------------- worded arithmetic

WORDED_TEST_SIZE = 300  # n of the held-out split, as SVAMP's
# "Answer with only the number." left 17-74% of SmolLM2-135M-Instruct's greedy answers unfinished at 64 tokens
# ("To solve this, …"); this wording finishes 96-98% at 32 (tools/real_model_baseline.py, n = 300).
WORDED_INSTRUCTION = "Reply with the number only, nothing else."


def worded(name: str, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
    """WORDED[name] as a chat model is asked it: "What is 47 * 8? Reply with the number only, nothing else.".

    Operands come from factor_range (2-digit: 11..99, 1-digit: 2..9). Without the instruction a small
    instruct model explains at length and the number comes late or never (tools/real_model_baseline.py
    measures how many answers finish within a token budget). test: WORDED_TEST_SIZE ordered pairs,
    fixed by MULTIPLICATION_TEST_SEED and the name whatever `seed` says, its first n when n is given;
    train: the other pairs, n of them (default: all), drawn with `seed`, each pass over them a fresh
    shuffle, as in multiplication's train split.
    """
    check_split(split)
    op, digits_a, digits_b = WORDED[name]
    (lo_a, hi_a), (lo_b, hi_b) = factor_range(digits_a), factor_range(digits_b)
    m = hi_b - lo_b + 1
    space = (hi_a - lo_a + 1) * m
    test_seed = MULTIPLICATION_TEST_SEED + 1000 + 100 * digits_a + 10 * digits_b + "+*".index(op)
    test = draw_distinct(random.Random(test_seed), space, WORDED_TEST_SIZE)
    if split == "test":
        check_n(n, len(test), f"{name} test split")
        indices = test[:n]
    else:
        check_n(n)
        free = space - len(test)
        k = free if n is None else n
        rng, exclude, indices = random.Random(seed), frozenset(test), []
        while len(indices) < k:
            indices += draw_distinct(rng, space, min(k - len(indices), free), exclude)
    pairs = [(lo_a + i // m, lo_b + i % m) for i in indices]
    return [Problem(f"What is {a} {op} {b}? {WORDED_INSTRUCTION}", a + b if op == "+" else a * b) for a, b in pairs]


def load_task(name: str, split: str, n: int | None = None, digits: int = 3, seed: int = 0,
              path=None) -> list[Problem]:
    """The problems of one task's split; `digits` and `seed` matter only to multiplication's draws,
    `path` (the split's file) only to jsonl, which needs it."""
    if name == "jsonl":
        check_split(split)
        if path is None:
            raise InputError(f"path: task jsonl reads its {split} split from a file; none given (--{split}-file)")
        return jsonl(split, path, n)
    if path is not None and name in TASKS:
        raise InputError(f"path: task {name} is built in and reads no file, got {path}")
    if name == "multiplication":
        return multiplication(split, n=n, digits=digits, seed=seed)
    if name == "svamp":
        return svamp(split, n=n)
    if name in WORDED:
        return worded(name, split, n=n, seed=seed)
    raise InputError(f"task: expected one of {', '.join(TASKS)}, got {name!r}")
