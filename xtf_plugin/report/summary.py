"""Dataset-level statistics of a selection: how much was dropped, by which attribute, with which overlaps."""

from __future__ import annotations

import math
from collections import Counter
from itertools import combinations
from typing import Any

import numpy as np

from xtf_plugin.config import ATTRIBUTES, REASON_BITS
from xtf_plugin.selection import SPAN_BIT


def value_counts(drop: np.ndarray) -> np.ndarray:
    """int64 `[256]`: how many tokens have each `xtf_drop` value (0: kept); counts of parts add up."""
    return np.bincount(np.asarray(drop, np.uint8).astype(np.intp), minlength=256)


def reason_counts(drop: np.ndarray) -> dict[str, int]:
    """Attribute -> number of dropped tokens whose reasons include it."""
    return counts_by_reason(value_counts(drop))


def pairwise_overlaps(drop: np.ndarray) -> dict[str, int]:
    """`a+b` -> number of dropped tokens that lack both attributes a and b."""
    return overlaps_of(value_counts(drop))


def reason_combinations(drop: np.ndarray) -> dict[str, int]:
    """Exact reason set (e.g. `reasoning+relevance`) -> number of dropped tokens, for UpSet-style charts."""
    return combinations_of(value_counts(drop))


def counts_by_reason(values: np.ndarray) -> dict[str, int]:
    """`reason_counts` from `value_counts`."""
    bits = np.arange(len(values))
    return {name: int(values[(bits & bit) > 0].sum()) for name, bit in REASON_BITS.items()}


def overlaps_of(values: np.ndarray) -> dict[str, int]:
    """`pairwise_overlaps` from `value_counts`."""
    bits = np.arange(len(values))
    return {
        f"{a}+{b}": int(values[((bits & REASON_BITS[a]) > 0) & ((bits & REASON_BITS[b]) > 0)].sum())
        for a, b in combinations(ATTRIBUTES, 2)
    }


def combinations_of(values: np.ndarray) -> dict[str, int]:
    """`reason_combinations` from `value_counts` (a token masked with its span counts with its attributes)."""
    combined: dict[str, int] = {}
    for bits in (np.flatnonzero(values[1:]) + 1).tolist():
        name = "+".join(name for name in ATTRIBUTES if bits & REASON_BITS[name])
        combined[name] = combined.get(name, 0) + int(values[bits])
    return combined


class DroppedTokens:
    """Attribute -> how often each token id was dropped for it, counted one part of the examples at a time (ties
    keep the order in which the tokens were first dropped, as over the whole)."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[int]] = {name: Counter() for name in REASON_BITS}

    def add(self, input_ids: np.ndarray, drop: np.ndarray) -> None:
        for name, bit in REASON_BITS.items():
            self.counts[name].update(input_ids[(drop & bit) > 0].tolist())

    def top(self, token_text: Any, limit: int = 10) -> dict[str, list[tuple[str, int]]]:
        """Attribute -> the most frequently dropped token texts with counts."""
        return {name: [(token_text[t], n) for t, n in counts.most_common(limit)] for name, counts in self.counts.items()}


def top_dropped_tokens(
    input_ids: np.ndarray, drop: np.ndarray, token_text: Any, limit: int = 10
) -> dict[str, list[tuple[str, int]]]:
    """Attribute -> the most frequently dropped token texts with counts."""
    dropped = DroppedTokens()
    dropped.add(input_ids, drop)
    return dropped.top(token_text, limit)


SPAN_COUNTS = ("spans", "template_spans", "off_task_spans", "repeated_spans", "dropped_spans", "spared_spans",
               "ungrounded_spans")
"""Spans mode's thresholds that count spans: a part's counts add up to the dataset's."""


def dropped_spans(scored: Any, limit: int = 20) -> dict[str, Any] | None:
    """Spans mode: how many spans were masked (off-task or repeated), and the most surprising off-task ones with
    their example, text, mean surprise (nats per word token) and why they are off-task: `surprising` (above the
    surprise fence) or, with the prompt gain, `not grounded` (below it, and the prompt makes the span less likely;
    `prompt_gain` is the span's mean gain in nats per word token); None in the other modes."""
    tally = DroppedSpans(limit)
    return tally.result() if tally.add(scored, 0) else None


