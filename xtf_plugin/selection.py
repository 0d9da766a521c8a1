"""Selection: per-token scores + `XTFConfig` -> which response tokens are masked, and why.

Pure functions over numpy arrays: no model, no tokenizer. Every array is flat over the dataset (see
`TokenScores`); `response[k]` is True where the token's label is trained (label != -100 before XTF) and
`protected[k]` is True for tokens that must never be masked (EOS / end-of-turn, `protect` spans).

Union mode (the paper, with the official code's caps):
  * RI lacks when the score is below the example's Tukey fence `Q1 - ri_fence_k * IQR`;
  * KN lacks when `p(token) > kn_p_threshold`, i.e. `kn < 1 - kn_p_threshold`;
  * TR lacks when the token falls in one of `tr_mask_classes` of a Multi-Otsu fit to the TR scores of all
    response tokens of the dataset;
  * each attribute masks at most `floor(cap * n)` of an example's `n` response tokens (the most lacking
    ones), the union masks at most `floor(drop_ratio * n)` (most reasons first, then most lacking).
Weighted mode: rank-normalise each attribute (per example or dataset-wide), combine with `weights`, mask
the lowest `drop_ratio` fraction.
Spans mode: per span (sentence or line, see `spans.py`), the mean surprise `-log p` of its word tokens; a
span that is not a template, lies above the robust fence `median + span_fence_k * scale` of all spans of the
dataset but the repeats (scale = 1.4826 MAD) and stands more than `span_fence_k * scale` above the least surprising other span
of its own response is off-task, and its tokens are masked (reason bits TR + SPAN): all of them, or only the
phrase that holds the excess surprise when that is a small part of the span. A span of a run said again right
after itself (`Spans.repeat`: a response that loops) adds nothing new, and its tokens are all masked (KN + SPAN);
then the most surprising off-task spans, up to `floor(drop_ratio * n)` tokens per example, where n counts the
response tokens left after its repeats. With `tr_method: prompt_gain` (the spans preset) the prompt gain tells
text the prompt grounds from text inserted into the response: an off-task span whose words outside the phrase
are not grounded is masked whole, and a span above the lower fence `median + span_ungrounded_k * scale` that the
prompt makes less likely is off-task as well.
Every mode never masks a protected token and never leaves an example without a trainable token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xtf_plugin.config import ATTRIBUTES, REASON_BITS, XTFConfig
from xtf_plugin.spans import Spans
from xtf_plugin.token_scores import TokenScores

PHRASE_SHARE = 2 / 3
"""Spans mode: an off-task span whose most surprising phrase holds less than this share of its word tokens has
only that phrase masked."""

FENCE_ITERATIONS = 20
"""Spans mode: at most this many recomputations of the surprise fence over the spans below it."""

GROUNDED_GAIN = 0.0
"""Spans mode with the prompt gain: the rest of an off-task span (outside its most surprising phrase) is grounded
when the prompt makes its words more likely on average; when it is not, the phrase is not a few odd words inside
a real sentence, and the whole span is masked."""

GAIN_SPAN_K = 2.0
"""Spans mode with the prompt gain: the gain is computed for the spans more than this many robust standard
deviations above the median span (median and scale as the default `span_fence_k` fits them), and for any other
span the settings make the selection read (a `span_fence_k` or `span_ungrounded_k` set lower); the second pass
skips the rest of the dataset. Below the defaults (2.5 and 3.0) and fitted with a fixed k, so that changing either
a little reuses the cached gains."""

UNGROUNDED_GAIN = -0.1
"""Spans mode with the prompt gain: a span below the surprise fence is off-task only when the prompt makes its
words less likely by more than this (nats per word token) and it lies above `span_ungrounded_k`'s fence: an
inserted line that is fluent enough to pass the fence but belongs to no prompt of the dataset's."""

SPAN_BIT = 8
"""Reason bit added to the attribute's bit when a token was masked with its whole span: with TR, an off-task span;
with KN, a repeat."""

# All three stored scores lack their attribute at the low end (KN = 1 - p lacks novelty when p is high), so
# "most lacking" is always "lowest score".
_FIELD_OF = {"reasoning": "ri", "novelty": "kn", "relevance": "tr"}


