"""Token texts and the tokens that must never be masked.

Never masked: special tokens (EOS, end-of-turn markers such as `<|im_end|>` / `<|eot_id|>`; a model that
never learns to stop is the classic failure of token filters) and every response token that overlaps a
match of a `protect` regular expression. Regexes run over the example's text rebuilt from per-token texts
(each distinct token id decoded once), so a match maps back to tokens exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np


class TokenTexts:
    """Decoded text of each token id, decoded once per distinct id."""

    def __init__(self, tokenizer) -> None:  # type: ignore[no-untyped-def]
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def prepare(self, token_ids: Iterable[int]) -> None:
        """Decode every id not seen yet, in one batch."""
        missing = sorted({int(t) for t in token_ids} - self._texts.keys())
        if missing:
            texts = self.tokenizer.batch_decode([[t] for t in missing], skip_special_tokens=False)
            self._texts.update(zip(missing, texts, strict=True))

    def __getitem__(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self._texts:
            self.prepare([token_id])
        return self._texts[token_id]

    def of(self, ids: Sequence[int]) -> list[str]:
        """Texts of a sequence of ids."""
        self.prepare(ids)
        return [self._texts[int(t)] for t in ids]


def special_token_ids(tokenizer) -> set[int]:  # type: ignore[no-untyped-def]
    """EOS, PAD and every special / added-special token id of the tokenizer."""
    ids = {int(t) for t in getattr(tokenizer, "all_special_ids", []) if t is not None}
    for attr in ("eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            ids.add(value)
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def protected_mask(
    input_ids: np.ndarray, labels: np.ndarray, texts: TokenTexts, special_ids: set[int], patterns: Sequence[str]
) -> np.ndarray:
    """bool `[L]`: response tokens of one example that must never be masked.

    Args:
        input_ids: int `[L]`.
        labels: int `[L]`, -100 on untrained tokens.
        texts: token texts.
        special_ids: ids never masked wherever they appear.
        patterns: `protect` regular expressions (compiled with re.MULTILINE).
    """
    response = labels != -100
    protected = response & np.isin(input_ids, np.fromiter(special_ids, dtype=np.int64, count=len(special_ids)))
    if patterns:
        pieces = texts.of(input_ids.tolist())
        ends = np.cumsum([len(p) for p in pieces])
        starts = ends - np.array([len(p) for p in pieces])
        text = "".join(pieces)
        for pattern in patterns:
            for match in re.finditer(pattern, text, flags=re.MULTILINE):
                if match.end() == match.start():
                    continue
                protected |= response & (starts < match.end()) & (ends > match.start())
    return protected
