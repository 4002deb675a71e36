"""Worded arithmetic for chat models (minirl/tasks.py, worded): fixed disjoint splits, correct answers."""

import hashlib
import re

import pytest

from minirl.errors import InputError
from minirl.tasks import TASKS, WORDED, WORDED_TEST_SIZE, factor_range, load_task

QUESTION = re.compile(r"What is (\d+) ([+*]) (\d+)\? Reply with the number only, nothing else\.")


def operands(problem):
    match = QUESTION.fullmatch(problem.question)
    assert match, problem.question
    return int(match[1]), match[2], int(match[3])


@pytest.mark.parametrize("name", WORDED)
def test_splits_are_disjoint_fixed_and_answered_correctly(name):
    op, digits_a, digits_b = WORDED[name]
    test, again = load_task(name, "test"), load_task(name, "test", seed=123)
    assert test == again and len(test) == WORDED_TEST_SIZE and len(set(test)) == len(test)
    assert load_task(name, "test", n=10) == test[:10]
    train = load_task(name, "train", n=500, seed=1)
    assert not {p.question for p in train} & {p.question for p in test}
    assert train != load_task(name, "train", n=500, seed=2)
    (lo_a, hi_a), (lo_b, hi_b) = factor_range(digits_a), factor_range(digits_b)
    for p in test + train:
        a, sign, b = operands(p)
        assert sign == op and lo_a <= a <= hi_a and lo_b <= b <= hi_b
        assert p.answer == (a + b if op == "+" else a * b)
    assert name in TASKS


def test_the_small_train_split_is_every_other_pair_and_repeats_only_after_all():
    every = load_task("multiplication-2x1", "train")
    assert len(every) == len(set(every)) == 89 * 8 - WORDED_TEST_SIZE
    twice = load_task("multiplication-2x1", "train", n=2 * len(every), seed=3)
    assert set(twice[:len(every)]) == set(twice[len(every):]) == set(every)


def test_the_test_splits_never_change():
    digest = hashlib.sha256("\n".join(p.question for name in WORDED for p in load_task(name, "test")).encode())
    assert digest.hexdigest() == PINNED


def test_bad_arguments_are_errors():
    with pytest.raises(InputError, match="^n: 301 problems asked"):
        load_task("addition-2+2", "test", n=301)
    with pytest.raises(InputError, match="^split: "):
        load_task("addition-2+2", "val")


PINNED = "09a2ec234b96e8829d13e5623bca3d8b4b3e6a1936dec2c141d3f54814468e1c"  # the splits the calibration used