@dataclass
class Selection:
    """Which tokens are masked.

    Attributes:
        reasons: uint8 `[n_tokens]`, reason bits of masked tokens (1 = RI, 2 = KN, 4 = TR); 0 = kept.
        flagged: uint8 `[n_tokens]`, reason bits of every failed test, before caps and ceiling.
        combined: float32 `[n_tokens]`, weighted mode's combined score in [0, 1] (NaN elsewhere).
        thresholds: the thresholds actually used (JSON-serialisable), for the summary and report.
        span_surprise: spans mode: float64 `[n_spans]`, each span's mean surprise (None in other modes).
        span_off_task: spans mode: bool `[n_spans]`, spans judged off-task (before the per-example ceiling).
        span_ungrounded: spans mode with the prompt gain: bool `[n_spans]`, the off-task spans below the surprise
            fence, judged off-task because the prompt makes them less likely (None without the prompt gain).
        span_gain: spans mode with the prompt gain: float64 `[n_spans]`, each span's mean prompt gain over its
            word tokens (nats; None without the prompt gain).
    """

    reasons: np.ndarray
    flagged: np.ndarray
    combined: np.ndarray
    thresholds: dict[str, Any] = field(default_factory=dict)
    span_surprise: np.ndarray | None = None
    span_off_task: np.ndarray | None = None
    span_ungrounded: np.ndarray | None = None
    span_gain: np.ndarray | None = None

    @property
    def keep(self) -> np.ndarray:
        """bool `[n_tokens]`: True where the token is not masked by XTF."""
        return self.reasons == 0


@dataclass
class SelectionFit:
    """What a selection fits on every example of the dataset before deciding any token: with the dataset's fit,
    selecting a part of its examples decides them as selecting the whole dataset does (weighted mode with `scope:
    dataset` ranks every token of the dataset against every other, so it has no fit and selects only a whole).

    Attributes:
        tr_cuts: union mode: the Multi-Otsu cuts of TR over every response token (None: TR off or no split).
        span_fence: spans mode: `robust_fence` of the spans' mean surprise, repeats left out: (fence, median,
            scale).
        gain_floor: spans mode: the mean surprise above which a span's prompt gain is computed whatever the
            settings (`GAIN_SPAN_K`).
    """

    tr_cuts: np.ndarray | None = None
    span_fence: tuple[float, float, float] = (math.inf, math.nan, math.nan)
    gain_floor: float = math.inf


def fit_selection(scores: TokenScores, response: np.ndarray, config: XTFConfig, spans: Spans | None = None
                  ) -> SelectionFit:
    """The `SelectionFit` of these examples (spans mode reads `scores.kn` and `spans`, union mode `scores.tr`)."""
    if config.mode == "spans":
        if spans is None or spans.ids.shape != (scores.n_tokens,):
            raise ValueError("mode 'spans' needs the spans of the same tokens (spans.find_spans)")
        return fit_spans(judged_surprise(scores.kn, spans), config)
    if config.mode == "union" and config.weights.enabled()["relevance"]:
        response = np.asarray(response, dtype=bool)
        return SelectionFit(tr_cuts=multiotsu_thresholds(scores.tr[response], config.tr_otsu_classes))
    return SelectionFit()


def fit_spans(judged: np.ndarray, config: XTFConfig) -> SelectionFit:
    """Spans mode's fit from every span's mean surprise (float64 `[n_spans]`, NaN for repeats and spans without a
    word token): what a streaming caller keeps of the spans between its passes."""
    fit = robust_fence(judged, config.span_fence_k)
    reference_k = XTFConfig.model_fields["span_fence_k"].default
    _, median, scale = fit if config.span_fence_k == reference_k else robust_fence(judged, reference_k)
    return SelectionFit(span_fence=fit, gain_floor=median + GAIN_SPAN_K * scale if math.isfinite(scale) else math.inf)


