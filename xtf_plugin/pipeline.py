"""From tokenised examples to scores, masks and reasons: the one entry point every integration calls.

`score_dataset` scores (through the cache, in shards of examples so an interrupted run resumes from the
finished shards), fills vector TR from the per-token relevance table, marks protected tokens, finds the spans,
runs the prompt gain's second pass for the tokens the selection reads it at, and runs the selection. Under
torch.distributed (accelerate, torchrun, DeepSpeed) all ranks call it together: they split the forward passes
and every rank gets the same scores. `ScoringRun.parts` does the same a part of the examples at a time, for
`xtf score` on datasets too large to hold scored at once.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xtf_plugin.cache import ScoreCache, data_fingerprint, model_fingerprint, stable_hash, tokenizer_fingerprint
from xtf_plugin.config import XTFConfig
from xtf_plugin.data import TokenizedData
from xtf_plugin.distributed import all_gather, is_main_process, rank, world_size
from xtf_plugin.errors import XTFError
from xtf_plugin.output import ROWS_PER_GROUP
from xtf_plugin.scoring.engine import (
    SCORER_VERSION,
    ScoringStats,
    alone_log_probs,
    alone_plan,
    forward_plan,
    score_forward,
)
from xtf_plugin.scoring.relevance import domain_token_groups, frequent_content_words, relevance_table
from xtf_plugin.selection import (
    Selection,
    SelectionFit,
    apply_selection,
    fit_spans,
    judged_surprise,
    prompt_gain_wanted,
    select_tokens,
)
from xtf_plugin.spans import SpanCut, Spans, cut_spans, templates
from xtf_plugin.token_scores import TokenScores, flatten
from xtf_plugin.tokens import TokenTexts, protected_mask, special_token_ids

logger = logging.getLogger(__name__)

SHARD_EXAMPLES = 256
"""Examples per cache shard: the unit of resumption after an interruption."""


@dataclass
class ScoredDataset:
    """Tokenised examples with their scores, protected tokens and current selection (all flat, see
    `TokenScores`): what `score_dataset` returns (or `ScoringRun.parts`, one part at a time) and
    `output.ScoredFolder` reads back (then with the `summary` and the `source` folder, and `texts` once
    `output.attach_texts` has run).

    With the prompt gain in spans mode, `scores.tr` is NaN outside the spans this selection read it in: selecting
    again with lower `span_*_k` or another mode needs scores from a run with those settings (a missing gain counts
    as grounded)."""

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    scores: TokenScores
    protected: np.ndarray
    selection: Selection
    config: XTFConfig
    texts: TokenTexts | None
    domain_words: list[str] = field(default_factory=list)
    spans: Spans | None = None
    truncated: int = 0
    empty_response: list[int] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def response(self) -> np.ndarray:
        """bool `[n_tokens]`: tokens trained before XTF."""
        return self.labels != -100

    @property
    def filtered_labels(self) -> np.ndarray:
        """int64 `[n_tokens]`: labels with XTF's masked tokens set to -100."""
        return apply_selection(self.labels, self.selection)

    @property
    def n_examples(self) -> int:
        """Number of examples."""
        return len(self.offsets) - 1

    def example_slice(self, index: int) -> slice:
        """Positions of example `index` in the flat arrays."""
        return slice(int(self.offsets[index]), int(self.offsets[index + 1]))

    def parts(self, rows: int | None = None, limit: int | None = None) -> Iterator[tuple[int, ScoredDataset]]:
        """(0, itself): the in-memory counterpart of `output.ScoredFolder.parts`, whose readers take either."""
        yield 0, self

    def first_examples(self, count: int) -> ScoredDataset:
        """Itself: it holds the first `count` examples, and the rest (`output.ScoredFolder.first_examples` reads just
        those)."""
        return self

    def per_example(self, flat: np.ndarray) -> list[np.ndarray]:
        """Cut a flat `[n_tokens]` array into one array per example."""
        return np.split(flat, self.offsets[1:-1])

    @property
    def kept_in_input(self) -> np.ndarray:
        """bool `[n_tokens]`: tokens that stay in the training input (all with `action: mask`; with `remove`, all
        but the selected ones)."""
        if self.config.action == "remove":
            return self.selection.reasons == 0
        return np.ones(len(self.input_ids), bool)

    def training_examples(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """What to train on, per example: (input_ids `[L'_i]`, labels `[L'_i]`, kept `[L_i]`). `kept` says which
        of the example's tokens remain; with `action: mask` all do and the labels carry the -100s."""
        kept = self.kept_in_input
        ids, labels = self.per_example(self.input_ids), self.per_example(self.filtered_labels)
        keep = self.per_example(kept)
        if self.config.action != "remove":
            return ids, labels, keep
        return [x[k] for x, k in zip(ids, keep, strict=True)], [y[k] for y, k in zip(labels, keep, strict=True)], keep


PART_EXAMPLES = ROWS_PER_GROUP
"""Examples a selection decides at a time when it can (`decides_in_parts`): a multiple of `SHARD_EXAMPLES`, so the
parts' cache entries are those of one run over the whole dataset, and the parquet writer's row group, so the
parts write the row groups of one run."""


def decides_in_parts(config: XTFConfig) -> bool:
    """Whether the selection can decide a part of the examples at a time, after a first pass over all of them has
    fitted it (`selection.SelectionFit`): the spans selection with the prompt gain (the `spans` preset). Union
    mode's TR cuts, weighted mode's ranks and vector TR's domain words are fitted on every token, so those
    settings take the whole dataset as one part."""
    return config.mode == "spans" and config.tr_method == "prompt_gain"


def part_size(config: XTFConfig, n_examples: int, part_examples: int = PART_EXAMPLES) -> int:
    """Examples per part of a run over `n_examples`: `part_examples` where the settings allow it and the dataset has
    more, else all of them (one part)."""
    if not decides_in_parts(config) or part_examples >= n_examples:
        return max(n_examples, 1)
    if part_examples % SHARD_EXAMPLES:
        raise ValueError(f"part_examples {part_examples}: expected a multiple of {SHARD_EXAMPLES}")
    return part_examples


@contextlib.contextmanager
def draining(parts: Iterator[Any]) -> Iterator[Iterator[Any]]:
    """`parts` (of `ScoringRun.parts`) for the block to consume; if the block fails under torch.distributed, the
    remaining parts are scored before the error goes on, so that the other ranks, waiting in the next part's
    collectives, are not left there."""
    try:
        yield parts
    except BaseException:
        if world_size() > 1:
            with contextlib.suppress(Exception):
                for _ in parts:
                    pass
        raise


def score_dataset(
    model: torch.nn.Module,
    tokenizer: Any,
    data: TokenizedData,
    config: XTFConfig,
    progress: bool = True,
    use_cache: bool = True,
) -> ScoredDataset:
    """Score the response tokens (RI, KN and TR as the config asks for them), then select.

    Args:
        model: the frozen causal LM to score with (the one about to be fine-tuned).
        tokenizer: its tokenizer.
        data: tokenised examples.
        config: XTF settings.
        progress: show progress bars.
        use_cache: read and write the score cache (`config.cache_dir`).
    """
    (scored,) = ScoringRun(model, tokenizer, config, progress, use_cache).parts(lambda first, last: data, len(data),
                                                                                max(len(data), 1))
    return scored


@dataclass
class _Forward:
    """One part of the examples after the forward pass: tokens, scores, the cache keys of its shards and, in
    spans mode, its spans (templates not decided yet)."""

    data: TokenizedData
    first: int
    scores: TokenScores
    shard_keys: list[str]
    input_ids: np.ndarray
    labels: np.ndarray
    cut: SpanCut | None

    @property
    def response(self) -> np.ndarray:
        return self.labels != -100


class ScoringRun:
    """Scores and selects a dataset a part of the examples at a time (`parts`), in two passes: the first scores
    every part (through the cache) and fits the selection on all of them, the second decides each part with that
    fit and runs the prompt gain's second pass for it. Memory holds one part's tokens and scores, and of the others
    what the fit needs (each span's mean surprise and template keys); every part is decided as one run over the
    whole dataset would decide it. Under torch.distributed all ranks call `parts` together, as `score_dataset`."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: XTFConfig, progress: bool = True,
                 use_cache: bool = True, spill_dir: str | Path | None = None) -> None:
        """`spill_dir`: where pass 1 leaves each part's scores for pass 2 (about 12 bytes a token, deleted at the
        end; default: the system's temporary folder)."""
        self.model, self.tokenizer, self.config, self.progress = model, tokenizer, config, progress
        self.spill_dir = spill_dir
        self.cache = ScoreCache(config.resolved_cache_dir()) if use_cache else None
        self.identity = {
            "scorer_version": SCORER_VERSION,
            "model": model_fingerprint(model),
            "tokenizer": tokenizer_fingerprint(tokenizer),
        }
        self.texts = TokenTexts(tokenizer)
        self.specials = special_token_ids(tokenizer)

    def parts(
        self, part_of: Callable[[int, int], TokenizedData], n_examples: int, part_examples: int = PART_EXAMPLES
    ) -> Iterator[ScoredDataset]:
        """One `ScoredDataset` per part, in order (offsets from 0 in each; `stats` cover the whole run once the last
        part is out).

        Args:
            part_of: `part_of(first, last)` gives examples `first` to `last - 1` tokenised; each is asked for twice
                when there are several parts.
            n_examples: examples in the dataset.
            part_examples: examples per part, a multiple of `SHARD_EXAMPLES` (see `part_size`: settings that cannot
                be decided a part at a time take the whole dataset as one part).

        Raises `XTFError` when a part's tokens differ between the passes (the data changed meanwhile).
        """
        started = time.perf_counter()
        part_examples = part_size(self.config, n_examples, part_examples)
        bounds = [(first, min(n_examples, first + part_examples)) for first in range(0, max(n_examples, 1), part_examples)]
        stats, gain_stats = ScoringStats(), ScoringStats()
        with tempfile.TemporaryDirectory(prefix=".xtf-parts-", dir=self.spill_dir) as spill:
            # pass 1: every part's scores, and what the fit needs of its spans
            kept, cached_shards, judged, cuts, keys = None, 0, [], [], []
            for k, (first, last) in enumerate(bounds):
                part, cached = self._forward(part_of(first, last), first, stats)
                cached_shards += cached
                keys.append(part.shard_keys)
                if part.cut is not None:
                    judged.append(judged_surprise(part.scores.kn, part.cut.spans))
                    cuts.append((first, part.cut.spans.example, part.cut.spans.repeat, part.cut.shapes, part.cut.variants))
                if len(bounds) == 1:
                    kept = part
                else:
                    np.savez(Path(spill) / f"{k}.npz", ri=part.scores.ri, kn=part.scores.kn, tr=part.scores.tr)
            del part  # pass 2 holds one part at a time, not this one and its own
            fit, template = None, None
            if self.config.mode == "spans":
                fit = fit_spans(np.concatenate(judged), self.config)
                example = np.concatenate([first + e for first, e, *_ in cuts])
                template = templates(np.concatenate([c[3] for c in cuts]), np.concatenate([c[4] for c in cuts]),
                                     example, n_examples, ~np.concatenate([c[2] for c in cuts]))
            del judged, cuts
            # pass 2: each part decided with the fit
            spans_before = response_tokens = 0
            for k, (first, last) in enumerate(bounds):
                part = kept if kept is not None else self._reload(part_of(first, last), first, Path(spill) / f"{k}.npz",
                                                                  keys[k])
                spans = None
                if part.cut is not None and template is not None:
                    spans = part.cut.spans
                    spans.template = template[spans_before : spans_before + spans.n_spans]
                    spans_before += spans.n_spans
                scored = self._decide(part, spans, fit, gain_stats)
                response_tokens += int(scored.response.sum())
                scored.stats = {
                    "scoring_seconds": round(stats.seconds + gain_stats.seconds, 3),
                    "total_seconds": round(time.perf_counter() - started, 3),
                    "forward_passes": stats.forward_passes + gain_stats.forward_passes,
                    "tokens_scored_by_model": stats.tokens + gain_stats.tokens,
                    "tokens_per_second": round((stats.tokens + gain_stats.tokens)
                                               / max(stats.seconds + gain_stats.seconds, 1e-9), 1),
                    "prompt_gain_seconds": round(gain_stats.seconds, 3),
                    "prompt_gain_tokens": gain_stats.tokens,
                    "cached_shards": cached_shards,
                    "response_tokens": response_tokens,
                }
                kept = None
                yield scored

    def _forward(self, data: TokenizedData, first: int, stats: ScoringStats) -> tuple[_Forward, int]:
        """Pass 1 on the part that starts at example `first`: (its scores and spans, shards taken from the cache)."""
        scores, cached, keys = _forward_scores(self.model, data, self.config, self.cache, self.identity, stats,
                                               self.progress, first)
        return self._with_tokens(data, first, scores, keys), cached

    def _reload(self, data: TokenizedData, first: int, spilled: Path, keys: list[str]) -> _Forward:
        """Pass 2 on one part of several: its scores as pass 1 left them, if its shards are those pass 1 scored
        (`keys`)."""
        if keys != [_forward_key(self.identity, self.config, data, start) for start in range(0, len(data), SHARD_EXAMPLES)]:
            raise XTFError(f"examples {first + 1} to {first + len(data)} changed while they were scored (was the data "
                           "file modified?); score them again")
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in data.input_ids], dtype=np.int64)])
        with np.load(spilled) as arrays:
            scores = TokenScores(offsets, arrays["ri"], arrays["kn"], arrays["tr"])
        return self._with_tokens(data, first, scores, keys)

    def _with_tokens(self, data: TokenizedData, first: int, scores: TokenScores, keys: list[str]) -> _Forward:
        input_ids, offsets = flatten(data.input_ids)
        labels, _ = flatten(data.labels)
        cut = (cut_spans(input_ids, offsets, labels != -100, self.texts, self.specials)
               if self.config.mode == "spans" else None)
        return _Forward(data, first, scores, keys, input_ids, labels, cut)

    def _decide(self, part: _Forward, spans: Spans | None, fit: SelectionFit | None, gain_stats: ScoringStats
                ) -> ScoredDataset:
        """Pass 2 on one part: vector TR or the prompt gain, protected tokens, the selection."""
        config, scores, response = self.config, part.scores, part.response
        domain_words: list[str] = []
        if config.tr_method == "vector":
            domain_words = _fill_vector_relevance(self.model, self.tokenizer, scores, part.input_ids, response,
                                                  self.texts, config, self.cache, self.identity)
        protected = np.concatenate([
            protected_mask(part.input_ids[s], part.labels[s], self.texts, self.specials, config.protect)
            for s in scores.example_slices()
        ]) if scores.n_examples else np.zeros(0, bool)
        if config.tr_method == "prompt_gain":
            _fill_prompt_gain(self.model, part.data, scores, prompt_gain_wanted(scores, response, spans, config, fit),
                              config, self.cache, part.shard_keys, gain_stats, self.progress, part.first)
        selection = select_tokens(scores, response, protected, config, spans, fit)
        return ScoredDataset(
            input_ids=part.input_ids,
            labels=part.labels,
            offsets=scores.offsets,
            scores=scores,
            protected=protected,
            selection=selection,
            config=config,
            texts=self.texts,
            domain_words=domain_words,
            spans=spans,
            truncated=part.data.truncated,
            empty_response=list(part.data.empty_response),
        )


