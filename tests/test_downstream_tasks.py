"""The downstream benchmark's generated tasks (`benchmarks/tasks.py`): disjoint splits and a checker that accepts
the reference response and nothing else."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from tasks import TASKS  # noqa: E402


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_share_no_example_and_do_not_depend_on_the_training_size(name):
    task = TASKS[name]
    train, held_out = task.splits(200, 100, seed=5)
    assert len(train) == 200 and len(held_out) == 100
    keys = [example.key for example in train + held_out]
    assert len(set(keys)) == len(keys)
    assert [e.key for e in task.splits(50, 100, seed=5)[1]] == [e.key for e in held_out]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_the_checker_accepts_the_reference_response_only(name):
    task = TASKS[name]
    for example in task.splits(30, 0, seed=1)[0]:
        response = "\n".join(example.lines())
        assert example.correct(response) and task.answered(response + "\n")
        *steps, answer_line = example.lines()
        wrong = answer_line[: answer_line.rindex(" ") + 1] + "banana"
        assert not example.correct("\n".join([*steps, wrong]))
        assert not example.correct("\n".join(steps))  # no answer line at all


def test_records_ask_about_one_of_two_people():
    rng = random.Random(0)
    for example in TASKS["records"].splits(50, 0, seed=rng.randrange(100))[0]:
        person, other = example.person, example.people[1 - example.target]
        assert person.first != other.first and person.city != other.city and person.job != other.job
        assert person.name in example.prompt() and other.name in example.prompt()
        assert example.correct(f"Answer: {example.answer.upper()}.")  # case and a final period do not matter