def select_tokens(
    scores: TokenScores,
    response: np.ndarray,
    protected: np.ndarray,
    config: XTFConfig,
    spans: Spans | None = None,
    fit: SelectionFit | None = None,
) -> Selection:
    """Decide which response tokens to mask.

    Args:
        scores: per-token scores, `n_tokens` flat.
        response: bool `[n_tokens]`, trained tokens before XTF.
        protected: bool `[n_tokens]`, tokens never masked.
        config: the selection settings.
        spans: the responses' spans (`spans.find_spans`); needed by `mode: spans`.
        fit: the dataset's fit when these examples are a part of it (default: fitted on them).
    Returns:
        A `Selection`; `reasons` is non-zero only where `response & ~protected`.
    """
    response = np.asarray(response, dtype=bool)
    protected = np.asarray(protected, dtype=bool) & response
    if response.shape != (scores.n_tokens,) or protected.shape != (scores.n_tokens,):
        raise ValueError(f"response/protected must have shape ({scores.n_tokens},)")
    if fit is None:
        fit = fit_selection(scores, response, config, spans)
    if config.mode == "union":
        selection = _select_union(scores, response, protected, config, fit)
    elif config.mode == "spans":
        if spans is None or spans.ids.shape != (scores.n_tokens,):
            raise ValueError("mode 'spans' needs the spans of the same tokens (spans.find_spans)")
        selection = _select_spans(scores, response, protected, spans, config, fit)
    else:
        selection = _select_weighted(scores, response, protected, config)
    _ensure_trainable(selection, scores, response, protected, config)
    return selection


# ----------------------------------------------------------------------------------------------------
# union mode


def tukey_fence(values: np.ndarray, k: float) -> float:
    """Lower Tukey fence `Q1 - k * (Q3 - Q1)` of the finite values (linear-interpolated quantiles)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan
    q1, q3 = np.quantile(values, [0.25, 0.75])
    return float(q1 - k * (q3 - q1))


def multiotsu_thresholds(values: np.ndarray, classes: int, nbins: int = 256) -> np.ndarray | None:
    """Multi-Otsu thresholds (ascending, `classes - 1` of them) of the finite values, or None when the
    values are too few or too concentrated to split into `classes` classes.

    Same histogram and result as `skimage.filters.threshold_multiotsu` (tested against it), found by dynamic
    programming over the histogram's bins in O(classes * nbins^2): skimage's exhaustive search takes seconds
    at 5 classes, and selection re-runs on every settings change.
    """
    values = values[np.isfinite(values)].astype(np.float64)
    if values.size < classes or np.unique(values).size < classes:
        return None
    counts, edges = np.histogram(values, bins=nbins, range=(values.min(), values.max()))
    centers = (edges[:-1] + edges[1:]) / 2
    if np.count_nonzero(counts) < classes:
        return None
    # Between-class variance is, up to a constant, sum_k S_k^2 / P_k over the classes' bin ranges.
    weight = np.concatenate([[0.0], np.cumsum(counts, dtype=np.float64)])
    moment = np.concatenate([[0.0], np.cumsum(counts * centers)])
    with np.errstate(divide="ignore", invalid="ignore"):
        # cost[a, b]: class made of bins a..b-1
        mass = weight[None, :] - weight[:, None]
        cost = np.where(mass > 0, (moment[None, :] - moment[:, None]) ** 2 / mass, -np.inf)
    cost[np.tril_indices(nbins + 1)] = -np.inf
    best = cost[0].copy()  # best[b]: one class covering bins 0..b-1
    splits = []
    for _ in range(classes - 1):
        candidate = best[:, None] + cost  # [a, b]: previous classes end at a, next class a..b-1
        split = np.argmax(candidate, axis=0)
        best = candidate[split, np.arange(nbins + 1)]
        splits.append(split)
    end, indices = nbins, []
    for split in reversed(splits):
        end = int(split[end])
        indices.append(end - 1)
    if not np.isfinite(best[nbins]):
        return None
    return centers[np.array(sorted(indices))]


def _select_union(scores: TokenScores, response: np.ndarray, protected: np.ndarray, config: XTFConfig,
                  fit: SelectionFit) -> Selection:
    n = scores.n_tokens
    enabled = config.weights.enabled()
    flagged = np.zeros(n, np.uint8)
    capped = np.zeros(n, np.uint8)
    thresholds: dict[str, Any] = {"mode": "union", "kn_p_threshold": config.kn_p_threshold}

    tr_classes_lacking = np.zeros(n, bool)
    if enabled["relevance"]:
        cuts = fit.tr_cuts
        thresholds["tr_otsu_thresholds"] = None if cuts is None else [float(c) for c in cuts]
        if cuts is not None:
            tr_class = np.digitize(scores.tr, cuts)
            tr_classes_lacking = np.isin(tr_class, config.tr_mask_classes) & np.isfinite(scores.tr)

    fences: list[float] = []
    for part in scores.example_slices():
        resp = response[part]
        n_resp = int(resp.sum())
        if n_resp == 0:
            continue
        candidate = resp & ~protected[part]
        lacking: dict[str, np.ndarray] = {}
        if enabled["reasoning"]:
            ri = scores.ri[part]
            if config.ri_scale == "log":
                ri = np.log(np.maximum(ri, np.finfo(np.float32).tiny))
            finite = resp & np.isfinite(ri)
            if finite.sum() >= 4:
                fence = tukey_fence(ri[finite], config.ri_fence_k)
                fences.append(fence)
                lacking["reasoning"] = candidate & finite & (ri < fence)
        if enabled["novelty"]:
            kn = scores.kn[part]
            lacking["novelty"] = candidate & np.isfinite(kn) & (kn < 1.0 - config.kn_p_threshold)
        if enabled["relevance"]:
            lacking["relevance"] = candidate & tr_classes_lacking[part]
        for name, mask in lacking.items():
            bit = REASON_BITS[name]
            flagged[part][mask] |= bit
            cap = math.floor(getattr(config.caps, name) * n_resp)
            chosen = _most_lacking(getattr(scores, _FIELD_OF[name])[part], mask, cap)
            capped[part][chosen] |= bit
        ceiling = math.floor(config.drop_ratio * n_resp)
        capped[part] = _apply_ceiling(capped[part], scores, part, resp, ceiling, _enabled_names(config))

    if fences:
        thresholds["ri_fence"] = {
            "k": config.ri_fence_k,
            "scale": config.ri_scale,
            "min": float(np.min(fences)),
            "median": float(np.median(fences)),
            "max": float(np.max(fences)),
            "examples": len(fences),
        }
    return Selection(capped, flagged, np.full(n, np.nan, np.float32), thresholds)


def _most_lacking(values: np.ndarray, mask: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` masked positions with the lowest values (ties: earlier position first)."""
    index = np.flatnonzero(mask)
    if index.size <= count:
        return index
    order = np.lexsort((index, values[index]))
    return np.sort(index[order[:count]])