def _forward_key(identity: dict[str, Any], config: XTFConfig, data: TokenizedData, start: int) -> str:
    """The cache key of the forward entry of the shard of `data` that starts at example `start`."""
    ids = data.input_ids[start : start + SHARD_EXAMPLES]
    labels = data.labels[start : start + SHARD_EXAMPLES]
    return stable_hash({"kind": "forward", **identity, "settings": config.scorer_settings(),
                        "data": data_fingerprint(ids, labels)})


def _forward_scores(
    model: torch.nn.Module,
    data: TokenizedData,
    config: XTFConfig,
    cache: ScoreCache | None,
    identity: dict[str, Any],
    stats: ScoringStats,
    progress: bool,
    first: int = 0,
) -> tuple[TokenScores, int, list[str]]:
    """RI / KN (and the prompt gain's first term, see `score_forward`) for all examples, shard by shard through
    the cache: (scores, shards taken from the cache, each shard's cache key). `first`: the index of `data`'s first
    example in the dataset, for errors that name an example.

    Under torch.distributed every rank calls this with the same data: the ranks agree on which shards are
    cached everywhere, split the batches of each other shard between them, and gather the shard's scores,
    so every rank returns the same scores and rank 0 writes the cache.
    """
    starts = range(0, len(data), SHARD_EXAMPLES)
    keys: list[str] = []
    entries: list[TokenScores | None] = []
    for start in starts:
        keys.append(_forward_key(identity, config, data, start))
        entry = cache.load("forward", keys[-1], ("offsets", "ri", "kn", "tr")) if cache else None
        lengths = [len(x) for x in data.input_ids[start : start + SHARD_EXAMPLES]]
        usable = entry is not None and np.array_equal(np.diff(entry["offsets"]), lengths)
        entries.append(TokenScores(entry["offsets"], entry["ri"], entry["kn"], entry["tr"]) if usable else None)
    # a shard counts as cached only where every rank has it (caches need not be shared between machines)
    cached_everywhere = np.all(all_gather([e is not None for e in entries]), axis=0)
    parts: list[TokenScores] = []
    for start, key, entry, cached in zip(starts, keys, entries, cached_everywhere, strict=True):
        if cached and entry is not None:
            parts.append(entry)
            continue
        ids = data.input_ids[start : start + SHARD_EXAMPLES]
        labels = data.labels[start : start + SHARD_EXAMPLES]
        part = TokenScores.empty([len(x) for x in ids])

        def run(batches: Collection[int] | None) -> tuple[np.ndarray, ...]:
            shard = score_forward(model, ids, labels, config, progress, stats, batches, first + start)  # noqa: B023
            return shard.ri, shard.kn, shard.tr

        part.ri, part.kn, part.tr = _split_between_ranks(run, forward_plan(ids, config), part.offsets)
        if cache is not None and rank() == 0:
            cache.save("forward", key, {"offsets": part.offsets, "ri": part.ri, "kn": part.kn, "tr": part.tr})
        parts.append(part)
    return (TokenScores.concatenate(parts) if parts else TokenScores.empty([])), int(cached_everywhere.sum()), keys


