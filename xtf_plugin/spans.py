"""Spans: the sentences and lines of every response, the unit in which noise is written.

Injected or scraped noise comes a sentence, a line or a phrase at a time, while token scores are noisy one by
one; `spans` selection (see `selection.py`) decides per span. A span ends after a token holding a line break,
or after sentence punctuation (`.`, `!`, `?`) when the next token starts with whitespace. A span with fewer
than `MIN_CONTENT_TOKENS` word tokens (`Mr.`, `1.`, a lone `Hence,`) is joined to the next span of its line,
so abbreviations and list markers do not become spans of their own.

A span is a *template* when its shape (the text with digit runs replaced by `0`, words copied from the prompt
or from earlier in the response replaced by `_`, case and spacing folded) recurs in at least
`max(TEMPLATE_MIN_EXAMPLES, TEMPLATE_MIN_SHARE * n_examples)` responses with more than one text: answer lines
(`The answer is 20.`, `#### 20`, `Answer: Porto; 1971`), equation lines (`30 - 2 = 28.`), sentences that restate
the question in a fixed wording. Templates carry the task's format and its results, and spans selection never
masks them as off-task. A sentence repeated word for word across responses is not a template: it has no slot
for the example's content, which is what boilerplate looks like. A repeat (below) is never a template.

A span is a *repeat* when it belongs to a run of spans said again right after itself, word for word (case,
spacing and the closing punctuation aside), within one turn of a response: a response that loops (`A. A. A.` or
`A. B. A. B.`) says nothing new after the first time, which stays trained. The run needs `REPEAT_MIN_WORDS`
words, and at most `REPEAT_MAX_PERIOD` spans repeat as a block. A sentence said again later, after other text (a
summary, a corrected version of a code block), is not a repeat.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from xtf_plugin.tokens import TokenTexts

MIN_CONTENT_TOKENS = 3
"""A span needs this many word tokens (a letter or digit) to stand alone."""
TEMPLATE_MIN_EXAMPLES = 3
TEMPLATE_MIN_SHARE = 0.01
"""A span shape is a template when at least this many responses (and this share of all) contain it."""
REPEAT_MIN_WORDS = 6
"""A repeated run needs this many words: short lines (`Yes.`, `So:`) are said twice in good answers."""
REPEAT_MAX_PERIOD = 16
"""The longest block of spans (a paragraph) whose immediate repetition is found."""

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$")
_WORD = re.compile(r"\w")
_LETTERS = re.compile(r"[^\W\d_]+")
_WORDS = re.compile(r"\w+")
_TRAILING = re.compile(r"[\s.!?,;:]+$")


@dataclass
class Spans:
    """The spans of a dataset's response tokens (flat over examples, as `TokenScores`).

    Attributes:
        ids: int64 `[n_tokens]`, span index of each token, -1 for tokens in no span (prompt, special tokens).
        example: int64 `[n_spans]`, the example each span belongs to.
        template: bool `[n_spans]`, the span's shape recurs across responses (never masked as off-task).
        repeat: bool `[n_spans]`, the span is part of a run said again right after itself (never a template).
        content: bool `[n_tokens]`, the token holds a letter or a digit (the tokens a span's score averages).
        texts: `[n_spans]` the text of each span.
    """

    ids: np.ndarray
    example: np.ndarray
    template: np.ndarray
    repeat: np.ndarray
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


SPAN_PART_EXAMPLES = 1024
"""Examples cut into spans at a time: the cutting's temporaries grow with one part, not with the dataset."""


def find_spans(
    input_ids: np.ndarray, offsets: np.ndarray, response: np.ndarray, texts: TokenTexts, special_ids: set[int]
) -> Spans:
    """Cut every response into spans (`cut_spans`) and decide which of them are templates (`templates`).

    Args:
        input_ids: int64 `[n_tokens]`, flat over examples.
        offsets: int64 `[n_examples + 1]`.
        response: bool `[n_tokens]`, trained tokens.
        texts: decoded token texts.
        special_ids: token ids (EOS, end of turn) that belong to no span.
    """
    cut = cut_spans(input_ids, offsets, response, texts, special_ids)
    spans = cut.spans
    spans.template = templates(cut.shapes, cut.variants, spans.example, len(offsets) - 1, ~spans.repeat)
    return spans


@dataclass
class SpanCut:
    """The spans of some examples before templates are known (`spans.template` all False), with each span's shape
    and whitespace-folded text as 64-bit keys: what `templates` needs of them to decide over all examples.

    Attributes:
        spans: the spans, numbered from 0, `example` counted from the first of these examples.
        shapes: int64 `[n_spans]`, a key of each span's shape (`_copy_folded_shapes`).
        variants: int64 `[n_spans]`, a key of each span's text with its whitespace folded.
    """

    spans: Spans
    shapes: np.ndarray
    variants: np.ndarray


def cut_spans(
    input_ids: np.ndarray, offsets: np.ndarray, response: np.ndarray, texts: TokenTexts, special_ids: set[int]
) -> SpanCut:
    """Cut the responses into spans, `SPAN_PART_EXAMPLES` examples at a time (a response's spans depend on it
    alone); which spans are templates is left to `templates`, over every example of the dataset. Arguments as
    `find_spans`."""
    offsets = np.asarray(offsets, np.int64)
    n_examples = len(offsets) - 1
    cuts = []
    for first in range(0, n_examples, SPAN_PART_EXAMPLES):
        last = min(n_examples, first + SPAN_PART_EXAMPLES)
        a, b = int(offsets[first]), int(offsets[last])
        cuts.append((first, _cut_part(input_ids[a:b], offsets[first : last + 1] - a, response[a:b], texts, special_ids)))
    if not cuts:
        return _no_spans(np.zeros(0, bool))
    before = np.cumsum([0] + [cut.spans.n_spans for _, cut in cuts])
    ids = np.concatenate([np.where(cut.spans.ids >= 0, cut.spans.ids + before[k], -1) for k, (_, cut) in enumerate(cuts)])
    example = np.concatenate([cut.spans.example + first for first, cut in cuts])
    spans = Spans(ids, example, np.zeros(len(example), bool), np.concatenate([cut.spans.repeat for _, cut in cuts]),
                  np.concatenate([cut.spans.content for _, cut in cuts]), [t for _, cut in cuts for t in cut.spans.texts])
    return SpanCut(spans, np.concatenate([cut.shapes for _, cut in cuts]), np.concatenate([cut.variants for _, cut in cuts]))


def _no_spans(content: np.ndarray) -> SpanCut:
    """No span in these tokens (`content`: bool `[n_tokens]`)."""
    return SpanCut(Spans(np.full(len(content), -1, np.int64), np.zeros(0, np.int64), np.zeros(0, bool),
                         np.zeros(0, bool), content, []), np.zeros(0, np.int64), np.zeros(0, np.int64))


def _key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little",
                          signed=True)


