"""`XTFSFTTrainer`: TRL's `SFTTrainer` that trains only on the tokens XTF keeps.

The mask travels in `labels` (-100), so everything TRL does with labels keeps working unchanged: packing and
padding-free batches, truncation, the fused / chunked loss, DFT, PEFT and QLoRA, and `num_items_in_batch`,
which the HF trainer counts from the labels of all gradient-accumulation micro-batches, so the loss is
normalised over kept tokens only.

Order of work inside `__init__`:
1. TRL tokenises the training set as usual, but packing is postponed (scores belong to whole examples);
2. the model TRL built (plain, LoRA or 4-bit QLoRA) scores it under `disable_adapter()`, through the score
   cache; on several processes the main process scores first and the others read the cache;
3. dropped response tokens get label -100, and TRL's own packing runs on the masked dataset.
"""

from __future__ import annotations

from typing import Any

from accelerate import PartialState
from trl import SFTTrainer

from xtf_plugin.config import XTFConfig, load_xtf_config
from xtf_plugin.integrations.common import MaskedExamples, mask_examples, tokenizer_of


def coerce_xtf_config(value: XTFConfig | dict[str, Any] | None) -> XTFConfig:
    """`XTFConfig` from a config, a mapping (e.g. the YAML `xtf:` block) or None (defaults)."""
    if isinstance(value, XTFConfig):
        return value
    return load_xtf_config(value or {})


class XTFSFTTrainer(SFTTrainer):
    """`SFTTrainer` with XTF token filtering.

    Args:
        *args: as for `SFTTrainer`.
        xtf_config: XTF settings (`XTFConfig`, a mapping, or None for the defaults).
        **kwargs: as for `SFTTrainer`.

    After construction, `xtf_result` holds the scores, reasons and summary of the training set, and every
    training log carries `xtf/kept_fraction` and `xtf/dropped_<attribute>`.
    """

    def __init__(self, *args: Any, xtf_config: XTFConfig | dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.xtf_config = coerce_xtf_config(xtf_config)
        self._xtf_postponed_packing = False
        self.xtf_result: MaskedExamples | None = None
        super().__init__(*args, **kwargs)
        if self.train_dataset is not None:
            self.train_dataset = self._xtf_mask_train_dataset(self.train_dataset)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):  # type: ignore[no-untyped-def]
        if dataset_name == "train" and packing:
            self._xtf_postponed_packing = True
            packing = False
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _xtf_mask_train_dataset(self, dataset):  # type: ignore[no-untyped-def]
        columns = dataset.column_names
        labels = dataset["labels"] if "labels" in columns else None
        with PartialState().main_process_first():
            self.xtf_result = mask_examples(
                self.model,
                tokenizer_of(self.processing_class),
                dataset["input_ids"],
                labels,
                self.xtf_config,
                progress=self.is_world_process_zero(),
            )
        masked = [row.tolist() for row in self.xtf_result.labels]
        dataset = dataset.remove_columns("labels") if labels is not None else dataset
        dataset = dataset.add_column("labels", masked)
        if self._xtf_postponed_packing:
            dataset = SFTTrainer._prepare_dataset(
                self, dataset, self.processing_class, self.args, True, None, "train"
            )
        return dataset

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the XTF fractions to every training log (so they reach W&B, TensorBoard, the console)."""
        if self.xtf_result is not None and "loss" in logs:
            logs.update(self.xtf_result.log_metrics)
        super().log(logs, *args, **kwargs)
