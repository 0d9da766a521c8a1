"""What every toolkit adapter needs: score tokenised examples with the model about to be trained, get masked
labels back, and the numbers to log. No TRL or axolotl imports here."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from xtf_plugin.config import ATTRIBUTES, XTFConfig
from xtf_plugin.data import TokenizedData
from xtf_plugin.distributed import is_main_process, rank
from xtf_plugin.logs import status_logger
from xtf_plugin.output import list_array
from xtf_plugin.pipeline import PART_EXAMPLES, ScoredDataset, score_dataset
from xtf_plugin.report.summary import summarize, summary_line
from xtf_plugin.token_scores import flatten


@contextlib.contextmanager
def base_model_for_scoring(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The frozen base model inside `model`: a PEFT model with its adapters disabled (so QLoRA scores with the
    4-bit weights it trains on, without a second copy in memory), any other model as it is."""
    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    was_training = model.training
    try:
        if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
            with model.disable_adapter():
                yield model
        else:
            yield model
    finally:
        model.train(was_training)  # scoring runs in eval mode


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
        scored = score_dataset(scorer, tokenizer, data, config, progress=progress)
    scored.summary = summarize(scored)
    _log_summary(scored.summary)
    _, labels_out, kept = scored.training_examples()
    return MaskedExamples(labels_out, scored, scored.summary, kept)


def _log_summary(summary: dict[str, Any]) -> None:
    log = status_logger()
    log.info(summary_line(summary))
    # each rank's own share of the forward passes (shown with XTF_VERBOSITY=debug)
    log.debug("XTF rank %d: %d forward passes, %d cached shards", rank(), summary["forward_passes"],
              summary["cached_shards"])


@dataclass
class MaskedDataset:
    """Result of `mask_dataset`.

    Attributes:
        dataset: the `datasets.Dataset` with XTF's labels (and, with `action: remove`, without the removed tokens).
        summary: the summary of the training set (`report.summary.summarize`).
        report: the HTML report's path, when one was written.
    """

    dataset: Any
    summary: dict[str, Any]
    report: str | None = None

    @property
    def log_metrics(self) -> dict[str, float]:
        """`xtf/kept_fraction` and `xtf/dropped_<attribute>` fractions, for the trainer's logs."""
        return xtf_log_metrics(self.summary)


def mask_dataset(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    config: XTFConfig,
    progress: bool = True,
    report_dir: str | Path | None = None,
    part_examples: int = PART_EXAMPLES,
) -> MaskedDataset:
    """Score every row of a tokenised `datasets.Dataset` with the base model inside `model` and return it with
    XTF's masks (`TrainingColumns`), a part of the rows at a time where the settings allow it
    (`pipeline.ScoringRun.parts`), so that memory holds one part's tokens and scores whatever the dataset's size.

    Args:
        model: the model about to be trained (plain, PEFT/LoRA or 4-bit QLoRA).
        tokenizer: its tokenizer.
        dataset: rows with `input_ids` and `labels` (-100 on untrained tokens), one example each.
        config: XTF settings.
        progress: show the scoring progress bar.
        report_dir: write the HTML report of the training set there (`xtf_report.html`; main process only).
        part_examples: rows per part (a multiple of `pipeline.SHARD_EXAMPLES`).
    Under torch.distributed every rank calls it together and gets the same dataset.
    """
    from xtf_plugin.output import ScoredFolder, write_output_dir
    from xtf_plugin.pipeline import ScoringRun, draining
    from xtf_plugin.report.summary import SummaryTally
    from xtf_plugin.tokens import TokenTexts

    def part_of(first: int, last: int) -> TokenizedData:
        rows = read_rows(dataset, ["input_ids", "labels"], first, last, np.int64)
        return TokenizedData(rows["input_ids"], rows["labels"])

    columns = TrainingColumns(dataset, config.action == "remove")
    tally = SummaryTally()
    report = None
    writes_report = report_dir is not None and is_main_process()
    try:
        # pass 1's scores and the report's scored folder: next to the dataset's cache files, like the new columns
        with base_model_for_scoring(model) as scorer, tempfile.TemporaryDirectory(prefix=".xtf-", dir=columns.folder) as work:
            parts = ScoringRun(scorer, tokenizer, config, progress, spill_dir=work).parts(part_of, len(dataset),
                                                                                          part_examples)

            def added() -> Iterator[ScoredDataset]:
                for part in parts:
                    tally.add(part)
                    columns.add(part)
                    yield part

            with draining(parts):
                if writes_report:
                    scored = ScoredFolder(write_output_dir(Path(work) / "scored", added(), tally.summary))
                    scored.texts = TokenTexts(tokenizer)
                    report = write_training_report(scored, str(report_dir))
                else:
                    for _ in added():
                        pass
        masked = columns.finish()
    except BaseException:
        columns.discard()
        raise
    summary = tally.summary()
    _log_summary(summary)
    return MaskedDataset(masked, summary, report)


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
    """The `datasets.Dataset` the masks were computed for, with XTF's labels (see `TrainingColumns`)."""
    columns = TrainingColumns(dataset, result.removes_tokens)
    columns.add(result.scored)
    return columns.finish()


