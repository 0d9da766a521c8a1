"""The downstream benchmark's noise recipes (`benchmarks/downstream.py`): what is injected is recorded exactly, and
a looping response is what the spans selection's repeat rule finds."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from downstream import RECIPES, inject, tokenize  # noqa: E402
from tasks import TASKS  # noqa: E402

from xtf_plugin.spans import find_spans  # noqa: E402
from xtf_plugin.tokens import TokenTexts, special_token_ids  # noqa: E402

WORDS = ["apple", "river", "candle", "orbit", "velvet", "harbor", "meadow", "puzzle"]


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_taking_out_the_recorded_noise_gives_back_the_clean_response(task, recipe):
    problems = TASKS[task].splits(40, 0, seed=3)[0]
    clean = inject(problems, None, 7, WORDS, TASKS[task])
    noisy = inject(problems, RECIPES[recipe], 7, WORDS, TASKS[task])
    assert sum(bool(example.noise) for example in noisy) > 20
    for before, after in zip(clean, noisy, strict=True):
        assert after.prompt == before.prompt and not before.noise
        text, last = "", 0
        for start, end in after.noise:
            assert after.completion[end] == "\n"  # every insertion is whole lines
            text += after.completion[last:start]
            last = end + 1
        assert text + after.completion[last:] == before.completion


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_loop_says_the_reasoning_again_and_the_repeat_rule_finds_exactly_that(task, tiny_tokenizer):
    problems = TASKS[task].splits(30, 0, seed=4)[0]
    examples = inject(problems, RECIPES["loop"], 7, WORDS, TASKS[task])
    data, noise = tokenize(examples, tiny_tokenizer)
    for problem, example in zip(problems, examples, strict=True):
        for start, end in example.noise:
            reasoning = "\n".join(problem.lines()[:-1])
            assert example.completion[start:end] in (reasoning, reasoning + "\n" + reasoning)
    ids = np.concatenate(data.input_ids)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in data.input_ids])])
    response = np.concatenate(data.labels) != -100
    spans = find_spans(ids, offsets, response, TokenTexts(tiny_tokenizer), special_token_ids(tiny_tokenizer))
    repeated = spans.repeat[spans.ids] & (spans.ids >= 0)
    noise_tokens = np.concatenate(noise)
    # every copied token, and beyond them only the newline that ends the last copy (a token of its line, but
    # outside the recorded noise, which stops before it)
    assert noise_tokens.any() and repeated[noise_tokens].all()
    assert {tiny_tokenizer.decode(ids[i : i + 1]) for i in np.flatnonzero(repeated & ~noise_tokens)} == {"\n"}
