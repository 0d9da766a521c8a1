"""`xtf report --tokens`: one JSON line per token of every example, with its text, scores and reasons."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from xtf_plugin.report.stats import reason_names
from xtf_plugin.selection import SPAN_BIT

if TYPE_CHECKING:
    from xtf_plugin.output import ScoredFolder
    from xtf_plugin.pipeline import ScoredDataset


def _score(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


def write_tokens_jsonl(scored: ScoredDataset | ScoredFolder, path: str | Path) -> int:
    """Write `{"example", "position", "token", "ri", "kn", "tr", "reasons", "span", "kept"}` per token (scores
    `null` where unscored, `reasons` the attribute names that dropped it, `span` true where it was masked with
    its span (off-task or a repeat), `kept` false for dropped tokens), a part of the examples at a time; returns
    the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [reason_names(b) for b in range(8)]
    rows = 0
    with path.open("w", encoding="utf-8") as handle:
        for first, part in scored.parts():
            part.texts.prepare(np.unique(part.input_ids).tolist())
            ri, kn, tr = part.scores.ri.tolist(), part.scores.kn.tolist(), part.scores.tr.tolist()
            ids, drop = part.input_ids.tolist(), part.selection.reasons.tolist()
            for i in range(part.n_examples):
                start, stop = int(part.offsets[i]), int(part.offsets[i + 1])
                lines = []
                for k in range(start, stop):
                    bits = drop[k]
                    lines.append(
                        json.dumps(
                            {
                                "example": first + i,
                                "position": k - start,
                                "token": part.texts[ids[k]],
                                "ri": _score(ri[k]),
                                "kn": _score(kn[k]),
                                "tr": _score(tr[k]),
                                "reasons": names[bits & 7],
                                "span": bool(bits & SPAN_BIT),
                                "kept": bits == 0,
                            },
                            ensure_ascii=False,
                        )
                    )
                handle.write("\n".join(lines) + ("\n" if lines else ""))
                rows += len(lines)
    return rows
