"""Spans: the sentences and lines of every response, the unit in which noise is written.

Injected or scraped noise comes a sentence, a line or a phrase at a time, while token scores are noisy one by
one; `spans` selection (see `selection.py`) decides per span. A span ends after a token holding a line break,
or after sentence punctuation (`.`, `!`, `?`) when the next token starts with whitespace. A span with fewer
than `MIN_CONTENT_TOKENS` word tokens (`Mr.`, `1.`, a lone `Hence,`) is joined to the next span of its line,
so abbreviations and list markers do not become spans of their own.

A span is a *template* when its shape (the text with digit runs replaced by `0`, case and spacing folded)
recurs in at least `max(TEMPLATE_MIN_EXAMPLES, TEMPLATE_MIN_SHARE * n_examples)` responses with more than one
text: answer lines (`The answer is 20.`, `#### 20`), equation lines (`30 - 2 = 28.`). Templates carry the
task's format and its results, and spans selection never masks them. A sentence repeated word for word is
not a template: it has no slot for the example's content, which is what boilerplate looks like.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from xtf_plugin.tokens import TokenTexts

MIN_CONTENT_TOKENS = 3
"""A span needs this many word tokens (a letter or digit) to stand alone."""
TEMPLATE_MIN_EXAMPLES = 3
TEMPLATE_MIN_SHARE = 0.01
"""A span shape is a template when at least this many responses (and this share of all) contain it."""

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$")
_WORD = re.compile(r"\w")


@dataclass
class Spans:
    """The spans of a dataset's response tokens (flat over examples, as `TokenScores`).

    Attributes:
        ids: int64 `[n_tokens]`, span index of each token, -1 for tokens in no span (prompt, special tokens).
        example: int64 `[n_spans]`, the example each span belongs to.
        template: bool `[n_spans]`, the span's shape recurs across responses (never masked by spans selection).
        content: bool `[n_tokens]`, the token holds a letter or a digit (the tokens a span's score averages).
        texts: `[n_spans]` the text of each span.
    """

    ids: np.ndarray
    example: np.ndarray
    template: np.ndarray
    content: np.ndarray
    texts: list[str]

    @property
    def n_spans(self) -> int:
        """Number of spans."""
        return len(self.example)

    def mean(self, values: np.ndarray) -> np.ndarray:
        """float64 `[n_spans]`: mean of `values` (`[n_tokens]`) over each span's finite content tokens (NaN
        for a span without one)."""
        where = (self.ids >= 0) & self.content & np.isfinite(values)
        sums = np.bincount(self.ids[where], weights=values[where].astype(np.float64), minlength=self.n_spans)
        counts = np.bincount(self.ids[where], minlength=self.n_spans)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def span_shape(text: str) -> str:
    """The shape two spans of one template share: digit runs as `0`, lower case, spaces folded."""
    return re.sub(r"\d+", "0", " ".join(text.split()).lower())


def find_spans(
    input_ids: np.ndarray, offsets: np.ndarray, response: np.ndarray, texts: TokenTexts, special_ids: set[int]
) -> Spans:
    """Cut every response into spans.

    Args:
        input_ids: int64 `[n_tokens]`, flat over examples.
        offsets: int64 `[n_examples + 1]`.
        response: bool `[n_tokens]`, trained tokens.
        texts: decoded token texts.
        special_ids: token ids (EOS, end of turn) that belong to no span.
    """
    n = len(input_ids)
    pieces = texts.of(input_ids.tolist()) if n else []
    special = np.isin(input_ids, np.fromiter(special_ids, np.int64, len(special_ids)))
    content = np.fromiter((bool(_WORD.search(p)) for p in pieces), bool, n)
    inside = response & ~special
    ids = np.full(n, -1, np.int64)
    examples: list[int] = []
    span_texts: list[str] = []
    for e in range(len(offsets) - 1):
        spans, line_ends = _cut(pieces, inside, int(offsets[e]), int(offsets[e + 1]))
        for span in _join_short(spans, line_ends, content):
            ids[span] = len(examples)
            examples.append(e)
            span_texts.append("".join(pieces[j] for j in span))
    example = np.asarray(examples, np.int64)
    return Spans(ids, example, _templates(span_texts, example, len(offsets) - 1), content, span_texts)


def _cut(pieces: list[str], inside: np.ndarray, start: int, stop: int) -> tuple[list[list[int]], list[bool]]:
    """The spans of one example's tokens `start:stop` (token indices), and for each whether a line ends with
    it."""
    spans: list[list[int]] = []
    line_ends: list[bool] = []
    current: list[int] = []
    for j in range(start, stop + 1):
        if j < stop and inside[j] and not (current and _ends_span(pieces[current[-1]], pieces[j])):
            current.append(j)
            continue
        if current:
            spans.append(current)
            line_ends.append(j == stop or not inside[j] or "\n" in pieces[current[-1]])
            current = []
        if j < stop and inside[j]:
            current.append(j)
    return spans, line_ends


def _ends_span(previous: str, next_piece: str) -> bool:
    """Whether a span ends between two consecutive response tokens."""
    if "\n" in previous:
        return True
    return bool(_SENTENCE_END.search(previous)) and next_piece[:1].isspace()


def _join_short(spans: list[list[int]], line_ends: list[bool], content: np.ndarray) -> list[list[int]]:
    """Join each span with too few word tokens to the next span of its line (or, at a line's end, to the
    previous one of the same line when there is one)."""
    joined: list[list[int]] = []
    carry: list[int] = []
    last_line_open = False  # whether joined[-1] is on the current line
    for span, line_end in zip(spans, line_ends, strict=True):
        span = carry + span
        carry = []
        if int(content[span].sum()) < MIN_CONTENT_TOKENS and not line_end:
            carry = span
            continue
        if int(content[span].sum()) < MIN_CONTENT_TOKENS and last_line_open and joined:
            joined[-1].extend(span)
        else:
            joined.append(span)
        last_line_open = not line_end
    if carry:
        joined.append(carry)
    return joined


def _templates(span_texts: list[str], example: np.ndarray, n_examples: int) -> np.ndarray:
    """bool `[n_spans]`: the span's shape occurs in enough responses to be the task's format."""
    holders: dict[str, set[int]] = defaultdict(set)
    variants: dict[str, set[str]] = defaultdict(set)
    shapes = [span_shape(text) for text in span_texts]
    for shape, text, e in zip(shapes, span_texts, example.tolist(), strict=True):
        holders[shape].add(e)
        if len(variants[shape]) < 2:
            variants[shape].add(" ".join(text.split()))
    needed = max(TEMPLATE_MIN_EXAMPLES, TEMPLATE_MIN_SHARE * n_examples)
    return np.fromiter(
        (len(holders[shape]) >= needed and len(variants[shape]) > 1 for shape in shapes), bool, len(shapes)
    )
