"""`action: remove`: the selected tokens leave the training input, not only the loss, in every path that can
change the input (the core, `xtf score`'s parquet, `XTFSFTTrainer`); `XTFCallback` masks instead."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import gsm8k_rows
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from xtf_plugin.cli import main
from xtf_plugin.config import XTFConfigError, load_xtf_config
from xtf_plugin.output import read_output_dir

# the tiny random model selects many tokens under the paper's tests: plenty to remove
REMOVE = {"preset": "paper", "action": "remove"}


def test_xtf_score_writes_the_cleaned_examples_and_keeps_every_score(tiny_model_dir, gsm8k_jsonl, tmp_path, cache_dir):
    out = tmp_path / "removed"
    assert main(["score", "--model", str(tiny_model_dir), "--data", str(gsm8k_jsonl), "--out", str(out), "--quiet",
                 "--set", "preset=paper", "--set", "action=remove"]) == 0
    table = pq.read_table(out / "train.parquet").to_pydict()
    removed_any = False
    for ids, labels, mask, full_ids, full_labels, reasons in zip(
        table["input_ids"], table["labels"], table["attention_mask"], table["xtf_input_ids"], table["xtf_labels"],
        table["xtf_drop"], strict=True,
    ):
        keep = np.asarray(reasons) == 0
        removed_any |= not keep.all()
        assert ids == np.asarray(full_ids)[keep].tolist()
        assert labels == np.asarray(full_labels)[keep].tolist() and len(mask) == len(ids)
    assert removed_any
    # the report reads every token, the removed ones with their reasons
    scored = read_output_dir(out)
    assert len(scored.input_ids) == sum(len(row) for row in table["xtf_input_ids"])
    assert (scored.selection.reasons > 0).sum() == sum((np.asarray(r) > 0).sum() for r in table["xtf_drop"])
    assert main(["report", str(out), "--examples", "1"]) == 0


def test_the_parquet_is_written_a_row_group_at_a_time_with_the_same_rows(tiny_model_dir, gsm8k_jsonl, tmp_path,
                                                                         cache_dir, monkeypatch):
    import xtf_plugin.output as output

    written = {}
    for rows in (7, 10**6):
        monkeypatch.setattr(output, "ROWS_PER_GROUP", rows)
        out = tmp_path / f"groups-of-{rows}"
        assert main(["score", "--model", str(tiny_model_dir), "--data", str(gsm8k_jsonl), "--out", str(out), "--quiet",
                     "--set", "preset=paper", "--set", "action=remove"]) == 0
        parquet = pq.ParquetFile(out / "train.parquet")
        table = parquet.read()
        written[rows] = parquet.metadata.num_row_groups, {
            name: (np.diff(column.offsets.to_numpy()), column.values.to_numpy(zero_copy_only=False))
            for name, column in ((name, table.column(name).combine_chunks()) for name in table.column_names)}
    n = len(written[10**6][1]["input_ids"][0])
    assert n > 7 and written[7][0] == -(-n // 7) and written[10**6][0] == 1
    assert written[7][1].keys() == written[10**6][1].keys()
    for name, (lengths, values) in written[7][1].items():
        assert np.array_equal(lengths, written[10**6][1][name][0])
        assert np.array_equal(values, written[10**6][1][name][1], equal_nan=values.dtype.kind == "f")


def test_mask_and_remove_select_the_same_tokens(tiny_model_dir, gsm8k_jsonl, tmp_path, cache_dir):
    masked, removed = tmp_path / "masked", tmp_path / "removed"
    for out, action in ((masked, "mask"), (removed, "remove")):
        assert main(["score", "--model", str(tiny_model_dir), "--data", str(gsm8k_jsonl), "--out", str(out),
                     "--quiet", "--set", "preset=paper", "--set", f"action={action}"]) == 0
    a, b = pq.read_table(masked / "train.parquet").to_pydict(), pq.read_table(removed / "train.parquet").to_pydict()
    assert a["xtf_drop"] == b["xtf_drop"] and a["input_ids"] == b["xtf_input_ids"] and a["labels"] == b["xtf_labels"]
    assert "xtf_input_ids" not in a


def test_xtf_sft_trainer_trains_on_the_cleaned_examples(tiny_model_dir, tmp_path, cache_dir):
    from xtf_plugin.integrations.trl import XTFSFTConfig, XTFSFTTrainer

    rows = gsm8k_rows(6)
    dataset = Dataset.from_list([{"prompt": r["question"] + "\n", "completion": r["answer"]} for r in rows])
    args = XTFSFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                        max_length=256, bf16=False, report_to="none", save_strategy="no",
                        gradient_checkpointing=False, xtf=REMOVE)
    trainer = XTFSFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), args=args,
                            train_dataset=dataset)
    result = trainer.xtf_result
    scored = result.scored
    original = scored.per_example(scored.input_ids)
    reasons = scored.per_example(scored.selection.reasons)
    assert sum(int((r > 0).sum()) for r in reasons) > 0
    for row, ids, why in zip(trainer.train_dataset, original, reasons, strict=True):
        assert row["input_ids"] == ids[why == 0].tolist()
        assert len(row["labels"]) == len(row["input_ids"])
        for name in ("completion_mask", "attention_mask", "assistant_masks"):
            if name in row:
                assert len(row[name]) == len(row["input_ids"])
    assert np.isfinite(trainer.train().training_loss)


def test_callback_masks_what_remove_would_take_out():
    """A stock trainer's batches are built before the callback sees them: it masks, and says so."""
    from xtf_plugin.integrations.trl import XTFCallback
    from xtf_plugin.logs import status_logger

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    status_logger().addHandler(handler)
    try:
        callback = XTFCallback(REMOVE)
        assert XTFCallback({"preset": "spans"}).xtf_config.action == "mask"  # the spans preset removes
    finally:
        status_logger().removeHandler(handler)
    assert callback.xtf_config.action == "mask"
    assert callback.xtf_config.mode == load_xtf_config(REMOVE).mode
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]
    assert "XTFCallback masks the selected tokens" in records[0].getMessage()


def test_soft_weights_cannot_remove():
    with pytest.raises(XTFConfigError, match="set action: mask"):
        load_xtf_config({"mode": "weighted", "soft": True, "action": "remove"})
