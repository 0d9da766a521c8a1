"""The batched scoring engine: one no-grad forward pass per batch gives RI and KN for every response token.

For each batch of right-padded examples the decoder runs once (the LM head is not applied to every position);
the attention capture adds RI from the chosen layers, and the LM head is applied only at the positions that
predict a response token (KN). `tr_method: prompt_gain` adds a second pass over the responses alone. Vector TR
needs no pass over the examples at all (see `relevance.py`).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from xtf_plugin.config import XTFConfig
from xtf_plugin.errors import NON_FINITE_HINT, XTFError
from xtf_plugin.scoring.attention import capture_attention_received, resolve_layers
from xtf_plugin.scoring.novelty import novelty_from_log_probs, token_log_probs
from xtf_plugin.token_scores import TokenScores

SCORER_VERSION = 6
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
    """RI and KN (and prompt-gain TR) of every response token.

    Args:
        model: a causal LM with transformers' attention interface (fp32/bf16/4-bit, any device).
        input_ids: one int array `[L_i]` per example.
        labels: one int array `[L_i]` per example, -100 on tokens that are not trained.
        config: scorer settings (`batch_size`, `batch_tokens`, `ri_layers`, `ri_exclude_sink`, `tr_method`).
        progress: show a tqdm bar (tokens/s) when scoring takes more than two seconds.
        stats: accumulates time, tokens and forward passes when given.
        batches: run only these batches of `batch_plan(lengths, batch_size, batch_tokens)` (one process's share of
            a split run); the other examples' scores stay NaN. Default: all.
        first_example: index of `input_ids[0]` in the whole dataset, so an error names the user's example.
    Returns:
        `TokenScores` aligned with `input_ids`; NaN where a token is not scored. `tr` holds the prompt gain
        when `tr_method == "prompt_gain"`, else NaN (vector TR is filled in by the caller).
    """
    if len(input_ids) != len(labels):
        raise ValueError("input_ids and labels differ in length")
    stats = stats if stats is not None else ScoringStats()
    lengths = [len(ids) for ids in input_ids]
    scores = TokenScores.empty(lengths)
    if not input_ids:
        return scores
    was_training = model.training
    model.eval()
    device = _device_of(model)
    decoder = model.get_decoder()
    layers = resolve_layers(config.ri_layers, model.config.num_hidden_layers)
    plan = [b for i, b in enumerate(batch_plan(lengths, config.batch_size, config.batch_tokens))
            if batches is None or i in batches]
    total = sum(lengths[i] for batch in plan for i in batch)
    started = time.perf_counter()
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="xtf scoring", delay=2, disable=not progress)
    try:
        with capture_attention_received(model, layers, config.ri_exclude_sink) as capture:
            for batch in plan:
                ids, valid = _pad_right([np.asarray(input_ids[i]) for i in batch], device)
                trained, _ = _pad_right([np.asarray(labels[i]) != -100 for i in batch], device)
                trained = trained.bool() & valid
                capture.begin(valid)
                # without padding the attention needs no mask: the causal kernel alone, no [B, 1, L, L] mask
                mask = None if bool(valid.all()) else valid.long()
                hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                stats.forward_passes += 1
                log_probs = _log_probs_at(model, hidden, ids, trained)
                ri = capture.result()
                capture.end()  # the prompt-gain pass has other shapes and must not add to RI
                gain = _prompt_gain(model, decoder, ids, valid, trained, log_probs, stats) if config.tr_method == "prompt_gain" else None
                _check_finite(log_probs, ri, gain, trained, [first_example + i for i in batch])
                for row, index in enumerate(batch):
                    part = slice(int(scores.offsets[index]), int(scores.offsets[index + 1]))
                    n = lengths[index]
                    mask = trained[row, :n].cpu().numpy()
                    mask[0] = False
                    scores.kn[part] = np.where(mask, novelty_from_log_probs(log_probs[row, :n]).cpu().numpy(), np.nan)
                    scores.ri[part] = np.where(mask, ri[row, :n].cpu().numpy(), np.nan)
                    if gain is not None:
                        scores.tr[part] = np.where(mask, gain[row, :n].cpu().numpy(), np.nan)
                bar.update(int(valid.sum()))
    finally:
        bar.close()
        model.train(was_training)
    stats.seconds += time.perf_counter() - started
    stats.tokens += total
    return scores


def _prompt_gain(
    model: torch.nn.Module,
    decoder: torch.nn.Module,
    ids: torch.Tensor,
    valid: torch.Tensor,
    trained: torch.Tensor,
    log_probs: torch.Tensor,
    stats: ScoringStats,
) -> torch.Tensor:
    """float32 `[B, L]`: log p(token | prompt, prefix) - log p(token | response prefix alone).

    The second pass feeds each example from its first trained token on, after one anchor token (BOS, or EOS
    when the tokenizer has none), so the first response token is predicted from the anchor alone.
    """
    anchor = model.config.bos_token_id
    if anchor is None:
        anchor = model.config.eos_token_id
    anchor = int(anchor[0] if isinstance(anchor, (list, tuple)) else (anchor or 0))
    gain = torch.full(ids.shape, float("nan"), dtype=torch.float32, device=ids.device)
    sequences, starts = [], []
    for row in range(ids.shape[0]):
        trained_pos = trained[row].nonzero().flatten()
        first = int(trained_pos[0]) if trained_pos.numel() else int(valid[row].sum())
        n = int(valid[row].sum())
        starts.append(first)
        sequences.append(np.concatenate([[anchor], ids[row, first:n].cpu().numpy()]))
    alone_ids, alone_valid = _pad_right(sequences, ids.device)
    alone_trained = torch.zeros_like(alone_valid)
    for row, first in enumerate(starts):
        n = len(sequences[row]) - 1
        alone_trained[row, 1 : n + 1] = trained[row, first : first + n]
    hidden = decoder(input_ids=alone_ids, attention_mask=alone_valid.long(), use_cache=False).last_hidden_state
    stats.forward_passes += 1
    alone = _log_probs_at(model, hidden, alone_ids, alone_trained)
    for row, first in enumerate(starts):
        n = len(sequences[row]) - 1
        gain[row, first : first + n] = log_probs[row, first : first + n] - alone[row, 1 : n + 1]
    return gain


def _check_finite(
    log_probs: torch.Tensor, ri: torch.Tensor, gain: torch.Tensor | None, trained: torch.Tensor, examples: Sequence[int]
) -> None:
    """Raise `XTFError` naming the first example (1-based, dataset order) with a NaN or inf score: such a
    score would silently rank first or last in every selection, and would be cached."""
    scored = trained.clone()
    scored[:, 0] = False
    values = torch.stack([log_probs, ri, gain if gain is not None else torch.zeros_like(log_probs)])
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
