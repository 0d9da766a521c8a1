"""The paired tests behind the downstream benchmark's comparisons (`benchmarks/paired.py`), against values
computed by hand and against scipy's exact binomial test."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from paired import compare, mcnemar_exact, paired_bootstrap  # noqa: E402


def test_mcnemar_counts_only_the_discordant_pairs():
    a = np.array([1, 1, 1, 1, 0, 0, 1, 0], bool)
    b = np.array([1, 0, 0, 0, 1, 0, 1, 0], bool)
    result = mcnemar_exact(a, b)
    # discordant: A only at 1, 2, 3; B only at 4 -> n = 4, k = 1: 2 * (C(4,0) + C(4,1)) / 16 = 10 / 16
    assert (result["a_only"], result["b_only"]) == (3, 1)
    assert result["p"] == pytest.approx(0.625)
    assert mcnemar_exact(a, a)["p"] == 1.0


@pytest.mark.parametrize(("a_only", "b_only"), [(30, 12), (5, 5), (0, 9), (60, 41)])
def test_mcnemar_matches_the_exact_binomial_test(a_only, b_only):
    a = np.array([True] * a_only + [False] * b_only + [True] * 7)
    b = np.array([False] * a_only + [True] * b_only + [True] * 7)
    expected = binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue
    assert mcnemar_exact(a, b)["p"] == pytest.approx(expected)


def test_bootstrap_of_identical_arms_is_no_effect():
    rng = np.random.default_rng(1)
    a = rng.random((3, 200)) < 0.3
    result = paired_bootstrap(a, a.copy())
    assert result["diff"] == 0.0 and result["low"] == 0.0 and result["high"] == 0.0 and result["p"] == 1.0


def test_bootstrap_finds_a_clear_difference_and_its_interval_holds_it():
    rng = np.random.default_rng(2)
    b = rng.random((3, 500)) < 0.3
    a = b | (rng.random((3, 500)) < 0.2)  # A right wherever B is, and on about 14% more
    result = paired_bootstrap(a, b)
    assert result["diff"] == pytest.approx(a.mean() - b.mean())
    assert result["low"] < result["diff"] < result["high"] and result["low"] > 0
    assert result["p"] <= 1 / 4000 + 1e-12


def test_bootstrap_needs_two_paired_matrices():
    with pytest.raises(ValueError, match="seeds, problems"):
        paired_bootstrap(np.zeros(5), np.zeros(5))


def test_compare_reads_correctness_strings_seed_by_seed():
    result = compare(["1100", "1010"], ["1000", "1000"])
    # per problem (mean over seeds) A - B: (0, .5, .5, 0) -> diff .25; discordant pairs: A only twice
    assert result["diff"] == 0.25 and (result["a_only"], result["b_only"]) == (2, 0) and result["seeds"] == 2
    assert result["p_mcnemar"] == 0.5
