"""What every toolkit adapter needs: score tokenised examples with the model about to be trained, get masked
labels back, and the numbers to log. No TRL or axolotl imports here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from xtf_plugin.config import ATTRIBUTES, XTFConfig
from xtf_plugin.data import TokenizedData
from xtf_plugin.distributed import is_main_process, rank
from xtf_plugin.logs import status_logger
from xtf_plugin.output import list_array
from xtf_plugin.pipeline import ScoredDataset, score_dataset
from xtf_plugin.report.summary import summarize, summary_line
from xtf_plugin.token_scores import flatten


@contextlib.contextmanager
def base_model_for_scoring(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The frozen base model inside `model`: a PEFT model with its adapters disabled (so QLoRA scores with the
    4-bit weights it trains on, without a second copy in memory), any other model as it is."""
    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def tokenizer_of(processing_class: Any) -> Any:
    """The text tokenizer of a tokenizer or a multimodal processor."""
    return getattr(processing_class, "tokenizer", processing_class)


@dataclass
class MaskedExamples:
    """Result of `mask_examples`.

    Attributes:
        labels: one int64 array `[L'_i]` per example, XTF's dropped tokens set to -100 (`action: mask`, then
            `L'_i = L_i`) or taken out (`action: remove`).
        scored: the full `ScoredDataset` (scores, reasons, selection).
        summary: `summarize(scored)`.
        kept: one bool array `[L_i]` per example: the example's tokens that stay in the input (all of them
            with `action: mask`).
    """

    labels: list[np.ndarray]
    scored: ScoredDataset
    summary: dict[str, Any]
    kept: list[np.ndarray]

    @property
    def removes_tokens(self) -> bool:
        return self.scored.config.action == "remove"

    @property
    def log_metrics(self) -> dict[str, float]:
        """`xtf/kept_fraction` and `xtf/dropped_<attribute>` fractions, for the trainer's logs."""
        return xtf_log_metrics(self.summary)


class XTFLogCallback(TrainerCallback):
    """Adds `xtf/kept_fraction` and `xtf/dropped_<attribute>` to every training log (the ones with `loss`).

    Callbacks share one `logs` dict and run in list order, so reporting integrations (W&B, TensorBoard, MLflow,
    the console printer) see the entries only when this callback runs before them (the axolotl plugin moves it
    to the front of the list).

    Args:
        metrics: the entries to add (the same for the whole run: the mask is fixed before training).
    """

    def __init__(self, metrics: dict[str, float] | None = None) -> None:
        self.metrics = dict(metrics or {})

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs is not None and self.metrics and "loss" in logs:
            logs.update(self.metrics)
            # the trainer appended a copy of `logs` to the history before calling the callbacks
            if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
                state.log_history[-1].update(self.metrics)
        return control