def _split_between_ranks(
    run: Callable[[Collection[int] | None], tuple[np.ndarray, ...]], plan: list[list[int]], offsets: np.ndarray
) -> tuple[np.ndarray, ...]:
    """`run(batches)` returns flat per-token arrays of one shard, computed for the given batches of `plan`; with
    several ranks each runs every `size`-th batch of the one-process plan (same batches, so the same float32
    scores) and the shares are gathered, so every rank returns the whole shard's arrays."""
    size, this_rank = world_size(), rank()
    if size == 1:
        return run(None)
    arrays = run({b for b in range(len(plan)) if b % size == this_rank})
    owner = np.full(len(offsets) - 1, -1, np.int64)
    for b, batch in enumerate(plan):
        owner[batch] = b % size
    token_owner = np.repeat(owner, np.diff(offsets))
    for r, share in enumerate(all_gather(arrays)):
        taken = token_owner == r
        for array, theirs in zip(arrays, share, strict=True):
            array[taken] = theirs[taken]
    return arrays


def _fill_prompt_gain(
    model: torch.nn.Module,
    data: TokenizedData,
    scores: TokenScores,
    wanted: np.ndarray,
    config: XTFConfig,
    cache: ScoreCache | None,
    shard_keys: list[str],
    stats: ScoringStats,
    progress: bool,
    first: int = 0,
) -> None:
    """Turn `scores.tr` (`log p(token | prompt, prefix)`) into the prompt gain at the `wanted` tokens (bool
    `[n_tokens]`), NaN elsewhere.

    The second pass feeds each example's response alone, only as far as its last wanted token, and skips the
    examples without one; a shard's entry is keyed by its forward entry and by how far each example is fed.
    `first`: the index of `data`'s first example in the dataset, for errors that name an example.
    """
    # every rank decides from rank 0's view: ranks whose per-node caches hold first passes of other runs (other
    # batches, other last bits) could otherwise disagree on a span at a fence and skip a collective
    wanted = np.unpackbits(all_gather(np.packbits(wanted))[0], count=len(wanted)).astype(bool)
    alone = np.full(scores.n_tokens, np.nan, np.float32)
    if not wanted.any():
        scores.tr = alone
        return
    positions = np.flatnonzero(wanted)
    example = np.searchsorted(scores.offsets, positions, side="right") - 1
    stops = np.zeros(scores.n_examples, np.int64)  # one past each example's last wanted token
    np.maximum.at(stops, example, positions + 1 - scores.offsets[example])
    shards = [(start, [int(x) for x in stops[start : start + SHARD_EXAMPLES]])
              for start in range(0, len(data), SHARD_EXAMPLES)]
    keys = [stable_hash({"kind": "prompt_gain", "forward": shard_keys[k], "stops": shard_stops})
            for k, (_, shard_stops) in enumerate(shards)]
    entries = []
    for key, (start, shard_stops) in zip(keys, shards, strict=True):
        entry = cache.load("prompt_gain", key, ("alone",)) if cache and any(shard_stops) else None
        n = int(scores.offsets[start + len(shard_stops)] - scores.offsets[start])
        entries.append(entry["alone"] if entry is not None and entry["alone"].shape == (n,) else None)
    cached_everywhere = np.all(all_gather([e is not None for e in entries]), axis=0)
    for (start, shard_stops), key, entry, cached in zip(shards, keys, entries, cached_everywhere, strict=True):
        if not any(shard_stops):
            continue
        ids = data.input_ids[start : start + SHARD_EXAMPLES]
        labels = data.labels[start : start + SHARD_EXAMPLES]
        offsets = scores.offsets[start : start + len(ids) + 1]
        tokens = slice(int(offsets[0]), int(offsets[-1]))
        if cached and entry is not None:
            alone[tokens] = entry
            continue

        def run(batches: Collection[int] | None) -> tuple[np.ndarray, ...]:
            return (alone_log_probs(model, ids, labels, shard_stops, config, progress, stats, batches, first + start),)  # noqa: B023

        (alone[tokens],) = _split_between_ranks(run, alone_plan(labels, shard_stops, config), offsets - offsets[0])
        if cache is not None and rank() == 0:
            cache.save("prompt_gain", key, {"alone": alone[tokens]})
    scores.tr = np.where(wanted, scores.tr - alone, np.nan).astype(np.float32)