class TrainingColumns:
    """The columns of a tokenised `datasets.Dataset` that XTF changes, written a part of the rows at a time.

    `labels` takes XTF's -100s; with `action: remove` the dropped tokens also leave `input_ids` and every list
    column aligned with it (`attention_mask`, `completion_mask`, ...: every row as long as its `input_ids`), and
    `position_ids` / `length` are recomputed for the shorter rows. The new columns go to an Arrow file next to
    the dataset's own cache files (named by a hash of their content, memory-mapped, as `datasets.map` leaves
    its results) or, for a dataset held in memory or a read-only folder, to memory; `finish` joins them to the
    unchanged columns. Rows, row order, column order and every other column stay as they are.

    Args:
        dataset: the tokenised training set (`input_ids`, `labels`).
        removes: `action: remove`.
    """

    def __init__(self, dataset: Any, removes: bool) -> None:
        from datasets import Features, List, Value
        from datasets.arrow_writer import ArrowWriter

        self.dataset, self.rows = dataset, 0
        present = dataset.column_names
        self.aligned = _aligned_columns(dataset) if removes else []
        names = [*self.aligned, "input_ids", "labels", *[c for c in ("position_ids", "length") if c in present]]
        self.names = names if removes else ["labels"]
        self.features = Features({
            name: dataset.features[name] if name in present else List(Value("int64")) for name in self.names
        })
        # one hash a column, so that the name does not depend on how the rows were cut into parts
        self.digests = {name: hashlib.blake2b(digest_size=16) for name in ["(rows)", *self.names]}
        folder = Path(dataset.cache_files[0]["filename"]).parent if dataset.cache_files else None
        self.path: Path | None = None
        self.stream: Any = None
        self.folder = folder if folder is not None and os.access(folder, os.W_OK) else None
        """Where the new columns go (None: memory)."""
        if self.folder is not None:
            handle, name = tempfile.mkstemp(prefix=".xtf-columns-", suffix=".arrow", dir=self.folder)
            os.close(handle)
            self.path = Path(name)
            self.writer = ArrowWriter(features=self.features, path=str(self.path))
        else:
            import pyarrow as pa

            self.stream = pa.BufferOutputStream()
            self.writer = ArrowWriter(features=self.features, stream=self.stream)

    def add(self, scored: ScoredDataset) -> None:
        """The next `scored.n_examples` rows, scored and selected (`ScoredDataset` of those rows)."""
        import pyarrow as pa

        first, count = self.rows, scored.n_examples
        kept = scored.kept_in_input
        offsets = np.concatenate([[0], np.cumsum(kept, dtype=np.int64)])[scored.offsets]
        lengths = np.diff(offsets)
        values = {"labels": scored.filtered_labels[kept], "length": lengths}
        if "input_ids" in self.names:  # action: remove
            values["input_ids"] = scored.input_ids[kept]
            values["position_ids"] = np.arange(len(values["labels"]), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        if self.aligned:
            rows = read_rows(self.dataset, self.aligned, first, first + count)
            for name in self.aligned:
                values[name] = np.concatenate(rows[name])[kept] if count else kept[:0]
        schema = self.features.arrow_schema
        columns = {}
        for name in self.names:
            arrow_type = schema.field(name).type
            if name == "length":
                columns[name] = pa.array(lengths, type=arrow_type)
            else:
                columns[name] = list_array(values[name], offsets, arrow_type)
            self.digests[name].update(np.ascontiguousarray(values[name]).tobytes())
        self.digests["(rows)"].update(lengths.tobytes())
        self.writer.write_table(pa.table(columns, schema=schema))
        self.rows += count

    def finish(self) -> Any:
        """The dataset with the new columns (every row must have been added)."""
        from datasets import Dataset, concatenate_datasets

        if self.rows != len(self.dataset):
            raise ValueError(f"{self.rows} rows written of {len(self.dataset)}")
        self.writer.finalize()
        if self.path is not None:
            # content-named, so that the joined dataset's fingerprint (from the path) changes with the masks
            digest = hashlib.blake2b("".join(f"{name}:{d.hexdigest()}" for name, d in self.digests.items()).encode(),
                                     digest_size=16).hexdigest()
            path = self.path.with_name(f"xtf-columns-{digest}.arrow")
            os.replace(self.path, path)
            columns = Dataset.from_file(str(path))
        else:
            columns = Dataset.from_buffer(self.stream.getvalue())
        kept = [name for name in self.dataset.column_names if name not in self.names]
        joined = columns
        if kept:
            unchanged = self.dataset.select_columns(kept)
            if unchanged._indices is not None:  # (`concatenate_datasets` would flatten the new columns too: a copy)
                unchanged = unchanged.flatten_indices()
            joined = concatenate_datasets([unchanged, columns], axis=1)
        added = [name for name in self.names if name not in self.dataset.column_names]  # `labels`, at most
        return joined.select_columns([*self.dataset.column_names, *added])

    def discard(self) -> None:
        """Drop what was written (the run failed)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def read_rows(dataset: Any, columns: list[str], first: int, last: int, dtype: Any = None) -> dict[str, list[np.ndarray]]:
    """Rows `first` to `last - 1` of a `datasets.Dataset`'s list `columns`, one copied array a row (`dtype`: as
    stored). A memory-mapped dataset is read through a mapping of its own, let go with the rows' views: the pages
    read would otherwise stay in the process's resident memory, and add up to the whole dataset over a run."""
    view = dataset.with_format("numpy", columns=columns)
    if _memory_mapped(dataset):
        view = pickle.loads(pickle.dumps(view))  # memory-mapped tables pickle as their paths: a fresh mapping
    rows = view[first:last]
    return {name: [np.array(row, dtype=dtype) for row in rows[name]] for name in columns}


