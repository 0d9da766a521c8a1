"""The `xtf score` output folder: `train.parquet`, `summary.json`, `xtf_config.yaml`.

`train.parquet` has one row per input example, in input order: `input_ids`, `attention_mask`, `labels` (XTF's
masked tokens set to -100), `xtf_ri`, `xtf_kn`, `xtf_tr` (float lists aligned with `input_ids`, NaN where a
token has no score) and `xtf_drop` (reason bits: 1 = RI, 2 = KN, 4 = TR; 8 = masked with an off-task span, with TR). `trl sft` and axolotl read it as a
pre-tokenised dataset as it is.

The folder is written next to its destination under a temporary name and renamed into place, so an
interrupted run never leaves half an output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from xtf_plugin.errors import XTFError

TRAIN_FILE = "train.parquet"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "xtf_config.yaml"


def _list_column(values: np.ndarray, offsets: np.ndarray):  # type: ignore[no-untyped-def]
    import pyarrow as pa

    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def scored_table(scored: Any):  # type: ignore[no-untyped-def]
    """A pyarrow Table of a `ScoredDataset` (columns as described in the module docstring)."""
    import pyarrow as pa

    offsets = scored.offsets
    return pa.table(
        {
            "input_ids": _list_column(scored.input_ids.astype(np.int64), offsets),
            "attention_mask": _list_column(np.ones(len(scored.input_ids), np.int8), offsets),
            "labels": _list_column(scored.filtered_labels, offsets),
            "xtf_ri": _list_column(scored.scores.ri, offsets),
            "xtf_kn": _list_column(scored.scores.kn, offsets),
            "xtf_tr": _list_column(scored.scores.tr, offsets),
            "xtf_drop": _list_column(scored.selection.drop.astype(np.int8), offsets),
        }
    )


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing, non-empty output folder unless `overwrite`."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise XTFError(f"{out_dir}: already exists; pass --overwrite to replace it")


def write_output_dir(out_dir: Path, scored: Any, summary: dict[str, Any], overwrite: bool = False) -> Path:
    """Write the three files atomically (temporary sibling folder, then rename)."""
    import pyarrow.parquet as pq

    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        pq.write_table(scored_table(scored), tmp / TRAIN_FILE)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=float) + "\n")
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump({"xtf": scored.config.model_dump(mode="json")}, sort_keys=False))
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "previous")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
