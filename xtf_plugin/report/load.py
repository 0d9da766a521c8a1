"""Reading an `xtf score` output folder back into flat numpy arrays (see `xtf_plugin.scores`) and token texts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from xtf_plugin.errors import XTFError
from xtf_plugin.output import CONFIG_FILE, SUMMARY_FILE, TRAIN_FILE


@dataclass
class ScoredDir:
    """The contents of a scored folder, flat: example `i` owns positions `offsets[i]:offsets[i + 1]`."""

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    ri: np.ndarray
    kn: np.ndarray
    tr: np.ndarray
    drop: np.ndarray
    texts: dict[int, str] = field(default_factory=dict)

    @property
    def n_examples(self) -> int:
        """Number of examples."""
        return len(self.offsets) - 1

    @property
    def response(self) -> np.ndarray:
        """bool `[n_tokens]`: tokens trained before XTF (still trained, or masked by XTF)."""
        return (self.labels != -100) | (self.drop > 0)

    def example_slice(self, index: int) -> slice:
        """Positions of example `index` in the flat arrays."""
        return slice(int(self.offsets[index]), int(self.offsets[index + 1]))


def _flat(table: Any, column: str, dtype: Any) -> np.ndarray:
    chunked = table.column(column)
    values = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in chunked.chunks]
    return np.concatenate(values).astype(dtype) if values else np.zeros(0, dtype)


def load_scored_dir(directory: str | Path) -> ScoredDir:
    """Read `train.parquet`, `summary.json` and `xtf_config.yaml` of an `xtf score` output folder."""
    import pyarrow.parquet as pq

    path = Path(directory)
    if not path.is_dir():
        raise XTFError(f"{directory}: no such folder")
    if not (path / TRAIN_FILE).is_file():
        raise XTFError(f"{directory}: no {TRAIN_FILE}; expected the output folder of `xtf score`")
    table = pq.read_table(path / TRAIN_FILE)
    required = ("input_ids", "labels", "xtf_ri", "xtf_kn", "xtf_tr", "xtf_drop")
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise XTFError(f"{path / TRAIN_FILE}: missing column(s) {', '.join(missing)}; expected the output of `xtf score`")
    lengths = np.array(table.column("input_ids").combine_chunks().value_lengths().to_numpy(zero_copy_only=False), np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    summary: dict[str, Any] = {}
    if (path / SUMMARY_FILE).is_file():
        try:
            summary = json.loads((path / SUMMARY_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise XTFError(f"{path / SUMMARY_FILE}: invalid JSON") from None
    config: dict[str, Any] = {}
    if (path / CONFIG_FILE).is_file():
        loaded = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8")) or {}
        config = dict(loaded.get("xtf", loaded)) if isinstance(loaded, dict) else {}
    return ScoredDir(
        path=path,
        summary=summary,
        config=config,
        input_ids=_flat(table, "input_ids", np.int64),
        labels=_flat(table, "labels", np.int64),
        offsets=offsets,
        ri=_flat(table, "xtf_ri", np.float32),
        kn=_flat(table, "xtf_kn", np.float32),
        tr=_flat(table, "xtf_tr", np.float32),
        drop=_flat(table, "xtf_drop", np.uint8),
    )


def attach_texts(scored: ScoredDir, model: str | None = None) -> ScoredDir:
    """Decode each distinct token id once with the tokenizer of `model` (default: the `model` recorded in
    `summary.json`; `demo` resolves to the demo model)."""
    from xtf_plugin.loading import load_tokenizer
    from xtf_plugin.tokens import TokenTexts

    name = model or scored.summary.get("model")
    if not name:
        raise XTFError(f"{scored.path}: summary.json names no model; pass --model PATH")
    texts = TokenTexts(load_tokenizer(str(name)))
    ids = np.unique(scored.input_ids).tolist()
    texts.prepare(ids)
    scored.texts = {int(t): texts[t] for t in ids}
    return scored


def scored_dir_from_dataset(scored: Any, summary: dict[str, Any], path: str | Path = ".") -> ScoredDir:
    """A `ScoredDir` straight from a freshly scored `ScoredDataset` (as the trainers hold it), texts included,
    so a report can be written without going through the parquet."""
    ids = np.unique(scored.input_ids).tolist()
    scored.texts.prepare(ids)
    return ScoredDir(
        path=Path(path),
        summary=summary,
        config=scored.config.model_dump(mode="json"),
        input_ids=scored.input_ids,
        labels=scored.filtered_labels,
        offsets=scored.offsets,
        ri=scored.scores.ri,
        kn=scored.scores.kn,
        tr=scored.scores.tr,
        drop=scored.selection.drop,
        texts={int(t): scored.texts[t] for t in ids},
    )
