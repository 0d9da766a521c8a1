"""`XTFSFTTrainer`: TRL's `SFTTrainer` that trains only on the tokens XTF keeps.

The mask travels in `labels` (-100), so everything TRL does with labels keeps working unchanged: packing and
padding-free batches, truncation, the fused / chunked loss, DFT, PEFT and QLoRA, and `num_items_in_batch`,
which the HF trainer counts from the labels of all gradient-accumulation micro-batches, so the loss is
normalised over kept tokens only.

Order of work inside `__init__`:
1. TRL tokenises the training set as usual, but packing is postponed (scores belong to whole examples);
2. the model TRL built (plain, LoRA or 4-bit QLoRA) scores it under `disable_adapter()`, through the score
   cache; on several processes the main process scores first and the others read the cache;
3. dropped response tokens get label -100; with `action: remove` (the spans preset's) they also leave
   `input_ids` and the columns aligned with it; then TRL's own packing runs on the result.

Soft mode (`mode: weighted`, `soft: true`, beyond the paper): nothing is dropped; each token's loss is weighted
by its combined score, carried in an `xtf_weight` column that a collator wrapper pads. TRL's packing keeps only
`input_ids` and `labels`, and padding-free batches refuse custom collators, so soft mode refuses both; its loss
is computed from the logits (TRL's own loss path and its entropy / token-accuracy metrics are bypassed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from datasets import IterableDataset, IterableDatasetDict
from transformers import TrainingArguments
from trl import SFTTrainer

from xtf_plugin.config import XTFConfig
from xtf_plugin.errors import XTFError
from xtf_plugin.integrations.common import (
    MaskedExamples,
    apply_to_dataset,
    mask_examples,
    soft_weights,
    tokenizer_of,
    weighted_token_loss,
    with_column,
    write_training_report,
)
from xtf_plugin.integrations.trl.config import XTFSFTConfig

WEIGHT_COLUMN = "xtf_weight"


class SoftWeightCollator:
    """Wraps a collator: takes `xtf_weight` out of the features, collates the rest, then pads the weights with
    0 to the labels' `[B, L]` (right padding, as TRL's collator pads)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        weights = [torch.as_tensor(f[WEIGHT_COLUMN], dtype=torch.float32) for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != WEIGHT_COLUMN} for f in features])
        padded = torch.zeros(batch["labels"].shape, dtype=torch.float32)
        for row, weight in enumerate(weights):
            padded[row, : len(weight)] = weight[: padded.shape[1]]
        batch[WEIGHT_COLUMN] = padded
        return batch


def as_xtf_sft_config(args: TrainingArguments | None, model: Any) -> XTFSFTConfig:
    """`args` as an `XTFSFTConfig` (default XTF settings), the way `SFTTrainer` turns its `args` into an
    `SFTConfig`."""
    if isinstance(args, XTFSFTConfig):
        return args
    if args is None:
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")
        return XTFSFTConfig(f"{str(name).rstrip('/').split('/')[-1]}-SFT")
    # the fields as they are: `to_dict` would hide every `*_token` value
    return XTFSFTConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init})


class XTFSFTTrainer(SFTTrainer):
    """`SFTTrainer` with XTF token filtering, configured by `XTFSFTConfig.xtf`.

    Args:
        model: as for `SFTTrainer`.
        args: an `XTFSFTConfig`; a plain `SFTConfig` / `TrainingArguments` is converted with the default XTF
            settings, None gives `XTFSFTConfig` defaults (as `SFTTrainer` does for its config).
        **kwargs: as for `SFTTrainer`.

    After construction, `xtf_result` holds the scores, reasons and summary of the training set, and every
    training log carries `xtf/kept_fraction` and `xtf/dropped_<attribute>` (soft mode: `xtf/mean_weight`).
    """

    def __init__(self, model: Any, args: TrainingArguments | None = None, **kwargs: Any) -> None:
        args = as_xtf_sft_config(args, model)
        self.xtf_config: XTFConfig = args.xtf  # type: ignore[assignment]
        self._xtf_postponed_packing = False
        self.xtf_result: MaskedExamples | None = None
        self._xtf_log_metrics: dict[str, float] = {}
        train_dataset = kwargs.get("train_dataset")
        if isinstance(train_dataset, IterableDataset | IterableDatasetDict):
            raise XTFError(
                "xtf: a streaming (iterable) training set cannot be filtered: XTF scores every example before "
                "training starts; load the dataset without streaming (dataset_streaming: false)"
            )
        super().__init__(model, args, **kwargs)
        if self.xtf_config.soft and (self.args.packing or self.args.padding_free):
            raise XTFError(
                "xtf.soft: per-token weights cannot go through packing or padding-free batches; "
                "set packing: false and padding_free: false, or soft: false"
            )
        if self.train_dataset is not None:
            self.train_dataset = self._xtf_mask_train_dataset(self.train_dataset)
        if self.xtf_config.soft:
            self.data_collator = SoftWeightCollator(self.data_collator)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):  # type: ignore[no-untyped-def]
        if dataset_name == "train" and packing:
            self._xtf_postponed_packing = True
            packing = False
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _xtf_mask_train_dataset(self, dataset):  # type: ignore[no-untyped-def]
        columns = dataset.column_names
        labels = dataset["labels"] if "labels" in columns else None
        # every rank at once: the ranks split the forward passes and gather the scores (see score_dataset)
        self.xtf_result = mask_examples(
            self.model,
            tokenizer_of(self.processing_class),
            dataset["input_ids"],
            labels,
            self.xtf_config,
            progress=self.is_world_process_zero(),
        )
        write_training_report(self.xtf_result.scored, self.args.output_dir)
        self._xtf_log_metrics = self.xtf_result.log_metrics
        if self.xtf_config.soft:
            scored = self.xtf_result.scored
            weights = soft_weights(scored)
            # nothing is dropped in soft mode: log the mean loss weight of the trained tokens instead
            self._xtf_log_metrics = {"xtf/mean_weight": float(np.concatenate(weights)[scored.response].mean())}
            if labels is None:
                dataset = with_column(dataset, "labels", scored.per_example(scored.labels))
            return with_column(dataset, WEIGHT_COLUMN, weights)
        dataset = apply_to_dataset(dataset, self.xtf_result)
        if self._xtf_postponed_packing:
            dataset = SFTTrainer._prepare_dataset(
                self, dataset, self.processing_class, self.args, True, None, "train"
            )
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.xtf_config.soft and WEIGHT_COLUMN not in self._signature_columns:
            self._signature_columns.append(WEIGHT_COLUMN)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        """Soft mode: per-token weighted cross-entropy over trained tokens; otherwise TRL's own loss."""
        if WEIGHT_COLUMN not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        weights = inputs.pop(WEIGHT_COLUMN)
        labels = inputs.pop("labels")
        outputs = model(**inputs, use_cache=False)
        loss = weighted_token_loss(outputs.logits, labels, weights, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the XTF fractions to every training log (so they reach W&B, TensorBoard, the console)."""
        if "loss" in logs:
            logs.update(self._xtf_log_metrics)
        super().log(logs, *args, **kwargs)