def _cut_part(
    input_ids: np.ndarray, offsets: np.ndarray, response: np.ndarray, texts: TokenTexts, special_ids: set[int]
) -> SpanCut:
    """`cut_spans` of at most `SPAN_PART_EXAMPLES` examples.

    Token features are computed once per distinct token id and the cuts with array operations; only the
    joining of short pieces walks the spans (not the tokens) in Python.
    """
    n = len(input_ids)
    n_examples = len(offsets) - 1
    if n == 0:
        return _no_spans(np.zeros(0, bool))
    distinct, inverse = np.unique(np.asarray(input_ids, np.int64), return_inverse=True)
    pieces = texts.of(distinct.tolist())

    def feature(test) -> np.ndarray:  # type: ignore[no-untyped-def]
        return np.fromiter((bool(test(p)) for p in pieces), bool, len(pieces))[inverse]

    content = feature(_WORD.search)
    newline = feature(lambda p: "\n" in p)
    sentence_end = feature(_SENTENCE_END.search)
    space_first = feature(lambda p: p[:1].isspace())
    special = np.isin(input_ids, np.fromiter(special_ids, np.int64, len(special_ids)))
    inside = np.asarray(response, bool) & ~special
    example_start = np.zeros(n + 1, bool)
    example_start[np.asarray(offsets[:-1], np.int64)] = True
    # a piece ends after a line break, after sentence punctuation followed by a space, or where the response stops
    cut_after = newline[:-1] | (sentence_end[:-1] & space_first[1:])
    starts = inside & (~np.r_[False, inside[:-1]] | example_start[:n] | np.r_[False, cut_after])
    raw = np.where(inside, np.cumsum(starts) - 1, -1)
    first = np.flatnonzero(starts)
    if first.size == 0:  # no response token anywhere: no span
        return _no_spans(content)
    # the last token of each piece: the last inside token before the next piece starts
    last = np.maximum.reduceat(np.where(inside, np.arange(n), -1), first)
    n_raw = first.size
    raw_content = np.bincount(raw[inside], weights=content[inside], minlength=n_raw).astype(np.int64)
    following = np.minimum(last + 1, n)
    line_end = newline[last] | (following == n) | ~np.r_[inside, False][following] | example_start[following]
    raw_example = np.searchsorted(offsets, first, side="right") - 1
    joined = _join_short(raw_example, raw_content, line_end)
    ids = np.where(raw >= 0, joined[np.maximum(raw, 0)], -1)
    n_spans = int(joined.max()) + 1
    example = np.zeros(n_spans, np.int64)
    example[joined] = raw_example
    order = np.argsort(ids, kind="stable")
    order = order[ids[order] >= 0]
    bounds = np.searchsorted(ids[order], np.arange(n_spans + 1))
    span_texts = ["".join(pieces[i] for i in inverse[order[bounds[k] : bounds[k + 1]]]) for k in range(n_spans)]
    context = np.flatnonzero(~np.asarray(response, bool) & ~special)
    context_example = np.searchsorted(offsets, context, side="right") - 1
    context_bounds = np.searchsorted(context_example, np.arange(n_examples + 1))
    prompts = ["".join(pieces[i] for i in inverse[context[context_bounds[e] : context_bounds[e + 1]]])
               for e in range(n_examples)]
    shapes = _copy_folded_shapes(span_texts, example, prompts)
    # a turn starts where a piece follows a token that is not trained (the prompt, a user turn, EOS); spans never
    # cross one, since a piece ends where the trained tokens do
    raw_turn = np.cumsum(~np.r_[False, inside][first] | example_start[first])
    turn = np.zeros(n_spans, np.int64)
    turn[joined] = raw_turn
    repeat = _repeats(span_texts, turn)
    spans = Spans(ids.astype(np.int64), example, np.zeros(n_spans, bool), repeat, content, span_texts)
    return SpanCut(spans, np.fromiter(map(_key, shapes), np.int64, n_spans),
                np.fromiter((_key(" ".join(t.split())) for t in span_texts), np.int64, n_spans))