def _fill_vector_relevance(
    model: torch.nn.Module,
    tokenizer: Any,
    scores: TokenScores,
    input_ids: np.ndarray,
    response: np.ndarray,
    texts: TokenTexts,
    config: XTFConfig,
    cache: ScoreCache | None,
    identity: dict[str, Any],
) -> list[str]:
    """Fill `scores.tr` at response positions from the per-token relevance table; return the domain words."""
    distinct = np.unique(input_ids[response])
    if config.domain_source == "words":
        words = list(config.tr_domain_words or [])
    else:
        texts.prepare(distinct.tolist())
        response_texts = ("".join(texts[t] for t in input_ids[s][response[s]]) for s in scores.example_slices())
        words = frequent_content_words(response_texts, config.tr_domain_top_k)
        if not words:
            raise XTFError("xtf.tr_domain: auto found no content words in the responses; set tr_domain_words")
    groups = domain_token_groups(tokenizer, words)
    key = stable_hash(
        {
            "kind": "relevance",
            **identity,
            "settings": config.relevance_settings(),
            "groups": groups,
            "ids": stable_hash(distinct.tolist()),
        }
    )
    entry = cache.load("relevance", key, ("ids", "tr")) if cache else None
    if entry is None or not np.array_equal(entry["ids"], distinct):
        with torch.no_grad():
            table = relevance_table(model, distinct, groups, config.tr_space, config.tr_center)
        entry = {"ids": distinct, "tr": np.array([table[int(t)] for t in distinct], np.float32)}
        if cache is not None and is_main_process():  # every rank computed the same table; one writes it
            cache.save("relevance", key, entry)
    lookup = np.searchsorted(entry["ids"], input_ids[response])
    scores.tr[response] = entry["tr"][lookup]
    return words