def _enabled_names(config: XTFConfig) -> list[str]:
    """The attributes with a non-zero weight, in `ATTRIBUTES` order."""
    return [name for name, on in config.weights.enabled().items() if on]


def _within_example_lack_rank(scores: TokenScores, part: slice, resp: np.ndarray, names: list[str]) -> np.ndarray:
    """float `[len]`: for each token the smallest normalised rank (0 = most lacking) over the attributes
    `names` (the enabled ones: a switched-off attribute must not decide anything), among the example's
    response tokens."""
    best = np.ones(part.stop - part.start, np.float64)
    for name in names:
        values = getattr(scores, _FIELD_OF[name])[part]
        best = np.minimum(best, np.where(resp, _normalised_rank(values, resp), 1.0))
    return best


def _apply_ceiling(
    bits: np.ndarray, scores: TokenScores, part: slice, resp: np.ndarray, ceiling: int, names: list[str]
) -> np.ndarray:
    """Keep at most `ceiling` dropped tokens: most reasons first, then the most lacking."""
    dropped = np.flatnonzero(bits)
    if dropped.size <= ceiling:
        return bits
    n_reasons = np.unpackbits(bits[dropped, None], axis=1).sum(axis=1).astype(np.int64)
    lack = _within_example_lack_rank(scores, part, resp, names)[dropped]
    order = np.lexsort((dropped, lack, -n_reasons))
    result = np.zeros_like(bits)
    chosen = dropped[order[:ceiling]]
    result[chosen] = bits[chosen]
    return result


# ----------------------------------------------------------------------------------------------------
# weighted mode