class DroppedSpans:
    """`dropped_spans` of a dataset selected a part at a time: `add` the parts in order, then `result`."""

    COUNTS = ("spans", "template_spans", "off_task_spans", "repeated_spans", "dropped_spans", "dropped_repeats",
              "examples_with_a_dropped_span")

    def __init__(self, limit: int = 20) -> None:
        self.limit = limit
        self.counts = dict.fromkeys(self.COUNTS, 0)
        self.spans_before = 0
        self.top: list[tuple[float, int, dict[str, Any]]] = []  # (-surprise, span index in the dataset, item)

    def add(self, scored: Any, first: int) -> bool:
        """Count a part whose first example is example `first` of the dataset; False when it has no spans
        selection."""
        selection, spans = scored.selection, scored.spans
        if selection.span_surprise is None or spans is None:
            return False
        in_span = ((selection.reasons & SPAN_BIT) > 0) & (spans.ids >= 0)
        dropped = np.unique(spans.ids[in_span])
        repeated = dropped[spans.repeat[dropped]]
        off_task = dropped[~spans.repeat[dropped]]
        for key, value in zip(self.COUNTS, (
            spans.n_spans, int(spans.template.sum()), int(selection.span_off_task.sum()), int(spans.repeat.sum()),
            dropped.size, repeated.size, np.unique(spans.example[dropped]).size,
        ), strict=True):
            self.counts[key] += int(value)
        # ties keep the dataset's span order, as one stable sort over the whole dataset would
        order = off_task[np.argsort(-selection.span_surprise[off_task], kind="stable")][: self.limit]
        self.top.extend((-float(selection.span_surprise[i]), self.spans_before + int(i),
                         _span_item(selection, spans, int(i), first)) for i in order)
        self.top.sort(key=lambda candidate: candidate[:2])
        del self.top[self.limit :]
        self.spans_before += spans.n_spans
        return True

    def result(self) -> dict[str, Any]:
        return {**self.counts, "most_surprising": [item for *_, item in self.top]}


def _span_item(selection: Any, spans: Any, index: int, first: int) -> dict[str, Any]:
    item = {"example": first + int(spans.example[index]), "surprise": round(float(selection.span_surprise[index]), 3),
            "text": spans.texts[index]}
    if selection.span_gain is not None:
        gain = float(selection.span_gain[index])
        item["why"] = "not grounded" if selection.span_ungrounded[index] else "surprising"
        item["prompt_gain"] = round(gain, 3) if math.isfinite(gain) else None
    return item


def summarize(scored: Any) -> dict[str, Any]:
    """JSON-serialisable summary of a `ScoredDataset`."""
    tally = SummaryTally()
    tally.add(scored)
    return tally.summary()


