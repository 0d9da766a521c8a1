"""Task relevance (TR), vector form: cosine between a token's context-free vector and the domain vector.

* A token's context-free vector is either the last hidden state of the token id fed alone (no BOS, as the
  official code does; `tr_space: hidden`) or its input-embedding row (`tr_space: embedding`). It depends on
  the token id only, so it is computed once per distinct id of the dataset, in batches.
* The domain vector is the mean of the domain words' vectors; a word's vector is the mean of its sub-tokens'
  context-free vectors. Words come from `tr_domain_words` or, with `tr_domain: auto`, are the dataset's most
  frequent content words.
* `tr_center` subtracts the mean vector of all the distinct tokens involved before the cosine: single-token
  vectors share a large common direction, and without centring almost every cosine lands near 1.

The result is a table `token id -> TR`, which `TokenScores.tr` reads at each response position.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from xtf_plugin.errors import NON_FINITE_HINT, XTFError

_BATCH = 256

# Function words carry no domain; a short built-in list keeps `tr_domain: auto` free of extra dependencies.
STOP_WORDS = frozenset(
    ["a", "about", "above", "after", "again", "against", "all", "am", "an", "and", "any", "are", "as", "at", "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "could", "did", "do", "does", "doing", "down", "during", "each", "few", "for", "from", "further", "had", "has", "have", "having", "he", "her", "here", "hers", "herself", "him", "himself", "his", "how", "i", "if", "in", "into", "is", "it", "its", "itself", "just", "let", "me", "more", "most", "my", "myself", "no", "nor", "not", "now", "of", "off", "on", "once", "only", "or", "other", "our", "ours", "ourselves", "out", "over", "own", "same", "she", "should", "so", "some", "such", "than", "that", "the", "their", "theirs", "them", "themselves", "then", "there", "these", "they", "this", "those", "through", "to", "too", "under", "until", "up", "very", "was", "we", "were", "what", "when", "where", "which", "while", "who", "whom", "why", "will", "with", "would", "you", "your", "yours", "yourself", "yourselves", "also", "get", "got", "one", "two", "many", "much", "make", "made", "like", "well", "way", "may", "might", "must", "shall", "us", "per"]
)

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{2,}|\d+")


def frequent_content_words(texts: Iterable[str], top_k: int) -> list[str]:
    """The `top_k` most frequent words of the texts that are not stop words (ties: alphabetical)."""
    counts = Counter(word.lower() for text in texts for word in _WORD.findall(text))
    for stop in STOP_WORDS:
        counts.pop(stop, None)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [word for word, _ in ranked[:top_k]]


def domain_token_groups(tokenizer, words: Sequence[str]) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Token ids of each domain word (tokenised without special tokens); words that give no token are
    skipped, and an error is raised when none is left."""
    groups = []
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if ids:
            groups.append([int(i) for i in ids])
    if not groups:
        raise XTFError(f"xtf.tr_domain_words: none of {list(words)!r} tokenises to any token")
    return groups


@torch.no_grad()
def context_free_vectors(model: torch.nn.Module, token_ids: np.ndarray, space: str) -> torch.Tensor:
    """float32 `[len(token_ids), hidden_size]`: each token's vector, independent of any context.

    Args:
        model: the causal LM.
        token_ids: int64 `[N]` distinct token ids.
        space: `hidden` (last hidden state of the token fed alone) or `embedding` (input-embedding row).
    """
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64), device=device)
    if space == "embedding":
        return embeddings(ids).float().cpu()
    decoder = model.get_decoder()
    parts = []
    for start in range(0, ids.numel(), _BATCH):
        chunk = ids[start : start + _BATCH, None]
        hidden = decoder(input_ids=chunk, attention_mask=torch.ones_like(chunk), use_cache=False).last_hidden_state
        parts.append(hidden[:, 0].float().cpu())
    return torch.cat(parts) if parts else torch.zeros(0, model.config.hidden_size)


def relevance_table(
    model: torch.nn.Module,
    token_ids: np.ndarray,
    domain_groups: Sequence[Sequence[int]],
    space: str,
    center: bool,
) -> dict[int, float]:
    """TR of each distinct token id.

    Args:
        model: the causal LM.
        token_ids: int64 `[N]` distinct ids to score (the dataset's response tokens).
        domain_groups: token ids of each domain word.
        space: `hidden` or `embedding`.
        center: subtract the mean vector of all involved tokens first.
    Returns:
        token id -> cosine to the domain vector, in [-1, 1].
    """
    domain_ids = sorted({int(t) for group in domain_groups for t in group})
    all_ids = np.array(sorted(set(int(t) for t in token_ids) | set(domain_ids)), dtype=np.int64)
    vectors = context_free_vectors(model, all_ids, space).double()
    _check_finite_vectors(vectors, all_ids, set(domain_ids))
    row = {int(t): i for i, t in enumerate(all_ids)}
    if center:
        vectors = vectors - vectors.mean(dim=0, keepdim=True)
    words = torch.stack([vectors[[row[t] for t in group]].mean(dim=0) for group in domain_groups])
    domain = words.mean(dim=0)
    cosine = torch.nn.functional.cosine_similarity(vectors, domain[None, :], dim=1, eps=1e-12)
    return {int(t): float(cosine[row[int(t)]]) for t in token_ids}


def _check_finite_vectors(vectors: torch.Tensor, token_ids: np.ndarray, domain_ids: set[int]) -> None:
    """Raise `XTFError` naming the first token whose vector (float64 `[N, hidden]`, rows for `token_ids`) is
    not finite: centring spreads one NaN row over every cosine, and the table would be cached."""
    bad = (~torch.isfinite(vectors)).any(dim=1).nonzero().flatten().tolist()
    if not bad:
        return
    token = int(token_ids[bad[0]])
    kind = "NaN" if torch.isnan(vectors[bad[0]]).any() else "inf"
    role = "a token of the TR domain words" if token in domain_ids else "a response token"
    others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise XTFError(
        f"the model produced {kind} vectors for token id {token}{others}, {role}, in the TR relevance table: "
        f"{NON_FINITE_HINT}"
    )