def _normalised_rank(values: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Average ranks of `values[where]` scaled to [0, 1] (0 = lowest); NaN and positions outside `where`
    get 0.5, the neutral rank."""
    result = np.full(values.shape, 0.5, np.float64)
    index = np.flatnonzero(where & np.isfinite(values))
    if index.size == 0:
        return result
    if index.size == 1:
        result[index] = 0.5
        return result
    vals = values[index].astype(np.float64)
    order = np.argsort(vals, kind="stable")
    ranks = np.empty(index.size, np.float64)
    sorted_vals = vals[order]
    # average rank over ties, so equal scores get equal treatment
    boundaries = np.flatnonzero(np.diff(sorted_vals)) + 1
    starts = np.concatenate([[0], boundaries])
    stops = np.concatenate([boundaries, [index.size]])
    for start, stop in zip(starts, stops, strict=True):
        ranks[order[start:stop]] = (start + stop - 1) / 2.0
    result[index] = ranks / (index.size - 1)
    return result


def combined_scores(
    scores: TokenScores, response: np.ndarray, config: XTFConfig
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Weighted mode's combined score.

    Returns:
        (combined float64 `[n_tokens]` in [0, 1], higher = more worth training; per-attribute normalised
        ranks, attribute name -> float64 `[n_tokens]`). NaN outside `response`.
    """
    weights = {name: getattr(config.weights, name) for name in ATTRIBUTES}
    total = sum(weights.values())
    ranks: dict[str, np.ndarray] = {}
    for name in ATTRIBUTES:
        if weights[name] == 0:
            continue
        values = getattr(scores, _FIELD_OF[name])
        if config.scope == "dataset":
            ranks[name] = _normalised_rank(values, response)
        else:
            rank = np.full(scores.n_tokens, 0.5)
            for part in scores.example_slices():
                rank[part] = _normalised_rank(values[part], response[part])
            ranks[name] = rank
    combined = sum(weights[name] * rank for name, rank in ranks.items()) / total
    combined = np.where(response, combined, np.nan)
    return combined, ranks


def _select_weighted(scores: TokenScores, response: np.ndarray, protected: np.ndarray, config: XTFConfig) -> Selection:
    n = scores.n_tokens
    combined, ranks = combined_scores(scores, response, config)
    candidate = response & ~protected
    chosen = np.zeros(n, bool)
    if config.scope == "dataset":
        count = math.floor(config.drop_ratio * int(response.sum()))
        index = np.flatnonzero(candidate)
        order = np.lexsort((index, combined[index]))
        chosen[index[order[:count]]] = True
    else:
        for part in scores.example_slices():
            count = math.floor(config.drop_ratio * int(response[part].sum()))
            local = _most_lacking(combined[part], candidate[part], count)
            chosen[part.start + local] = True
    drop = np.zeros(n, np.uint8)
    flagged = np.zeros(n, np.uint8)
    for name, rank in ranks.items():
        flagged |= np.where(candidate & (rank <= config.drop_ratio), REASON_BITS[name], 0).astype(np.uint8)
    drop[chosen] = flagged[chosen]
    # a token dropped on the combined score alone is blamed on its weakest weighted attribute
    unexplained = np.flatnonzero(chosen & (drop == 0))
    if unexplained.size:
        names = list(ranks)
        stacked = np.stack([ranks[name][unexplained] for name in names])
        weakest = np.argmin(stacked, axis=0)
        drop[unexplained] = np.array([REASON_BITS[names[i]] for i in weakest], np.uint8)
    thresholds = {"mode": "weighted", "scope": config.scope, "drop_ratio": config.drop_ratio}
    return Selection(drop, flagged, combined.astype(np.float32), thresholds)


# ----------------------------------------------------------------------------------------------------
# spans mode


def surprise(kn: np.ndarray) -> np.ndarray:
    """float64: `-log p(token)` from KN (`1 - p`), p floored at 1e-12."""
    return -np.log(np.clip(1.0 - np.asarray(kn, np.float64), 1e-12, 1.0))


def robust_fence(values: np.ndarray, k: float) -> tuple[float, float, float]:
    """Upper fence `median + k * 1.4826 * MAD` of the clean part of the finite values: (fence, median, scale).

    Noise lies above the clean values, and it can be a large share of them (two noise lines in a five-line
    response are 40% of the spans), enough to widen a MAD over all values past the noise itself. So the fence
    is grown from the median of all values: the median and MAD of the values at or below the current fence give
    the next fence, until it settles. While noise is less than half of the values, the values below the median
    are clean, and the fence settles at the top of the clean values: the lowest fence that the values below it
    reproduce. On clean data it settles where a MAD over all values puts it.

    When the values below the median are all alike (no scale to grow from) or the fence would fall below the
    median, the fence is computed from above instead: a MAD over all values, then again over the values below
    that fence, until it settles.
    """
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.inf, math.nan, math.nan
    median, scale = _median_scale(values)
    if scale == 0:
        return math.inf, median, scale
    grown = _settled_fence(values, k, median, lowest=median)
    return grown if grown is not None else _settled_fence(values, k, median + k * scale)  # type: ignore[return-value]


def _median_scale(values: np.ndarray) -> tuple[float, float]:
    """Median and robust standard deviation (1.4826 MAD) of non-empty finite values."""
    median = float(np.median(values))
    return median, 1.4826 * float(np.median(np.abs(values - median)))


def _settled_fence(values: np.ndarray, k: float, fence: float, lowest: float | None = None
                   ) -> tuple[float, float, float] | None:
    """Iterate fence -> median + k * 1.4826 * MAD of the values at or below it, from `fence`, at most
    `FENCE_ITERATIONS` times: (fence, median, scale). With `lowest`: None when a step finds no scale or falls
    below `lowest`; without it, a step without scale keeps the fence it had."""
    median, scale = _median_scale(values)
    for _ in range(FENCE_ITERATIONS):
        kept_median, kept_scale = _median_scale(values[values <= fence])
        following = kept_median + k * kept_scale
        if kept_scale == 0 or (lowest is not None and following < lowest):
            return None if lowest is not None else (fence, median, scale)
        median, scale = kept_median, kept_scale
        if following == fence:
            break
        fence = following
    return fence, median, scale


def _span_surprise(token_surprise: np.ndarray, spans: Spans) -> tuple[np.ndarray, np.ndarray]:
    """(each span's mean surprise `[n_spans]`, the same with repeats NaN: the spans the fence is fitted on)."""
    span_surprise = spans.mean(token_surprise)
    # a copy is the least surprising text there is: counted, repeats would pull the fence and each response's
    # reference down onto the spans that are only said once
    return span_surprise, np.where(spans.repeat, np.nan, span_surprise)


def judged_surprise(kn: np.ndarray, spans: Spans) -> np.ndarray:
    """float64 `[n_spans]`: each span's mean surprise from KN (`[n_tokens]`), NaN for repeats: what `fit_spans`
    fits on (templates need not be decided yet)."""
    return _span_surprise(surprise(kn), spans)[1]


def prompt_gain_wanted(scores: TokenScores, response: np.ndarray, spans: Spans | None, config: XTFConfig,
                       fit: SelectionFit | None = None) -> np.ndarray:
    """bool `[n_tokens]`: the response tokens whose prompt gain the selection may read.

    Union and weighted mode read TR everywhere (nowhere with `weights.relevance: 0`); spans mode only in the spans
    that are not templates and lie above the surprise fence (is the rest of an off-task phrase's span grounded?)
    or above the lower fence `median + span_ungrounded_k * scale` (is the span grounded at all?). The tokens
    returned are those of every such span, and of every span above `GAIN_SPAN_K`'s floor, which does not move
    with the settings. `scores.kn` must be final; `scores.tr` is not read. `fit`: the dataset's, when these
    examples are a part of it.
    """
    response = np.asarray(response, dtype=bool)
    if config.mode != "spans":
        return response.copy() if config.weights.relevance > 0 else np.zeros_like(response)
    if spans is None or spans.ids.shape != (scores.n_tokens,):
        raise ValueError("mode 'spans' needs the spans of the same tokens (spans.find_spans)")
    fit = fit or fit_selection(scores, response, config, spans)
    _, judged = _span_surprise(surprise(scores.kn), spans)
    fence, median, scale = fit.span_fence
    if not math.isfinite(fence):
        return np.zeros_like(response)
    read = min(fence, median + config.span_ungrounded_k * scale)
    chosen = (judged > min(read, fit.gain_floor)) & ~spans.template
    return response & (spans.ids >= 0) & chosen[np.maximum(spans.ids, 0)]


def _select_spans(
    scores: TokenScores, response: np.ndarray, protected: np.ndarray, spans: Spans, config: XTFConfig,
    fit: SelectionFit
) -> Selection:
    n = scores.n_tokens
    token_surprise = surprise(scores.kn)
    span_surprise, judged = _span_surprise(token_surprise, spans)
    fence, median, scale = fit.span_fence
    above_fence = (judged > fence) & ~spans.template
    spared = _not_above_own_response(above_fence, judged, spans, median, config.span_fence_k * scale)
    off_task = above_fence & ~spared
    # the prompt gain is TR only with tr_method prompt_gain; vector TR says nothing about one prompt
    gain = np.asarray(scores.tr, np.float64) if config.tr_method == "prompt_gain" else None
    span_gain = spans.mean(gain) if gain is not None else None
    ungrounded = np.zeros_like(off_task)
    ungrounded_fence = math.inf
    if span_gain is not None and math.isfinite(fence):
        ungrounded_fence = median + config.span_ungrounded_k * scale
        below = (judged > ungrounded_fence) & ~above_fence & ~spans.template & (span_gain <= UNGROUNDED_GAIN)
        ungrounded = below & ~_not_above_own_response(below, judged, spans, median, config.span_ungrounded_k * scale)
    candidate = response & ~protected
    # each span's maskable tokens, as slices of one array sorted by span
    tokens = np.flatnonzero((spans.ids >= 0) & candidate)
    tokens = tokens[np.argsort(spans.ids[tokens], kind="stable")]
    bounds = np.searchsorted(spans.ids[tokens], np.arange(spans.n_spans + 1))
    off_task_bits = np.uint8(REASON_BITS["relevance"] | SPAN_BIT)
    repeat_bits = np.uint8(REASON_BITS["novelty"] | SPAN_BIT)
    flagged = np.zeros(n, np.uint8)
    drop = np.zeros(n, np.uint8)
    # a copy is certain to add nothing, so repeats are masked whole and outside the ceiling, which bounds what an
    # uncertain test may take: it applies to what the response says once (a response looped twice is over half
    # copies, and a ceiling counted on all its tokens would keep some of them)
    repeated = tokens[spans.repeat[spans.ids[tokens]]]
    flagged[repeated] = drop[repeated] = repeat_bits
    budget = [math.floor(config.drop_ratio * int((response[part] & (drop[part] == 0)).sum()))
              for part in scores.example_slices()]
    chosen = np.flatnonzero(off_task | ungrounded)
    for index in chosen[np.argsort(-span_surprise[chosen], kind="stable")].tolist():
        span = tokens[bounds[index] : bounds[index + 1]]
        members = span if ungrounded[index] else _off_task_part(span, token_surprise, spans.content, fence)
        if gain is not None and 0 < members.size < span.size and not _grounded(np.setdiff1d(span, members), gain,
                                                                                   spans.content):
            members = span
        flagged[members] = off_task_bits
        e = int(spans.example[index])
        if 0 < members.size <= budget[e]:
            drop[members] = off_task_bits
            budget[e] -= members.size
    dropped_spans = np.unique(spans.ids[(drop > 0) & (spans.ids >= 0)])
    thresholds = {
        "mode": "spans",
        "span_surprise_fence": None if math.isinf(fence) else round(fence, 4),
        "span_surprise_median": round(median, 4) if math.isfinite(median) else None,
        "span_surprise_scale": round(scale, 4) if math.isfinite(scale) else None,
        "span_fence_k": config.span_fence_k,
        "spans": spans.n_spans,
        "template_spans": int(spans.template.sum()),
        "off_task_spans": int((off_task | ungrounded).sum()),
        "repeated_spans": int(spans.repeat.sum()),
        "dropped_spans": int(dropped_spans.size),
        "spared_spans": int(spared.sum()),
    }
    if gain is not None:
        thresholds["span_ungrounded_fence"] = None if math.isinf(ungrounded_fence) else round(ungrounded_fence, 4)
        thresholds["span_ungrounded_k"] = config.span_ungrounded_k
        thresholds["ungrounded_spans"] = int(ungrounded.sum())
    return Selection(drop, flagged, np.full(n, np.nan, np.float32), thresholds, span_surprise, off_task | ungrounded,
                     ungrounded if gain is not None else None, span_gain)


def _grounded(members: np.ndarray, gain: np.ndarray, content: np.ndarray) -> bool:
    """Whether the prompt makes the word tokens among `members` more likely on average (True when none has a
    gain: nothing speaks against the text)."""
    words = members[content[members] & np.isfinite(gain[members])]
    return words.size == 0 or float(gain[words].mean()) > GROUNDED_GAIN


def _not_above_own_response(candidate: np.ndarray, span_surprise: np.ndarray, spans: Spans, median: float,
                            margin: float) -> np.ndarray:
    """bool `[n_spans]`: the `candidate` spans that stand no more than `margin` above the least surprising other
    span of their own response (above the dataset's `median` where the response has no other span).

    A response written in a more surprising style than most of the dataset (API documentation among math
    answers) has most of its spans above the dataset's fence, and none of them is noise; inserted noise stands
    out from the rest of its own response as well.
    """
    if not candidate.any():
        return candidate.copy()
    scored = np.flatnonzero(np.isfinite(span_surprise))
    order = scored[np.lexsort((span_surprise[scored], spans.example[scored]))]  # by response, least surprising first
    example = spans.example[order]
    starts = np.r_[True, example[1:] != example[:-1]]
    head = np.flatnonzero(starts)  # where each response's least surprising span sits in `order`
    group = np.cumsum(starts) - 1
    after = np.minimum(head + 1, len(order) - 1)
    lowest = span_surprise[order[head]]
    runner_up = np.where((head + 1 < len(order)) & (example[after] == example[head]), span_surprise[order[after]], np.nan)
    reference = np.full(spans.n_spans, median)
    reference[order] = np.where(starts, runner_up[group], lowest[group])
    reference = np.where(np.isnan(reference), median, reference)
    return candidate & (span_surprise <= reference + margin)


def _off_task_part(members: np.ndarray, token_surprise: np.ndarray, content: np.ndarray, fence: float) -> np.ndarray:
    """The tokens of an off-task span to mask: the whole span, unless its excess surprise sits in a phrase.

    The phrase is the run of the span's tokens with the largest total excess surprise `-log p - fence` over its
    word tokens (other tokens count 0); when that run holds less than `PHRASE_SHARE` of the span's word
    tokens (a few random words inside a real sentence), only the run is masked, else the whole span (an
    inserted sentence or line, its punctuation and line break included).
    """
    words = content[members] & np.isfinite(token_surprise[members])
    if not words.any():
        return members[:0]  # every word of the span is protected: nothing of it is masked
    excess = np.where(words, token_surprise[members] - fence, 0.0)
    best, best_start, best_stop, total, start = -np.inf, 0, 0, 0.0, 0
    for k, value in enumerate(excess):
        if total <= 0:
            total, start = 0.0, k
        total += value
        if total > best:
            best, best_start, best_stop = total, start, k + 1
    if best <= 0:
        return members[:0]  # no maskable word is above the fence: the surprise was in protected words
    if words[best_start:best_stop].sum() >= PHRASE_SHARE * words.sum():
        return members
    return members[best_start:best_stop]


# ----------------------------------------------------------------------------------------------------


def _ensure_trainable(
    selection: Selection, scores: TokenScores, response: np.ndarray, protected: np.ndarray, config: XTFConfig
) -> None:
    """Un-mask the least lacking dropped token of any example that would otherwise train on nothing (weighted
    mode: the highest combined score; union mode: the highest lack rank over the enabled attributes; spans mode:
    over KN, the one score it always has)."""
    for part in scores.example_slices():
        resp = response[part]
        if not resp.any():
            continue
        drop = selection.reasons[part]
        if (resp & (drop == 0)).any():
            continue
        if config.mode == "weighted":
            lack = selection.combined[part].astype(np.float64)
        else:
            names = ["novelty"] if config.mode == "spans" else _enabled_names(config)
            lack = _within_example_lack_rank(scores, part, resp, names)
        dropped = np.flatnonzero(drop)
        rescue = dropped[np.lexsort((dropped, -lack[dropped]))[0]]
        drop[rescue] = 0


def apply_selection(labels: np.ndarray, selection: Selection) -> np.ndarray:
    """int64 `[n_tokens]`: `labels` with every masked token set to -100."""
    return masked_labels(labels, selection.reasons)


def masked_labels(labels: np.ndarray, reasons: np.ndarray) -> np.ndarray:
    """int64 `[n]`: `labels` set to -100 where `reasons` (uint8 `[n]`, as `Selection.reasons`) is non-zero."""
    return np.where(reasons > 0, -100, labels).astype(np.int64)