class SummaryTally:
    """`summarize` of a dataset scored a part at a time: `add` each part (a `ScoredDataset` of the next
    consecutive examples, its `stats` those of the whole run once the last part is added), then `summary`. The
    parts must share one selection fit (`selection.SelectionFit`); a spans selection's span counts add up, other
    modes' thresholds are those of a single part."""

    def __init__(self) -> None:
        self.examples = self.truncated = self.without_response = self.empty_response = 0
        self.response_tokens = self.protected = 0
        self.values = np.zeros(256, np.int64)
        self.flagged = np.zeros(256, np.int64)
        self.dropped_ids = DroppedTokens()
        self.spans = DroppedSpans()
        self.has_spans = False
        self.thresholds: dict[str, Any] | None = None
        self.last: Any = None

    def add(self, scored: Any) -> None:
        response = scored.response
        self.values += value_counts(scored.selection.reasons)
        self.flagged += value_counts(scored.selection.flagged)
        self.dropped_ids.add(scored.input_ids, scored.selection.reasons)
        per_example_response = np.add.reduceat(response, scored.offsets[:-1]) if scored.n_examples else np.zeros(0)
        self.without_response += int((per_example_response == 0).sum())
        self.empty_response += len(getattr(scored, "empty_response", []))
        self.truncated += scored.truncated
        self.response_tokens += int(response.sum())
        self.protected += int(scored.protected.sum())
        thresholds = scored.selection.thresholds
        if self.thresholds is None:
            self.thresholds = dict(thresholds)
        elif thresholds.get("mode") != "spans":
            raise ValueError("only a spans selection is summarised a part at a time")
        else:
            for key in SPAN_COUNTS:
                if key in thresholds:
                    self.thresholds[key] += thresholds[key]
        self.has_spans = self.spans.add(scored, self.examples) or self.has_spans
        self.examples += scored.n_examples
        self.last = scored

    def summary(self) -> dict[str, Any]:
        scored, n_response = self.last, self.response_tokens
        dropped = int(self.values[1:].sum())
        fraction = lambda count: round(count / n_response, 6) if n_response else 0.0  # noqa: E731
        by_attribute = counts_by_reason(self.values)
        return {
            "examples": self.examples,
            "examples_truncated": self.truncated,
            "examples_without_response": self.without_response,
            "examples_empty_response": self.empty_response,
            "response_tokens": n_response,
            "dropped_tokens": dropped,
            "dropped_fraction": fraction(dropped),
            "kept_fraction": round(1 - fraction(dropped), 6),
            "dropped_by_attribute": by_attribute,
            "dropped_fraction_by_attribute": {k: fraction(v) for k, v in by_attribute.items()},
            "flagged_by_attribute": counts_by_reason(self.flagged),
            "pairwise_overlaps": overlaps_of(self.values),
            "reason_combinations": combinations_of(self.values),
            "protected_tokens": self.protected,
            "thresholds": self.thresholds,
            "domain_words": list(scored.domain_words),
            "top_dropped_tokens": {k: [[text, n] for text, n in v] for k, v in self.dropped_ids.top(scored.texts).items()},
            "mode": scored.config.mode,
            "preset": scored.config.preset,
            "action": scored.config.action,
            **({"dropped_spans": self.spans.result()} if self.has_spans else {}),
            **scored.stats,
        }


def span_gain_text(gain: float | None) -> str:
    """A span's mean prompt gain as shown in the reports (nats per word token)."""
    return "-" if gain is None else f"{gain:+.2f}"


def filtered_verb(summary: dict[str, Any]) -> str:
    """`removed` when the selected tokens leave the input (`action: remove`), else `masked`."""
    return "removed" if summary.get("action") == "remove" else "masked"


def dropped_span_counts(spans: dict[str, Any]) -> tuple[int, int]:
    """(off-task, repeated) spans masked, from a summary's `dropped_spans` (one written before repeats has none)."""
    repeated = spans.get("dropped_repeats", 0)
    return spans["dropped_spans"] - repeated, repeated


def _dropped_spans_phrase(spans: dict[str, Any]) -> str:
    """`3 off-task spans`, or `3 off-task and 2 repeated spans` when some masked span was a repeat."""
    off_task, repeated = dropped_span_counts(spans)
    return f"{off_task} off-task and {repeated} repeated spans" if repeated else f"{off_task} off-task spans"


def summary_line(summary: dict[str, Any]) -> str:
    """One log line: kept fraction, per-attribute drop fractions, top dropped tokens."""
    by = summary["dropped_fraction_by_attribute"]
    top = ", ".join(
        f"{name}: {' '.join(repr(text) for text, _ in pairs[:3])}" for name, pairs in summary["top_dropped_tokens"].items() if pairs
    )
    spans = summary.get("dropped_spans")
    if spans is not None:
        return (
            f"XTF: kept {summary['kept_fraction']:.1%} of {summary['response_tokens']} response tokens in "
            f"{summary['examples']} examples; {filtered_verb(summary)} "
            + _dropped_spans_phrase(spans) + f" of {spans['spans']} "
            f"in {spans['examples_with_a_dropped_span']} examples"
            + (f", e.g. {spans['most_surprising'][0]['text'].strip()!r}" if spans["most_surprising"] else "")
        )
    return (
        f"XTF: kept {summary['kept_fraction']:.1%} of {summary['response_tokens']} response tokens in "
        f"{summary['examples']} examples (dropped RI {by['reasoning']:.1%}, KN {by['novelty']:.1%}, "
        f"TR {by['relevance']:.1%}); top dropped: {top or 'none'}"
    )


