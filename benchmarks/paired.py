"""Paired tests for accuracy comparisons over the same held-out problems and seeds.

Two fine-tuned arms answered the same problems at the same seeds; each answer is right or wrong. The
comparisons here use that pairing (a difference between two arms on one problem at one seed), which is far
sharper than comparing two accuracies with their binomial errors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> dict[str, float | int]:
    """Exact two-sided McNemar test over paired right/wrong outcomes.

    Args:
        a, b: bool `[n_pairs]`, whether arm A / arm B answered pair k correctly.
    Returns:
        `a_only` (A right, B wrong), `b_only`, and the two-sided binomial p-value of the discordant pairs.
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n = a_only + b_only
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p": 1.0}
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return {"a_only": a_only, "b_only": b_only, "p": min(1.0, 2 * tail)}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, draws: int = 4000, seed: int = 0) -> dict[str, float]:
    """Mean difference A - B with a 95% interval and a two-sided p-value, resampling problems.

    Args:
        a, b: bool `[n_seeds, n_problems]`, correctness of each arm; row s of A and of B come from the same
            seed, column j from the same problem. Problems are resampled with replacement (all seeds of a
            problem together, since they share its difficulty); the seeds stay.
        draws: bootstrap resamples.
    Returns:
        `diff` (A - B accuracy), `low` / `high` (2.5% / 97.5% percentiles), `p` (twice the smaller tail share
        of resampled differences on the other side of 0, at least 1 / draws).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired_bootstrap needs two [seeds, problems] arrays of one shape, got {a.shape}, {b.shape}")
    per_problem = (a - b).mean(axis=0)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, per_problem.size, size=(draws, per_problem.size))
    means = per_problem[picks].mean(axis=1)
    diff = float(per_problem.mean())
    low, high = np.percentile(means, [2.5, 97.5])
    tail = min((means <= 0).mean(), (means >= 0).mean())
    return {"diff": diff, "low": float(low), "high": float(high), "p": float(max(min(1.0, 2 * tail), 1 / draws))}


def compare(a: Sequence[str], b: Sequence[str]) -> dict[str, float | int]:
    """Paired comparison of two arms from their per-seed correctness strings (`'0110...'`, one per seed, the
    same seeds in the same order, one character per held-out problem)."""
    matrix_a = np.array([[c == "1" for c in row] for row in a], bool)
    matrix_b = np.array([[c == "1" for c in row] for row in b], bool)
    boot = paired_bootstrap(matrix_a, matrix_b)
    test = mcnemar_exact(matrix_a.ravel(), matrix_b.ravel())
    return {
        "diff": round(boot["diff"], 4), "ci95": [round(boot["low"], 4), round(boot["high"], 4)],
        "p_bootstrap": round(boot["p"], 4), "p_mcnemar": round(float(test["p"]), 4),
        "a_only": test["a_only"], "b_only": test["b_only"], "seeds": len(a),
    }
