"""The `xtf score` output folder: `train.parquet`, `summary.json`, `xtf_config.yaml`.

`train.parquet` has one row per input example, in input order: `input_ids`, `attention_mask`, `labels` (XTF's
masked tokens set to -100), `xtf_ri`, `xtf_kn`, `xtf_tr` (float lists aligned with `input_ids`, NaN where a
token has no score) and `xtf_drop` (reason bits: 1 = RI, 2 = KN, 4 = TR; 8 = masked with its span, with TR an
off-task span, with KN a repeat). `trl sft` and axolotl read it as a pre-tokenised dataset as it is. With `action: remove` the three training columns lack the removed tokens, and
`xtf_input_ids` / `xtf_labels` hold every token, aligned with the score columns.

The folder is written next to its destination under a temporary name and renamed into place, so an
interrupted run never leaves half an output. `ScoredFolder` reads it back a part at a time for `xtf report`, and
`read_output_dir` whole, into flat arrays (example `i` owns positions `offsets[i]:offsets[i + 1]`, as in
`TokenScores`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from xtf_plugin.errors import XTFError

TRAIN_FILE = "train.parquet"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "xtf_config.yaml"


def list_array(values: np.ndarray, offsets: np.ndarray, arrow_type: Any = None):  # type: ignore[no-untyped-def]
    """An Arrow list column from flat values `[n_tokens]` and offsets `[n_rows + 1]` (see `TokenScores`),
    without Python lists; `arrow_type` (e.g. the column type it replaces) sets the list and value types."""
    import pyarrow as pa

    if arrow_type is None:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    flat = pa.array(values, type=arrow_type.value_type)
    if pa.types.is_large_list(arrow_type):
        return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), flat)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat)


ROWS_PER_GROUP = 4096
"""Examples per parquet row group: the writer holds one group's columns at a time, not the whole dataset's."""


def scored_tables(scored: Any, rows_per_group: int | None = None):  # type: ignore[no-untyped-def]
    """pyarrow Tables of consecutive examples of a `ScoredDataset`, `rows_per_group` (default `ROWS_PER_GROUP`)
    rows each (columns as described in the module docstring; one empty table for an empty dataset)."""
    import pyarrow as pa

    from xtf_plugin.selection import masked_labels

    rows_per_group = rows_per_group or ROWS_PER_GROUP
    offsets = scored.offsets
    remove = scored.config.action == "remove"
    for first in range(0, max(scored.n_examples, 1), rows_per_group):
        last = min(scored.n_examples, first + rows_per_group)
        start, stop = int(offsets[first]), int(offsets[last])
        local = offsets[first : last + 1] - start
        reasons = scored.selection.reasons[start:stop]
        ids, labels = scored.input_ids[start:stop], masked_labels(scored.labels[start:stop], reasons)
        train_ids, train_labels, train_offsets = ids, labels, local
        if remove:  # the selected tokens leave the input (`ScoredDataset.kept_in_input`)
            kept = reasons == 0
            train_ids, train_labels = ids[kept], labels[kept]
            train_offsets = np.concatenate([[0], np.cumsum(kept)])[local]
        columns = {
            "input_ids": list_array(train_ids, train_offsets),
            "attention_mask": list_array(np.ones(len(train_ids), np.int8), train_offsets),
            "labels": list_array(train_labels, train_offsets),
        }
        if remove:
            # the training columns lack the removed tokens; the scores keep every token, with the example they belong to
            columns["xtf_input_ids"] = list_array(ids.astype(np.int64), local)
            columns["xtf_labels"] = list_array(labels, local)
        columns.update({
            "xtf_ri": list_array(scored.scores.ri[start:stop], local),
            "xtf_kn": list_array(scored.scores.kn[start:stop], local),
            "xtf_tr": list_array(scored.scores.tr[start:stop], local),
            "xtf_drop": list_array(scored.selection.reasons[start:stop].astype(np.int8), local),
        })
        yield pa.table(columns)


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing, non-empty output folder unless `overwrite`."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise XTFError(f"{out_dir}: already exists; pass --overwrite to replace it")


def write_output_dir(out_dir: Path, scored: Any, summary: dict[str, Any] | Callable[[], dict[str, Any]],
                     overwrite: bool = False) -> Path:
    """Write the three files atomically (temporary sibling folder, then rename). `scored`: a `ScoredDataset`, or
    its parts in order (`pipeline.ScoringRun.parts`), written as they come; `summary`: the summary, or a function
    that gives it once every part is written."""
    import pyarrow.parquet as pq

    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        writer, config = None, None
        try:
            for part in ([scored] if hasattr(scored, "selection") else scored):
                config = part.config
                for table in scored_tables(part):
                    writer = writer or pq.ParquetWriter(tmp / TRAIN_FILE, table.schema)
                    writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
        if config is None:
            raise ValueError("no part to write")
        written = summary() if callable(summary) else summary
        (tmp / SUMMARY_FILE).write_text(json.dumps(written, indent=2, default=float) + "\n")
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump({"xtf": config.model_dump(mode="json")}, sort_keys=False))
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


def _flat(table: Any, column: str, dtype: Any) -> np.ndarray:
    chunked = table.column(column)
    values = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in chunked.chunks]
    return np.concatenate(values).astype(dtype) if values else np.zeros(0, dtype)


class ScoredFolder:
    """An `xtf score` output folder, read a part at a time: what `xtf report` reads, in memory bounded by one part
    (or by the examples it shows) however many examples the folder holds.

    Attributes:
        source: the folder.
        summary: `summary.json` (empty without one).
        config: the settings of `xtf_config.yaml`.
        n_examples: examples in `train.parquet`.
        texts: token texts, once `attach_texts` has run.
    """

    COLUMNS = ("xtf_ri", "xtf_kn", "xtf_tr", "xtf_drop")

    def __init__(self, directory: str | Path) -> None:
        import pyarrow.parquet as pq

        from xtf_plugin.config import XTFConfigError, to_xtf_config

        path = Path(directory)
        if not path.is_dir():
            raise XTFError(f"{directory}: no such folder")
        if not (path / TRAIN_FILE).is_file():
            raise XTFError(f"{directory}: no {TRAIN_FILE}; expected the output folder of `xtf score`")
        try:
            self._file = pq.ParquetFile(path / TRAIN_FILE)
        except Exception as error:  # pyarrow raises several types for broken files
            raise XTFError(f"{path / TRAIN_FILE}: not a readable Parquet file ({error})") from error
        names = self._file.schema_arrow.names
        missing = [c for c in ("input_ids", "labels", *self.COLUMNS) if c not in names]
        if missing:
            raise XTFError(f"{path / TRAIN_FILE}: missing column(s) {', '.join(missing)}; expected the output of `xtf score`")
        # `action: remove`: the training columns lack the removed tokens, the xtf_ ones have every token
        self._ids, self._labels = ("xtf_input_ids", "xtf_labels") if "xtf_input_ids" in names else ("input_ids", "labels")
        self.summary: dict[str, Any] = {}
        if (path / SUMMARY_FILE).is_file():
            try:
                self.summary = json.loads((path / SUMMARY_FILE).read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise XTFError(f"{path / SUMMARY_FILE}: invalid JSON") from error
        settings: dict[str, Any] = {}
        if (path / CONFIG_FILE).is_file():
            loaded = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8")) or {}
            settings = dict(loaded.get("xtf", loaded)) if isinstance(loaded, dict) else {}
        try:
            self.config = to_xtf_config(settings, source=f"{path / CONFIG_FILE}: xtf")
        except XTFConfigError as error:
            raise XTFError(f"{error} (written by another version of xtf_plugin? score the data again)") from error
        self.source = path
        self.n_examples = self._file.metadata.num_rows
        self.texts: Any = None

    def parts(self, rows: int | None = None, limit: int | None = None) -> Iterator[tuple[int, Any]]:
        """(index of its first example, `ScoredDataset`) for consecutive parts of `rows` examples (default
        `ROWS_PER_GROUP`), up to `limit` examples; each part's offsets start at 0 and it shares `texts`."""
        first = 0
        for batch in self._batches(self.n_examples if limit is None else limit, rows or ROWS_PER_GROUP):
            yield first, self._part(_table_of(batch))
            first += batch.num_rows

    def first_examples(self, count: int) -> Any:
        """A `ScoredDataset` of the first `count` examples (or all, if fewer)."""
        import pyarrow as pa

        tables = [_table_of(batch) for batch in self._batches(count, ROWS_PER_GROUP)]
        schema = self._file.schema_arrow
        empty = pa.table({name: pa.array([], schema.field(name).type) for name in (self._ids, self._labels, *self.COLUMNS)})
        return self._part(pa.concat_tables(tables) if tables else empty)

    def read(self) -> Any:
        """Every example as one `ScoredDataset` (memory grows with the folder; `parts` does not)."""
        return self.first_examples(self.n_examples)

    def _batches(self, count: int, rows: int) -> Iterator[Any]:
        """Record batches of at most `rows` rows holding the first `count` examples."""
        taken = 0
        for batch in self._file.iter_batches(batch_size=rows, columns=[self._ids, self._labels, *self.COLUMNS]):
            if taken >= count:
                return
            batch = batch.slice(0, count - taken)
            taken += batch.num_rows
            yield batch

    def _part(self, table: Any) -> Any:
        """The `ScoredDataset` of a table of consecutive rows (labels as before XTF; `protected` and the
        selection's `flagged` are not stored, so they are empty and equal to the reasons)."""
        from xtf_plugin.pipeline import ScoredDataset
        from xtf_plugin.selection import Selection
        from xtf_plugin.token_scores import TokenScores

        lengths = np.array(table.column(self._ids).combine_chunks().value_lengths().to_numpy(zero_copy_only=False), np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        input_ids = _flat(table, self._ids, np.int64)
        reasons = _flat(table, "xtf_drop", np.uint8)
        n = len(input_ids)
        # the stored labels have XTF's masked tokens at -100; before XTF those were trained on their own token
        labels = np.where(reasons > 0, input_ids, _flat(table, self._labels, np.int64))
        scores = TokenScores(offsets, _flat(table, "xtf_ri", np.float32), _flat(table, "xtf_kn", np.float32),
                             _flat(table, "xtf_tr", np.float32))
        selection = Selection(reasons, reasons.copy(), np.full(n, np.nan, np.float32),
                              dict(self.summary.get("thresholds", {})))
        return ScoredDataset(input_ids, labels, offsets, scores, np.zeros(n, bool), selection, self.config, self.texts,
                             truncated=int(self.summary.get("examples_truncated", 0)), summary=self.summary,
                             source=self.source)


def _table_of(batch: Any) -> Any:
    import pyarrow as pa

    return pa.Table.from_batches([batch])


def read_output_dir(directory: str | Path) -> Any:
    """Read `train.parquet`, `summary.json` and `xtf_config.yaml` of an `xtf score` output folder back into the
    `ScoredDataset` that was written (labels as before XTF, reasons, scores, settings; `summary` and `source`
    set; `protected` and the selection's `flagged` are not stored, so they are empty and equal to the reasons).
    Token texts come with `attach_texts`; `ScoredFolder` reads a part at a time."""
    return ScoredFolder(directory).read()


def attach_texts(scored: Any, model: str | None = None) -> Any:
    """Give a `ScoredDataset` or `ScoredFolder` the token texts of `model`'s tokenizer (default: the `model`
    recorded in `summary.json`; `demo` resolves to the demo model), each distinct id decoded once, when asked."""
    from xtf_plugin.models import load_tokenizer
    from xtf_plugin.tokens import TokenTexts

    name = model or scored.summary.get("model")
    if not name:
        raise XTFError(f"{scored.source}: summary.json names no model; pass --model PATH")
    scored.texts = TokenTexts(load_tokenizer(str(name)))
    return scored
