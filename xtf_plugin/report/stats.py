"""Statistics the report adds to `summary.py`: per-example drop fractions, reason names, score histograms with
the thresholds the selection used. Dataset-level counts come from `summary.py`."""

from __future__ import annotations

import math
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
    histograms = ScoreHistograms(summary, bins)
    histograms.observe(scores, response)
    histograms.count(scores, response, drop)
    return histograms.result()


class ScoreHistograms:
    """`score_histograms` over parts of the examples, in two passes: `observe` every part (the range of each score),
    then `count` every part; `result` then equals `score_histograms` of the whole."""

    def __init__(self, summary: dict[str, Any], bins: int = 40) -> None:
        thresholds = summary.get("thresholds") or {}
        self.bins = bins
        self.log_ri = bool((thresholds.get("ri_fence") or {}).get("scale") == "log")
        self.axes: dict[str, dict[str, Any]] = {}
        for name in ATTRIBUTES:
            label, lines, band = f"{SHORT_NAMES[name]} score", [], None
            if name == "reasoning":
                fence = thresholds.get("ri_fence")
                if self.log_ri:
                    label = "ln RI (log scale)"
                if fence:
                    lines = [("median fence", fence["median"])]
                    band = (fence["min"], fence["max"])
            elif name == "novelty" and "kn_p_threshold" in thresholds:
                lines = [(f"1 - {thresholds['kn_p_threshold']}", 1.0 - thresholds["kn_p_threshold"])]
            elif name == "relevance" and thresholds.get("tr_otsu_thresholds"):
                lines = [(f"Otsu {i + 1}", t) for i, t in enumerate(thresholds["tr_otsu_thresholds"])]
            self.axes[name] = {"label": label, "lines": lines, "band": band}
        self.low = dict.fromkeys(ATTRIBUTES, math.inf)
        self.high = dict.fromkeys(ATTRIBUTES, -math.inf)
        self.counts: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _values(self, name: str, scores: dict[str, np.ndarray], response: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values on the axis, bool mask of the finite response values)."""
        values = np.asarray(scores[name], np.float64)
        if name == "reasoning" and self.log_ri:
            values = np.log(np.maximum(values, np.finfo(np.float32).tiny))
        return values, response & np.isfinite(values)

    def observe(self, scores: dict[str, np.ndarray], response: np.ndarray) -> None:
        """First pass: widen each score's range to this part's finite response values."""
        for name in ATTRIBUTES:
            values, finite = self._values(name, scores, response)
            if finite.any():
                chosen = values[finite]
                self.low[name] = min(self.low[name], float(chosen.min()))
                self.high[name] = max(self.high[name], float(chosen.max()))

    def _edges(self, name: str) -> np.ndarray | None:
        axis = self.axes[name]
        low, high = self.low[name], self.high[name]
        if low > high:
            return None
        for x in [v for _, v in axis["lines"]] + list(axis["band"] or ()):
            low, high = min(low, x), max(high, x)
        if name == "novelty":
            low, high = min(low, 0.0), max(high, 1.0)
        if high <= low:
            high = low + 1.0
        return np.linspace(low, high, self.bins + 1)

    def count(self, scores: dict[str, np.ndarray], response: np.ndarray, drop: np.ndarray) -> None:
        """Second pass: add this part's tokens to the histograms (all, and those dropped for the attribute)."""
        for name in ATTRIBUTES:
            edges = self._edges(name)
            if edges is None:
                continue
            values, finite = self._values(name, scores, response)
            every = np.histogram(values[finite], edges)[0]
            dropped = np.histogram(values[finite & ((drop & REASON_BITS[name]) > 0)], edges)[0]
            before = self.counts.get(name)
            self.counts[name] = (every, dropped) if before is None else (before[0] + every, before[1] + dropped)

    def result(self) -> dict[str, dict[str, Any]]:
        """Attribute -> `{label, edges, all, dropped, lines, band}` (empty lists where no token has the score)."""
        result: dict[str, dict[str, Any]] = {}
        for name, axis in self.axes.items():
            edges = self._edges(name)
            every, dropped = self.counts.get(name, (np.zeros(self.bins, np.int64),) * 2)
            result[name] = {"label": axis["label"], "edges": [] if edges is None else edges.tolist(),
                            "all": [] if edges is None else every.tolist(),
                            "dropped": [] if edges is None else dropped.tolist(),
                            "lines": axis["lines"], "band": axis["band"]}
        return result
