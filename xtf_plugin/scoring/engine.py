"""The batched scoring engine: one no-grad forward pass per batch gives RI and KN for every response token.

For each batch of right-padded examples the decoder runs once (the LM head is not applied to every position);
the attention capture adds RI from the chosen layers, and the LM head is applied only at the positions that
predict a response token (KN). The prompt gain's second term comes from a second pass over the responses alone,
`alone_log_probs`, which the pipeline runs only for the tokens its selection reads. Vector TR needs no pass over
the examples at all (see `relevance.py`).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from xtf_plugin.config import XTFConfig
from xtf_plugin.errors import NON_FINITE_HINT, XTFError
from xtf_plugin.scoring.attention import capture_attention_received, resolve_layers
from xtf_plugin.scoring.novelty import novelty_from_log_probs, token_log_probs
from xtf_plugin.token_scores import TokenScores

SCORER_VERSION = 7
"""Bumped whenever the scoring math or the batch plan changes (a batch's padding changes the last float bits), so a
cached entry always equals a fresh run's."""


@dataclass
class ScoringStats:
    """What a scoring run cost."""

    seconds: float = 0.0
    tokens: int = 0
    forward_passes: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Tokens scored per wall-clock second."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@contextmanager
def _scoring_run(model: torch.nn.Module, total: int, desc: str, progress: bool, stats: ScoringStats) -> Iterator[tqdm]:
    """Eval mode and a tqdm bar over `total` tokens (shown when the run takes more than two seconds) for one
    scoring run; the model's mode comes back whatever happens, and a finished run adds its time to `stats`."""
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=desc, delay=2, disable=not progress)
    try:
        yield bar
    finally:
        bar.close()
        model.train(was_training)
    stats.seconds += time.perf_counter() - started
    stats.tokens += total