def _copy_folded_shapes(span_texts: list[str], example: np.ndarray, prompts: list[str]) -> list[str]:
    """`span_shape` of each span with the words it copies folded to `_`: words of its example's prompt or of an
    earlier span of the same response. `Answer: chemist; 1982` and `Answer: Porto; 1971` then share one shape,
    as `The answer is 20.` and `The answer is 7.` do."""
    shapes = []
    seen: set[str] = set()
    previous = -1
    for text, e in zip(span_texts, example.tolist(), strict=True):
        if e != previous:
            seen, previous = set(_LETTERS.findall(prompts[e].lower())), e
        shape = span_shape(text)
        shapes.append(_LETTERS.sub(lambda m, seen=seen: "_" if m.group(0) in seen else m.group(0), shape))
        seen.update(_LETTERS.findall(shape))
    return shapes


def _join_short(example: np.ndarray, content: np.ndarray, line_end: np.ndarray) -> np.ndarray:
    """int64 `[n_pieces]`: the span of each piece. A piece with too few word tokens joins the next piece of its
    line (or, at a line's end, the span before it on the same line when there is one)."""
    out = np.empty(len(example), np.int64)
    next_id = 0
    carry: list[int] = []
    carried = 0
    open_line = False  # the last span of this example is on the current line
    previous, first_of_example = -1, 0
    for k in range(len(example)):
        e = int(example[k])
        if e != previous:
            if carry:
                out[carry] = next_id
                next_id += 1
            carry, carried, open_line, previous = [], 0, False, e
            first_of_example = next_id
        members, words = [*carry, k], carried + int(content[k])
        carry, carried = [], 0
        if words < MIN_CONTENT_TOKENS and not line_end[k]:
            carry, carried = members, words
            continue
        if words < MIN_CONTENT_TOKENS and open_line and next_id > first_of_example:
            out[members] = next_id - 1
        else:
            out[members] = next_id
            next_id += 1
        open_line = not line_end[k]
    if carry:
        out[carry] = next_id
    return out