def xtf_log_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Trainer log entries from a summary."""
    metrics = {"xtf/kept_fraction": float(summary["kept_fraction"])}
    for name in ATTRIBUTES:
        metrics[f"xtf/dropped_{name}"] = float(summary["dropped_fraction_by_attribute"][name])
    return metrics


def mask_examples(
    model: torch.nn.Module,
    tokenizer: Any,
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]] | None,
    config: XTFConfig,
    progress: bool = True,
) -> MaskedExamples:
    """Score tokenised examples with the base model inside `model` and mask XTF's noise tokens.

    Args:
        model: the model about to be trained (plain, PEFT/LoRA or 4-bit QLoRA).
        tokenizer: its tokenizer.
        input_ids: one token-id sequence per example.
        labels: matching labels (-100 on untrained tokens); None means every token is trained.
        config: XTF settings.
        progress: show the scoring progress bar.
    """
    ids = [np.asarray(x, dtype=np.int64) for x in input_ids]
    labs = [np.asarray(x, dtype=np.int64) for x in labels] if labels is not None else [x.copy() for x in ids]
    data = TokenizedData(ids, labs)
    with base_model_for_scoring(model) as scorer:
        was_training = scorer.training
        try:
            scored = score_dataset(scorer, tokenizer, data, config, progress=progress)
        finally:
            scorer.train(was_training)
    summary = summarize(scored)
    log = status_logger()
    log.info(summary_line(summary))
    # each rank's own share of the forward passes (shown with XTF_VERBOSITY=debug)
    log.debug("XTF rank %d: %d forward passes, %d cached shards", rank(), summary["forward_passes"],
              summary["cached_shards"])
    _, labels_out, kept = scored.training_examples()
    return MaskedExamples(labels_out, scored, summary, kept)


def with_column(dataset: Any, name: str, rows: Sequence[np.ndarray]) -> Any:
    """A `datasets.Dataset` with column `name` set to `rows` (one array per row; replaced if it exists, with
    its feature type kept), built as one Arrow array instead of Python lists."""
    from datasets import Sequence as SequenceFeature
    from datasets import Value

    flat, offsets = flatten(rows, dtype=np.asarray(rows[0]).dtype.type if len(rows) else np.int64)
    if name in dataset.column_names:
        feature = dataset.features[name]
        column = list_array(flat, offsets, dataset.features.arrow_schema.field(name).type)
        return dataset.remove_columns(name).add_column(name, column, feature=feature)
    column = list_array(flat, offsets)
    value = "float32" if flat.dtype.kind == "f" else "int64"
    return dataset.add_column(name, column, feature=SequenceFeature(Value(value)))


def apply_to_dataset(dataset: Any, result: MaskedExamples) -> Any:
    """The `datasets.Dataset` the masks were computed for, with XTF's labels; with `action: remove` also without
    the removed tokens in every column aligned with `input_ids` (`attention_mask`, `completion_mask`, ...), and
    `position_ids` / `length` recomputed for the shorter rows."""
    if not result.removes_tokens:
        return with_column(dataset, "labels", result.labels)
    lengths = [len(k) for k in result.kept]
    for name in dataset.column_names:
        if name in ("input_ids", "labels", "position_ids", "length"):
            continue
        feature = dataset.features[name]
        if not hasattr(feature, "feature") and not isinstance(feature, list):  # not a list column
            continue
        rows = dataset.with_format("numpy", columns=[name])[name]
        if all(len(row) == n for row, n in zip(rows, lengths, strict=True)):
            dataset = with_column(dataset, name, [np.asarray(row)[k] for row, k in zip(rows, result.kept, strict=True)])
    ids = dataset.with_format("numpy", columns=["input_ids"])["input_ids"]
    dataset = with_column(dataset, "input_ids", [np.asarray(row)[k] for row, k in zip(ids, result.kept, strict=True)])
    dataset = with_column(dataset, "labels", result.labels)
    if "position_ids" in dataset.column_names:
        dataset = with_column(dataset, "position_ids", [np.arange(len(row), dtype=np.int64) for row in result.labels])
    if "length" in dataset.column_names:
        dataset = dataset.remove_columns("length").add_column("length", [len(row) for row in result.labels])
    return dataset


def soft_weights(scored: ScoredDataset) -> list[np.ndarray]:
    """Per-token loss weights of weighted soft mode, one float32 array `[L_i]` per example: the combined score
    on response tokens, 1 on protected ones (EOS, `protect` spans), 0 where the label is -100."""
    weights = np.nan_to_num(scored.selection.combined, nan=0.0).astype(np.float32)
    weights[scored.protected] = 1.0
    weights[~scored.response] = 0.0
    return scored.per_example(weights)


def weighted_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, num_items_in_batch: Any = None
) -> torch.Tensor:
    """Sum of per-token cross-entropy times weight, over the number of trained tokens.

    Args:
        logits: `[B, L, V]`.
        labels: int64 `[B, L]`, -100 where not trained.
        weights: float `[B, L]`, aligned with `labels`.
        num_items_in_batch: trained tokens over all gradient-accumulation micro-batches (as the HF trainer
            counts them), so the scale matches the plain loss; default: this batch's count.
    Returns:
        A scalar loss.
    """
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    total = (nll * weights[:, 1:].to(nll.dtype)).sum()
    count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    return total / torch.as_tensor(count, device=total.device, dtype=total.dtype).clamp(min=1)


REPORT_FILE = "xtf_report.html"


def write_training_report(result: MaskedExamples, output_dir: str | None) -> str | None:
    """Write the HTML report of the training set into the run's output folder (main process only); returns
    its path."""
    if not output_dir or not is_main_process():
        return None
    from pathlib import Path

    from xtf_plugin.report.html import write_html

    scored = result.scored
    scored.summary, scored.source = result.summary, Path(output_dir)
    scored.texts.prepare(np.unique(scored.input_ids).tolist())
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    path = write_html(scored, Path(output_dir) / REPORT_FILE)
    status_logger().info("XTF: report of the training set written to %s", path)
    return str(path)


def split_packed(values: Sequence[int], seq_lengths: Sequence[int]) -> list[list[int]]:
    """Cut a packed row into its sequences (TRL's `seq_lengths` column)."""
    bounds = np.cumsum([0, *seq_lengths])
    return [list(values[int(a) : int(b)]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
