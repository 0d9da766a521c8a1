"""`XTFCallback`: XTF on the stock `SFTTrainer` (or any HF `Trainer` over tokenised data), no subclass.

    trainer = SFTTrainer(model=..., train_dataset=..., callbacks=[XTFCallback({"drop_ratio": 0.1})])

At `on_train_begin` the callback reads the prepared training set from the train dataloader (packed rows are
split back into their sequences with TRL's `seq_lengths`), scores it with the model under
`disable_adapter()`, and wraps the dataloader's collate function so that every row gets its masked labels
*before* it is collated. The HF trainer then counts `num_items_in_batch` from the masked labels, so the loss is
normalised over kept tokens, with gradient accumulation too.

Logging: `xtf/kept_fraction` and `xtf/dropped_<attribute>` are added to every training log in `on_log`.
Callbacks run in list order and the trainer puts reporting integrations (W&B, TensorBoard) before user
callbacks, so those reporters do not receive them; `XTFSFTTrainer` logs them everywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from xtf_plugin.config import XTFConfig, to_xtf_config
from xtf_plugin.errors import XTFError
from xtf_plugin.integrations.common import (
    MaskedExamples,
    XTFLogCallback,
    mask_examples,
    split_packed,
    tokenizer_of,
    write_training_report,
)
from xtf_plugin.logs import status_logger


def _row_key(input_ids: Any) -> bytes:
    return hashlib.blake2b(np.asarray(input_ids, dtype=np.int64).tobytes(), digest_size=16).digest()


class MaskedLabelsCollator:
    """Wraps a collate function: replaces each feature's `labels` with XTF's masked labels, found by the
    content of its `input_ids`, then collates as before."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], Any], masked: dict[bytes, list[int]]) -> None:
        self.collate = collate
        self.masked = masked

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        features = [{**feature, "labels": self.masked.get(_row_key(feature["input_ids"]), feature.get("labels"))} for feature in features]
        return self.collate(features)


class XTFCallback(XTFLogCallback):
    """Masks XTF's noise tokens in the labels of a stock trainer's training batches.

    Args:
        xtf_config: XTF settings: an `XTFConfig`, a mapping of `xtf:` keys, a JSON string or a YAML path (see
            `config.to_xtf_config`); None for the defaults. `action: remove` (the spans preset's) becomes
            `mask`, with a warning.
    """

    def __init__(self, xtf_config: XTFConfig | dict[str, Any] | str | None = None) -> None:
        super().__init__()
        self.xtf_config = to_xtf_config(xtf_config)
        if self.xtf_config.action == "remove":
            # the stock trainer's batches are built before the callback sees them: only labels can change
            status_logger().warning(
                "XTFCallback masks the selected tokens (action: mask): taking them out of the input (action: "
                "remove) needs XTFSFTTrainer or xtf sft"
            )
            self.xtf_config = self.xtf_config.model_copy(update={"action": "mask"})
        self.xtf_result: MaskedExamples | None = None

    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None, **kwargs):  # type: ignore[no-untyped-def]
        if train_dataloader is None or model is None or processing_class is None:
            raise XTFError("XTFCallback needs the trainer's model, processing_class and train dataloader")
        dataset = train_dataloader.dataset
        columns = getattr(dataset, "column_names", None) or []
        if "input_ids" not in columns:
            raise XTFError("XTFCallback needs a tokenised training set (an input_ids column)")
        rows_ids = dataset["input_ids"]
        rows_labels = dataset["labels"] if "labels" in columns else [list(r) for r in rows_ids]
        lengths = dataset["seq_lengths"] if "seq_lengths" in columns else [[len(r)] for r in rows_ids]
        ids, labels = [], []
        for row_ids, row_labels, seq_lengths in zip(rows_ids, rows_labels, lengths, strict=True):
            ids.extend(split_packed(row_ids, seq_lengths))
            labels.extend(split_packed(row_labels, seq_lengths))
        self.xtf_result = mask_examples(
            model, tokenizer_of(processing_class), ids, labels, self.xtf_config, progress=state.is_world_process_zero
        )
        write_training_report(self.xtf_result.scored, args.output_dir)
        self.metrics = self.xtf_result.log_metrics
        masked_iter = iter(self.xtf_result.labels)
        masked: dict[bytes, list[int]] = {}
        for row_ids, seq_lengths in zip(rows_ids, lengths, strict=True):
            row = np.concatenate([next(masked_iter) for _ in seq_lengths]) if len(seq_lengths) else np.zeros(0, np.int64)
            masked[_row_key(row_ids)] = row.tolist()
        # accelerate's DataLoaderShard iterates its `base_dataloader`, whose collate function is the one used
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
        loader.collate_fn = MaskedLabelsCollator(loader.collate_fn, masked)
        return control
