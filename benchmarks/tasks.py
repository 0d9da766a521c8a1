"""The generated tasks of the downstream benchmark: examples with known answers and a checker.

Each task gives train and held-out examples (`splits`), each example its prompt, its response lines (the last
is the answer line) and a check of a generated response; `distractor` is a value of the task's own kind that
noise insertions carry (a number for arithmetic, a field value for records), so that the noise can mislead a
model that learns to copy from it.

* `arithmetic`: two-step add/subtract word problems; the response is two equation lines and `The answer is N.`
  (template lines: every line's shape recurs across responses).
* `records`: two people described in a short prose record; the question asks two of one person's fields; the
  response is two prose sentences in varied wording (no line shape recurs much) and `Answer: A; B`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

NAMES = [
    "Tom", "Ana", "Ravi", "Mia", "Leo", "Sara", "Ken", "Nora", "Omar", "Lily", "Ben", "Zoe", "Ivan", "Emma",
    "Yuki", "Carl", "Dina", "Paul", "Rosa", "Sam",
]
OBJECTS = [
    "apples", "stickers", "marbles", "books", "coins", "pencils", "cards", "shells", "stamps", "cookies",
    "balloons", "candies", "toys", "eggs", "flowers",
]
GAIN = ["buys {n} more", "finds {n} more", "gets {n} more", "receives {n} more", "wins {n} more"]
LOSS = ["gives away {n}", "loses {n}", "sells {n}", "uses {n}", "eats {n}"]


class TaskExample(Protocol):
    def prompt(self) -> str: ...

    def lines(self) -> list[str]: ...

    def correct(self, generated: str) -> bool: ...


class Task(Protocol):
    name: str
    # generation room: the clean response plus every insertion the noisiest recipe makes, so an arm that
    # imitates the noise is not cut off before its answer line merely for having learnt the noise
    max_new_tokens: int

    def splits(self, n_train: int, n_eval: int, seed: int) -> tuple[list[TaskExample], list[TaskExample]]: ...

    def distractor(self, rng: random.Random) -> str: ...

    def answered(self, generated: str) -> bool:
        """Whether the first answer of a generation is complete (nothing after it changes the score)."""
        ...


def distinct_splits(draw: Callable[[random.Random], Any], n_train: int, n_eval: int, seed: int
                    ) -> tuple[list[Any], list[Any]]:
    """(train, held-out) examples from `draw`, none sharing a `key`; the held-out ones are drawn first, so they do
    not depend on `n_train`."""
    rng = random.Random(seed)
    seen: set[Any] = set()
    examples: list[Any] = []
    while len(examples) < n_eval + n_train:
        example = draw(rng)
        if example.key not in seen:
            seen.add(example.key)
            examples.append(example)
    return examples[n_eval:], examples[:n_eval]


# ---------------------------------------------------------------------------------------------------------
# arithmetic

ANSWER = re.compile(r"The answer is (-?\d+)")
ANSWER_GIVEN = re.compile(r"The answer is -?\d+\D")


@dataclass(frozen=True)
class Problem:
    """A two-step problem: start with `start`, then apply `deltas` (signed) in order."""

    name: str
    obj: str
    start: int
    deltas: tuple[int, int]
    verbs: tuple[int, int]

    @property
    def answer(self) -> int:
        return self.start + sum(self.deltas)

    @property
    def key(self) -> tuple[int, int, int]:
        """What makes two problems the same arithmetic (names and objects aside)."""
        return (self.start, *self.deltas)

    def prompt(self) -> str:
        actions = []
        for delta, verb in zip(self.deltas, self.verbs, strict=True):
            templates = GAIN if delta > 0 else LOSS
            actions.append(templates[verb].format(n=abs(delta)))
        return (
            f"Question: {self.name} has {self.start} {self.obj}. {self.name} {actions[0]}, then {actions[1]}. "
            f"How many {self.obj} does {self.name} have now?\nAnswer:\n"
        )

    def lines(self) -> list[str]:
        out, total = [], self.start
        for delta in self.deltas:
            new = total + delta
            out.append(f"{total} {'+' if delta > 0 else '-'} {abs(delta)} = {new}.")
            total = new
        return [*out, f"The answer is {self.answer}."]

    def correct(self, generated: str) -> bool:
        match = ANSWER.search(generated)
        return bool(match) and int(match.group(1)) == self.answer


def random_problem(rng: random.Random) -> Problem:
    """One problem whose intermediate and final counts stay between 1 and 150."""
    while True:
        start = rng.randint(10, 80)
        deltas = tuple(rng.choice((1, -1)) * rng.randint(2, 40) for _ in range(2))
        partial = start + deltas[0]
        if 1 <= partial <= 150 and 1 <= partial + deltas[1] <= 150:
            return Problem(
                rng.choice(NAMES), rng.choice(OBJECTS), start, deltas,  # type: ignore[arg-type]
                (rng.randrange(len(GAIN)), rng.randrange(len(LOSS))),
            )


class Arithmetic:
    name = "arithmetic"
    max_new_tokens = 68

    def splits(self, n_train: int, n_eval: int, seed: int) -> tuple[list[TaskExample], list[TaskExample]]:
        """Train and held-out problems; no arithmetic (start, deltas) is shared between or within them."""
        return distinct_splits(random_problem, n_train, n_eval, seed)

    def distractor(self, rng: random.Random) -> str:
        return str(rng.randint(2, 99))

    def answered(self, generated: str) -> bool:
        return bool(ANSWER_GIVEN.search(generated))


# ---------------------------------------------------------------------------------------------------------
# records

SURNAMES = ["Kim", "Diaz", "Novak", "Okafor", "Berg", "Silva", "Tanaka", "Moreau", "Rossi", "Haddad", "Kowalski",
            "Larsen", "Mehta", "Fischer", "Costa"]
CITIES = ["Porto", "Oslo", "Lyon", "Krakow", "Dublin", "Seville", "Bergen", "Turin", "Ghent", "Leeds", "Graz",
          "Malmo", "Bremen", "Utrecht", "Nantes", "Basel", "Cork", "Split", "Tartu", "Bilbao"]
JOBS = ["baker", "nurse", "pilot", "chemist", "lawyer", "farmer", "plumber", "teacher", "dentist", "architect",
        "florist", "engineer", "librarian", "jeweller", "carpenter"]
FIELDS = ("city", "job", "year")
# how the record states a person (several wordings, in random order of the two people)
RECORD_SENTENCES = [
    "{name} works as {a_job} in {city} and was born in {year}.",
    "Born in {year}, {name} is {a_job} who lives in {city}.",
    "{name}, {a_job} from {city}, was born in {year}.",
    "In {city} lives {name}, {a_job} born in {year}.",
]
QUESTION_WORDS = {"city": "in which city does {first} live", "job": "what is {first}'s job",
                  "year": "in which year was {first} born"}
# the response's first line finds the person, the second states the asked fields: each in several wordings
FIND_SENTENCES = [
    "The record mentions {name} and {other}; the question is about {name}.",
    "Two people are listed, and we need {name}, not {other}.",
    "Of {name} and {other}, the question asks about {name}.",
    "The person asked about is {name}; {other} is someone else.",
]
FIELD_PHRASES = {"city": ["{first} lives in {value}", "{first}'s home is {value}", "{first} is based in {value}"],
                 "job": ["{first} is {a_value}", "{first} works as {a_value}", "{first}'s job is {value}"],
                 "year": ["{first} was born in {value}", "{first}'s birth year is {value}",
                          "{first} came into the world in {value}"]}
RECORD_ANSWER = re.compile(r"Answer: ([^\n]*)")
RECORD_ANSWERED = re.compile(r"Answer: [^\n]*\n")


def with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    city: str
    job: str
    year: int

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    def value(self, field: str) -> str:
        return str(getattr(self, field))


@dataclass(frozen=True)
class Record:
    """Two people in a prose record; the question asks `fields` (two of city, job, year) of `people[target]`."""

    people: tuple[Person, Person]
    target: int
    fields: tuple[str, str]
    wording: tuple[int, ...]  # record sentence per person, find sentence, field phrase per field

    @property
    def person(self) -> Person:
        return self.people[self.target]

    @property
    def answer(self) -> str:
        return "; ".join(self.person.value(field) for field in self.fields)

    @property
    def key(self) -> tuple[str, str, str, tuple[str, str]]:
        return (self.people[0].name, self.people[1].name, self.person.name, self.fields)

    def prompt(self) -> str:
        described = " ".join(
            RECORD_SENTENCES[self.wording[k]].format(name=p.name, a_job=with_article(p.job), city=p.city,
                                                     year=p.year)
            for k, p in enumerate(self.people)
        )
        first, second = (QUESTION_WORDS[f].format(first=self.person.name) for f in self.fields)
        return f"Record: {described}\nQuestion: {first[0].upper() + first[1:]}, and {second}?\nAnswer:\n"

    def lines(self) -> list[str]:
        other = self.people[1 - self.target]
        find = FIND_SENTENCES[self.wording[2]].format(name=self.person.name, other=other.name)
        phrases = []
        for k, field in enumerate(self.fields):
            value = self.person.value(field)
            phrases.append(FIELD_PHRASES[field][self.wording[3 + k]].format(
                first=self.person.first, value=value, a_value=with_article(value)))
        return [find, f"So {phrases[0]}, and {phrases[1]}.", f"Answer: {self.answer}"]

    def correct(self, generated: str) -> bool:
        match = RECORD_ANSWER.search(generated)
        return bool(match) and match.group(1).strip().rstrip(".").lower() == self.answer.lower()


def random_record(rng: random.Random) -> Record:
    """Two people with different first names, cities and jobs, so every answer is one person's."""
    firsts, cities, jobs = rng.sample(NAMES, 2), rng.sample(CITIES, 2), rng.sample(JOBS, 2)
    people = tuple(Person(firsts[k], rng.choice(SURNAMES), cities[k], jobs[k], rng.randint(1950, 2005))
                   for k in range(2))
    fields = tuple(rng.sample(FIELDS, 2))
    wording = (rng.randrange(len(RECORD_SENTENCES)), rng.randrange(len(RECORD_SENTENCES)),
               rng.randrange(len(FIND_SENTENCES)), rng.randrange(3), rng.randrange(3))
    return Record(people, rng.randrange(2), fields, wording)  # type: ignore[arg-type]


class Records:
    name = "records"
    max_new_tokens = 96

    def splits(self, n_train: int, n_eval: int, seed: int) -> tuple[list[TaskExample], list[TaskExample]]:
        """Train and held-out records; no (people, target, fields) is shared between or within them."""
        return distinct_splits(random_record, n_train, n_eval, seed)

    def distractor(self, rng: random.Random) -> str:
        return rng.choice([*CITIES, *JOBS, str(rng.randint(1950, 2005))])

    def answered(self, generated: str) -> bool:
        return bool(RECORD_ANSWERED.search(generated))


TASKS: dict[str, Task] = {"arithmetic": Arithmetic(), "records": Records()}
DEFAULT_TASK = "arithmetic"
