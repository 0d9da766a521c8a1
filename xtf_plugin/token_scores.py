"""`TokenScores`: the per-token scores of a dataset, the one structure shared by scoring, selection, cache and
report.

Scores are stored flat, the way Arrow stores list columns: example `i` owns positions
`offsets[i]:offsets[i + 1]` of every array. Index `j` of an example scores token `j` of its `input_ids`
(`kn[j] = 1 - p(input_ids[j] | input_ids[:j])`); NaN marks a token that has no score (prompt tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from xtf_plugin.config import SCORE_FIELDS


@dataclass
class TokenScores:
    """Flat per-token scores of `n_examples` examples.

    Attributes:
        offsets: int64 `[n_examples + 1]`, `offsets[0] == 0`, non-decreasing.
        ri: float32 `[n_tokens]`, reasoning importance (mean attention received).
        kn: float32 `[n_tokens]`, knowledge novelty `1 - p(token | prefix)`.
        tr: float32 `[n_tokens]`, task relevance (higher = more relevant).
    """

    offsets: np.ndarray
    ri: np.ndarray
    kn: np.ndarray
    tr: np.ndarray

    ATTRIBUTE_FIELDS = SCORE_FIELDS

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        n_tokens = int(self.offsets[-1])
        for name in self.ATTRIBUTE_FIELDS:
            array = np.asarray(getattr(self, name), dtype=np.float32)
            if array.shape != (n_tokens,):
                raise ValueError(f"TokenScores.{name} has shape {array.shape}, expected ({n_tokens},)")
            setattr(self, name, array)

    @property
    def n_examples(self) -> int:
        """Number of examples."""
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        """Total number of tokens over all examples."""
        return int(self.offsets[-1])

    def example_slices(self) -> Iterator[slice]:
        """One slice per example into the flat arrays."""
        for start, stop in zip(self.offsets[:-1], self.offsets[1:], strict=True):
            yield slice(int(start), int(stop))

    def split(self, name: str) -> list[np.ndarray]:
        """The flat array `name` cut into one array per example."""
        return np.split(getattr(self, name), self.offsets[1:-1])

    @classmethod
    def empty(cls, lengths: Sequence[int]) -> TokenScores:
        """All-NaN scores for examples of the given lengths."""
        offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
        n = int(offsets[-1])
        return cls(offsets, *(np.full(n, np.nan, np.float32) for _ in cls.ATTRIBUTE_FIELDS))

    @classmethod
    def concatenate(cls, parts: Sequence[TokenScores]) -> TokenScores:
        """Join scores of consecutive example ranges."""
        lengths = np.concatenate([np.diff(p.offsets) for p in parts]) if parts else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        arrays = [np.concatenate([getattr(p, f) for p in parts]) for f in cls.ATTRIBUTE_FIELDS]
        return cls(offsets, *arrays)


def flatten(arrays: Sequence[Sequence[int]] | Sequence[np.ndarray], dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Ragged sequences -> (flat array, offsets `[n + 1]`)."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate([np.asarray(a, dtype=dtype) for a in arrays]) if len(arrays) else np.zeros(0, dtype)
    return flat.astype(dtype, copy=False), offsets
