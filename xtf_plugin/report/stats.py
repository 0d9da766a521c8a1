"""Statistics the report adds to `summary.py`: per-example drop fractions, reason names, score histograms with
the thresholds the selection used. Dataset-level counts come from `summary.py`."""

from __future__ import annotations

from typing import Any

import numpy as np

from xtf_plugin.config import ATTRIBUTES, REASON_BITS, SHORT_NAMES

"""Attribute -> the abbreviation of its score."""


def reason_names(bits: int) -> list[str]:
    """Reason bits -> attribute names, in `ATTRIBUTES` order (`6` -> `['novelty', 'relevance']`)."""
    return [name for name in ATTRIBUTES if int(bits) & REASON_BITS[name]]


def per_example_counts(offsets: np.ndarray, response: np.ndarray, drop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(response tokens, dropped tokens) of each example."""
    n = len(offsets) - 1
    if n == 0 or offsets[-1] == 0:
        return np.zeros(n, np.int64), np.zeros(n, np.int64)
    index = np.repeat(np.arange(n), np.diff(offsets))
    return (
        np.bincount(index, weights=response, minlength=n).astype(np.int64),
        np.bincount(index, weights=drop > 0, minlength=n).astype(np.int64),
    )


def dropped_fractions(n_response: np.ndarray, n_dropped: np.ndarray) -> np.ndarray:
    """Dropped / response tokens of each example (0 for an example without response tokens)."""
    return np.divide(n_dropped, n_response, out=np.zeros(len(n_response)), where=n_response > 0)


def score_histograms(
    scores: dict[str, np.ndarray], response: np.ndarray, drop: np.ndarray, summary: dict[str, Any], bins: int = 40
) -> dict[str, dict[str, Any]]:
    """Attribute -> histogram of its score over response tokens (all, and those it dropped) plus the
    thresholds to draw, on the axis the selection compares on (log RI when `ri_fence.scale == 'log'`)."""
    thresholds = summary.get("thresholds") or {}
    result: dict[str, dict[str, Any]] = {}
    for name in ATTRIBUTES:
        short = SHORT_NAMES[name]
        values = np.asarray(scores[name], np.float64)
        label, lines, band = f"{short} score", [], None
        if name == "reasoning":
            fence = thresholds.get("ri_fence")
            if fence and fence.get("scale") == "log":
                values = np.log(np.maximum(values, np.finfo(np.float32).tiny))
                label = "ln RI (log scale)"
            if fence:
                lines = [("median fence", fence["median"])]
                band = (fence["min"], fence["max"])
        elif name == "novelty" and "kn_p_threshold" in thresholds:
            lines = [(f"1 - {thresholds['kn_p_threshold']}", 1.0 - thresholds["kn_p_threshold"])]
        elif name == "relevance" and thresholds.get("tr_otsu_thresholds"):
            lines = [(f"Otsu {i + 1}", t) for i, t in enumerate(thresholds["tr_otsu_thresholds"])]
        finite = response & np.isfinite(values)
        chosen = values[finite]
        if chosen.size == 0:
            result[name] = {"label": label, "edges": [], "all": [], "dropped": [], "lines": lines, "band": band}
            continue
        low, high = float(chosen.min()), float(chosen.max())
        for x in [v for _, v in lines] + list(band or ()):
            low, high = min(low, x), max(high, x)
        if name == "novelty":
            low, high = min(low, 0.0), max(high, 1.0)
        if high <= low:
            high = low + 1.0
        edges = np.linspace(low, high, bins + 1)
        dropped = values[finite & ((drop & REASON_BITS[name]) > 0)]
        result[name] = {
            "label": label,
            "edges": edges.tolist(),
            "all": np.histogram(chosen, edges)[0].tolist(),
            "dropped": np.histogram(dropped, edges)[0].tolist(),
            "lines": lines,
            "band": band,
        }
    return result