def render_summary(summary: dict[str, Any], console: Any = None, title: str = "XTF summary") -> None:
    """Print the summary as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    spans = summary.get("dropped_spans")
    if spans is None:
        reasons: list[tuple[str, str]] = [
            *(
                (f"  lacking {name}", f"{summary['dropped_by_attribute'][name]:,} ({summary['dropped_fraction_by_attribute'][name]:.1%})")
                for name in ATTRIBUTES
            ),
            *((f"  overlap {k}", f"{v:,}") for k, v in summary["pairwise_overlaps"].items()),
        ]
    else:
        fence = (summary.get("thresholds") or {}).get("span_surprise_fence")
        reasons = [
            (f"  off-task spans {filtered_verb(summary)}", f"{dropped_span_counts(spans)[0]:,} of {spans['spans']:,} spans"),
            (f"  repeats {filtered_verb(summary)}", f"{dropped_span_counts(spans)[1]:,}"),
            ("  in examples", f"{spans['examples_with_a_dropped_span']:,}"),
            ("  template spans (never filtered)", f"{spans['template_spans']:,}"),
            ("  surprise fence", "none (no spread)" if fence is None else f"{fence:.2f} nats per token"),
        ]
        spared = (summary.get("thresholds") or {}).get("spared_spans")
        if spared:
            reasons.append(("  above the fence, like the rest of their response (kept)", f"{spared:,}"))
        ungrounded = (summary.get("thresholds") or {}).get("ungrounded_spans")
        if ungrounded:
            reasons.append(("  below the fence, made less likely by the prompt (off-task)", f"{ungrounded:,}"))
    rows: list[tuple[str, str]] = [
        ("examples", f"{summary['examples']:,}"),
        ("truncated to max_length", f"{summary['examples_truncated']:,}"),
        ("response tokens", f"{summary['response_tokens']:,}"),
        ("dropped tokens", f"{summary['dropped_tokens']:,} ({summary['dropped_fraction']:.1%})"),
        *reasons,
        ("protected tokens", f"{summary['protected_tokens']:,}"),
        ("scoring time", f"{summary['scoring_seconds']:.1f} s ({summary['tokens_per_second']:,.0f} tok/s)"),
        ("cached shards reused", str(summary["cached_shards"])),
    ]
    if summary.get("prompt_gain_tokens"):
        rows.insert(-1, ("  of it the prompt gain's second pass",
                         f"{summary['prompt_gain_seconds']:.1f} s ({summary['prompt_gain_tokens']:,} tokens)"))
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if spans is not None:
        shown = Table(title=f"most surprising {filtered_verb(summary)} spans", show_header=True)
        shown.add_column("example", justify="right")
        shown.add_column("surprise", justify="right")
        explained = any("why" in item for item in spans["most_surprising"])
        if explained:
            shown.add_column("prompt gain", justify="right")
            shown.add_column("why")
        shown.add_column("span")
        for item in spans["most_surprising"][:10]:
            why = [span_gain_text(item.get("prompt_gain")), item.get("why", "")] if explained else []
            shown.add_row(str(item["example"]), f"{item['surprise']:.2f}", *why, repr(item["text"]))
        console.print(shown)
        return
    tops = Table(title="most dropped tokens", show_header=True)
    tops.add_column("attribute")
    tops.add_column("tokens (count)")
    for name, pairs in summary["top_dropped_tokens"].items():
        tops.add_row(name, "  ".join(f"{text!r} ({n})" for text, n in pairs) or "-")
    console.print(tops)