def _memory_mapped(dataset: Any) -> bool:
    """Whether every table of the dataset (and its index) is a memory-mapped file, so a copy of it costs no data."""
    from datasets.table import ConcatenationTable, MemoryMappedTable

    tables = [dataset.data] + ([dataset._indices] if dataset._indices is not None else [])
    blocks = [block for table in tables
              for block in ([b for row in table.blocks for b in row] if isinstance(table, ConcatenationTable)
                            else [table])]
    return all(isinstance(block, MemoryMappedTable) for block in blocks)


def _aligned_columns(dataset: Any) -> list[str]:
    """The list columns other than `input_ids`, `labels`, `position_ids` whose every row is as long as its
    `input_ids` (compared from the Arrow lengths, without reading the values)."""
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")
    aligned = []
    for name in dataset.column_names:
        if name in ("input_ids", "labels", "position_ids", "length"):
            continue
        feature = dataset.features[name]
        if not hasattr(feature, "feature") and not isinstance(feature, list):  # not a list column
            continue
        if all(pc.all(pc.equal(pc.list_value_length(rows.column(name)),
                                pc.list_value_length(rows.column("input_ids")))).as_py() is not False
               for rows in (table[first : first + LENGTH_CHECK_ROWS] for first in range(0, len(dataset),
                                                                                       LENGTH_CHECK_ROWS))):
            aligned.append(name)
    return aligned


LENGTH_CHECK_ROWS = 65536


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


def write_training_report(scored: Any, output_dir: str | None) -> str | None:
    """Write the HTML report of the training set (a `ScoredDataset` or `output.ScoredFolder` with its summary and
    token texts) into the run's output folder (main process only); returns its path."""
    if not output_dir or not is_main_process():
        return None
    from xtf_plugin.report.html import write_html

    scored.source = Path(output_dir)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    path = write_html(scored, Path(output_dir) / REPORT_FILE)
    status_logger().info("XTF: report of the training set written to %s", path)
    return str(path)


def split_packed(values: Sequence[int], seq_lengths: Sequence[int]) -> list[list[int]]:
    """Cut a packed row into its sequences (TRL's `seq_lengths` column)."""
    bounds = np.cumsum([0, *seq_lengths])
    return [list(values[int(a) : int(b)]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