def templates(shapes: np.ndarray, variants: np.ndarray, example: np.ndarray, n_examples: int, eligible: np.ndarray
               ) -> np.ndarray:
    """bool `[n_spans]`: the `eligible` span's shape occurs in enough responses (among eligible spans) with more
    than one text to be the task's format (over every span of the dataset, for any part of it). Repeats are not eligible: every word of one is copied, so the shapes of
    a dataset's loops would look alike.

    Args:
        shapes: int64 `[n_spans]`, a 64-bit key of each span's shape (`_copy_folded_shapes`).
        variants: int64 `[n_spans]`, a 64-bit key of each span's whitespace-folded text.
        example: int64 `[n_spans]`, the example each span belongs to.
        n_examples: examples in the dataset.
        eligible: bool `[n_spans]`.
    """
    chosen = np.flatnonzero(eligible)
    holders = _distinct_per_key(shapes[chosen], example[chosen])
    texts = _distinct_per_key(shapes[chosen], variants[chosen])
    needed = max(TEMPLATE_MIN_EXAMPLES, TEMPLATE_MIN_SHARE * n_examples)
    template = np.zeros(len(shapes), bool)
    template[chosen] = (holders >= needed) & (texts > 1)
    return template


def _distinct_per_key(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """int64 `[len(keys)]`: for each position, how many distinct `values` occur with its key."""
    if keys.size == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((values, keys))
    k, v = keys[order], values[order]
    new_key = np.r_[True, k[1:] != k[:-1]]
    new_pair = new_key | np.r_[True, v[1:] != v[:-1]]
    group = np.cumsum(new_key) - 1
    counts = np.bincount(group, weights=new_pair).astype(np.int64)
    result = np.empty(keys.size, np.int64)
    result[order] = counts[group]
    return result


def _repeats(span_texts: list[str], turn: np.ndarray) -> np.ndarray:
    """bool `[n_spans]`: the span is in a run of spans that equal, one for one, the spans `p` places before them
    in the same turn, for a period `p <= REPEAT_MAX_PERIOD` no longer than the run, and the run has
    `REPEAT_MIN_WORDS` words or more.

    Args:
        span_texts: `[n_spans]` the text of each span, in order.
        turn: int64 `[n_spans]`, a number shared by the spans of one turn of one response (and no others).
    """
    n = len(span_texts)
    out = np.zeros(n, bool)
    codes: dict[str, int] = {}
    key = np.fromiter((codes.setdefault(_TRAILING.sub("", " ".join(t.lower().split())), len(codes)) for t in span_texts),
                      np.int64, n)
    words_before = np.r_[0, np.cumsum(np.fromiter((len(_WORDS.findall(t)) for t in span_texts), np.int64, n))]
    for period in range(1, min(REPEAT_MAX_PERIOD, n // 2) + 1):
        same = np.zeros(n, bool)
        same[period:] = (key[period:] == key[:-period]) & (turn[period:] == turn[:-period])
        if not same.any():
            continue
        edges = np.diff(np.r_[0, same.astype(np.int8), 0])
        starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        loops = (stops - starts >= period) & (words_before[stops] - words_before[starts] >= REPEAT_MIN_WORDS)
        for start, stop in zip(starts[loops].tolist(), stops[loops].tolist(), strict=True):
            out[start:stop] = True
    return out