def _decode(decoder: torch.nn.Module, ids: torch.Tensor, valid: torch.Tensor, stats: ScoringStats) -> torch.Tensor:
    """`[B, L, hidden]` final hidden states of one right-padded batch (the decoder alone: no LM head)."""
    # without padding the attention needs no mask: the causal kernel alone, no [B, 1, L, L] mask
    mask = None if bool(valid.all()) else valid.long()
    stats.forward_passes += 1
    return decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def _device_of(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _pad_right(sequences: Sequence[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged int arrays -> (int64 `[B, L]` ids padded with 0, bool `[B, L]` validity)."""
    length = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    valid = torch.zeros(len(sequences), length, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        valid[row, : len(seq)] = True
    return ids.to(device), valid.to(device)


def _log_probs_at(
    model: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor
) -> torch.Tensor:
    """float32 `[B, L]`: log p(ids[b, j] | ids[b, :j]) where `scored[b, j]` (j >= 1), NaN elsewhere.

    Args:
        hidden: `[B, L, hidden_size]` final hidden states.
        ids: int64 `[B, L]`.
        scored: bool `[B, L]`.
    """
    scored = scored.clone()
    scored[:, 0] = False
    rows, cols = scored.nonzero(as_tuple=True)
    out = torch.full(ids.shape, float("nan"), dtype=torch.float32, device=ids.device)
    if rows.numel():
        out[rows, cols] = token_log_probs(model, hidden[rows, cols - 1], ids[rows, cols]).to(out.device)
    return out


PADDING_SHARE = 1 / 8
"""With a token budget, a batch also closes before its padding would pass this share of the budget: a few long
examples among many short ones (real data) would otherwise pad the short ones to their length."""


def batch_plan(lengths: Sequence[int], batch_size: int, batch_tokens: int | None = None) -> list[list[int]]:
    """The batches `score_forward` runs, as example indices: longest first (less padding), ties by index; a
    batch holds at most `batch_size` examples and, when `batch_tokens` is given, at most that many tokens with
    its padding (`examples * longest`; an example longer than that is a batch of its own) and at most
    `PADDING_SHARE * batch_tokens` padding tokens.

    A batch's padding changes float32 scores in the last bits, so whoever scores an example (one process or
    one of several) must put it in the same batch to get bit-identical scores.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plan: list[list[int]] = []
    padding = 0  # of the open batch
    for index in order:
        batch = plan[-1] if plan else []
        longest = lengths[batch[0]] if batch else 0
        added = longest - lengths[index]  # the padding this example brings: the batch's first is its longest
        if batch and len(batch) < batch_size and (batch_tokens is None or (
                (len(batch) + 1) * longest <= batch_tokens and padding + added <= PADDING_SHARE * batch_tokens)):
            batch.append(index)
            padding += added
        else:
            plan.append([index])
            padding = 0
    return plan


@torch.no_grad()
def score_forward(
    model: torch.nn.Module,
    input_ids: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    config: XTFConfig,
    progress: bool = True,
    stats: ScoringStats | None = None,
    batches: Collection[int] | None = None,
    first_example: int = 0,
) -> TokenScores:
    """RI (unless `ri_layers` is `none`) and KN of every response token (and, for the prompt gain, the
    log-probability it starts from).

    Args:
        model: a causal LM with transformers' attention interface (fp32/bf16/4-bit, any device).
        input_ids: one int array `[L_i]` per example.
        labels: one int array `[L_i]` per example, -100 on tokens that are not trained.
        config: scorer settings (`batch_size`, `batch_tokens`, `ri_layers`, `ri_exclude_sink`, `tr_method`).
        progress: show a tqdm bar (tokens/s) when scoring takes more than two seconds.
        stats: accumulates time, tokens and forward passes when given.
        batches: run only these batches of `forward_plan(input_ids, config)` (one process's share of a split
            run); the other examples' scores stay NaN. Default: all.
        first_example: index of `input_ids[0]` in the whole dataset, so an error names the user's example.
    Returns:
        `TokenScores` aligned with `input_ids`; NaN where a token is not scored. With `tr_method: prompt_gain`,
        `tr` holds `log p(token | prompt, prefix)`, which becomes the prompt gain once `alone_log_probs` is
        subtracted; with vector TR it is NaN (the caller fills it in).
    """
    if len(input_ids) != len(labels):
        raise ValueError("input_ids and labels differ in length")
    stats = stats if stats is not None else ScoringStats()
    lengths = [len(ids) for ids in input_ids]
    scores = TokenScores.empty(lengths)
    if not input_ids:
        return scores
    device = _device_of(model)
    decoder = model.get_decoder()
    layers = resolve_layers(config.ri_layers, model.config.num_hidden_layers)
    plan = [b for i, b in enumerate(forward_plan(input_ids, config)) if batches is None or i in batches]
    total = sum(lengths[i] for batch in plan for i in batch)
    # without RI layers (`ri_layers: none`) the model runs its own attention, untouched
    capturing = capture_attention_received(model, layers, config.ri_exclude_sink) if layers else nullcontext()
    with _scoring_run(model, total, "xtf scoring", progress, stats) as bar, capturing as capture:
        for batch in plan:
            ids, valid = _pad_right([np.asarray(input_ids[i]) for i in batch], device)
            trained, _ = _pad_right([np.asarray(labels[i]) != -100 for i in batch], device)
            trained = trained.bool() & valid
            if capture is not None:
                capture.begin(valid)
            hidden = _decode(decoder, ids, valid, stats)
            log_probs = _log_probs_at(model, hidden, ids, trained)
            ri = None
            if capture is not None:
                ri = capture.result()
                capture.end()
            _check_finite((log_probs,) if ri is None else (log_probs, ri), trained, [first_example + i for i in batch])
            for row, index in enumerate(batch):
                part = slice(int(scores.offsets[index]), int(scores.offsets[index + 1]))
                n = lengths[index]
                mask = trained[row, :n].cpu().numpy()
                mask[0] = False
                scores.kn[part] = np.where(mask, novelty_from_log_probs(log_probs[row, :n]).cpu().numpy(), np.nan)
                if ri is not None:  # else RI stays NaN
                    scores.ri[part] = np.where(mask, ri[row, :n].cpu().numpy(), np.nan)
                if config.tr_method == "prompt_gain":
                    scores.tr[part] = np.where(mask, log_probs[row, :n].cpu().numpy(), np.nan)
            bar.update(int(valid.sum()))
    return scores


def forward_plan(input_ids: Sequence[np.ndarray], config: XTFConfig) -> list[list[int]]:
    """The batches of `score_forward`, as example indices."""
    return batch_plan([len(ids) for ids in input_ids], config.batch_size, config.batch_tokens)


def _response_start(labels: np.ndarray) -> int:
    """Index of an example's first trained token (its length when none is trained)."""
    trained = np.flatnonzero(np.asarray(labels) != -100)
    return int(trained[0]) if trained.size else len(labels)


def alone_plan(labels: Sequence[np.ndarray], stops: Sequence[int], config: XTFConfig) -> list[list[int]]:
    """The batches of `alone_log_probs`, as example indices (examples with nothing to feed are in none)."""
    starts = [_response_start(y) for y in labels]
    fed = [i for i in range(len(labels)) if stops[i] > starts[i]]
    plan = batch_plan([1 + stops[i] - starts[i] for i in fed], config.batch_size, config.batch_tokens)
    return [[fed[j] for j in batch] for batch in plan]


@torch.no_grad()
def alone_log_probs(
    model: torch.nn.Module,
    input_ids: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    stops: Sequence[int],
    config: XTFConfig,
    progress: bool = True,
    stats: ScoringStats | None = None,
    batches: Collection[int] | None = None,
    first_example: int = 0,
) -> np.ndarray:
    """The prompt gain's second term: `log p(token | response prefix alone)` of trained tokens.

    Each example is fed from its first trained token up to position `stops[i]` (exclusive), after one anchor
    token (BOS, or EOS when the tokenizer has none), so the first response token is predicted from the anchor
    alone; the prompt gain of a token is its `log p` from `score_forward` minus this.

    Args:
        input_ids, labels: as for `score_forward`.
        stops: one position per example; nothing at or after it is fed (0: the example is not fed at all).
        config: `batch_size`, `batch_tokens` (the batches are `alone_plan(labels, stops, config)`).
        batches: run only these batches of that plan; the other examples stay NaN. Default: all.
    Returns:
        float32 `[n_tokens]`, flat over the examples as `TokenScores`: the log-probability at trained positions
        before each stop, NaN elsewhere.
    """
    stats = stats if stats is not None else ScoringStats()
    lengths = [len(ids) for ids in input_ids]
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    out = np.full(int(offsets[-1]), np.nan, np.float32)
    plan = [b for i, b in enumerate(alone_plan(labels, stops, config)) if batches is None or i in batches]
    if not plan:
        return out
    anchor = model.config.bos_token_id
    if anchor is None:
        anchor = model.config.eos_token_id
    anchor = int(anchor[0] if isinstance(anchor, (list, tuple)) else (anchor or 0))
    device = _device_of(model)
    decoder = model.get_decoder()
    starts = {i: _response_start(labels[i]) for batch in plan for i in batch}
    total = sum(stops[i] - starts[i] for batch in plan for i in batch)
    with _scoring_run(model, total, "xtf prompt gain", progress, stats) as bar:
        for batch in plan:
            spans = [(starts[i], int(stops[i])) for i in batch]
            ids, valid = _pad_right([np.concatenate([[anchor], np.asarray(input_ids[i][a:b])]) for i, (a, b)
                                     in zip(batch, spans, strict=True)], device)
            trained, _ = _pad_right([np.concatenate([[False], np.asarray(labels[i][a:b]) != -100]) for i, (a, b)
                                     in zip(batch, spans, strict=True)], device)
            trained = trained.bool() & valid
            log_probs = _log_probs_at(model, _decode(decoder, ids, valid, stats), ids, trained)
            _check_finite((log_probs,), trained, [first_example + i for i in batch])
            for row, (index, (a, b)) in enumerate(zip(batch, spans, strict=True)):
                values = torch.where(trained[row, 1 : 1 + b - a], log_probs[row, 1 : 1 + b - a], float("nan"))
                out[offsets[index] + a : offsets[index] + b] = values.cpu().numpy()
            bar.update(int(valid.sum()) - len(batch))  # the anchors are not the examples' tokens
    return out


def _check_finite(scores: Sequence[torch.Tensor], trained: torch.Tensor, examples: Sequence[int]) -> None:
    """Raise `XTFError` naming the first example (1-based, dataset order) with a NaN or inf score (`[B, L]`
    each) at a trained position: such a score would silently rank first or last in every selection, and
    would be cached."""
    scored = trained.clone()
    scored[:, 0] = False
    values = torch.stack(list(scores))
    bad = (~torch.isfinite(values) & scored).any(dim=0).any(dim=1)
    if not bad.any():
        return
    rows = bad.nonzero().flatten().tolist()
    row = min(rows, key=lambda r: examples[r])
    kind = "NaN" if (torch.isnan(values[:, row]) & scored[row]).any() else "inf"
    others = f" (and {len(rows) - 1} more in the same batch)" if len(rows) > 1 else ""
    raise XTFError(
        f"the model produced {kind} scores in example {examples[row] + 1}{others}: {NON_FINITE_HINT}"
    )
