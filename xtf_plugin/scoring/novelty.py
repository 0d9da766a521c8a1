"""Knowledge novelty (KN) and the log-probabilities it is made of.

`KN[j] = 1 - p(x_j | x_<j)` under teacher forcing. The LM head is applied only to the positions that predict a
scored token, in row chunks, and log-softmax runs in float32 chunk by chunk, so no `[batch, length, vocab]`
float32 tensor is ever held.
"""

from __future__ import annotations

import torch

# Elements of one float32 logits chunk ([rows, vocab]).
_CHUNK_ELEMENTS = 1 << 24


def token_log_probs(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target | prefix) for selected positions.

    Args:
        model: the causal LM (its output embeddings are the LM head).
        hidden: `[N, hidden_size]` final hidden states of the positions *before* each target.
        targets: int64 `[N]`, the token ids to score.
    Returns:
        float32 `[N]` log-probabilities.
    """
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    vocab = head.weight.shape[0] if hasattr(head, "weight") else model.config.vocab_size
    rows = max(1, _CHUNK_ELEMENTS // max(1, vocab))
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        stop = min(hidden.shape[0], start + rows)
        logits = head(hidden[start:stop]).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        chosen = logits.gather(1, targets[start:stop, None].to(logits.device)).squeeze(1)
        out[start:stop] = (chosen - torch.logsumexp(logits, dim=-1)).to(out.device)
    return out


def novelty_from_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """KN = 1 - p, from log p (any shape)."""
    return 1.0 - log_probs.exp()
