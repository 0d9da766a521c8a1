"""Reasoning importance (RI): the attention a token receives, read from chosen layers only.

The rest of the model keeps its fast attention (SDPA / flash): while `capture_attention_received` is active,
the model runs a registered wrapper of its attention implementation so that, for the chosen layers, the query
and key states (already rotary-embedded) are also turned into attention probabilities, in query chunks, and
reduced at once to one number per key position. The full `[batch, heads, length, length]` tensor never
exists, and the model is never asked for `output_attentions=True`.

RI of token j in an example of n tokens is

    RI[j] = mean over chosen layers and heads of  sum_{i=j}^{n-1} a[i, j]  /  (n - j)

i.e. the mean attention j receives from the positions that can see it (itself and every later one), so that
early tokens are not favoured merely by being visible to more queries.

Attention sink: most heads park a large, query-dependent share of attention on position 0. With
`exclude_sink=True` each row is renormalised over positions >= 1 (`a[i, j] / (1 - a[i, 0])`, computed as a
softmax over keys >= 1), so what a token receives does not depend on how much the query dumped on the sink;
position 0 itself gets RI 0 (it is always a prompt token and never scored).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# Elements of one chunk of attention scores ([batch, heads, rows, keys]). Small enough that the chunk stays in the
# CPU caches through the softmax passes (4 MiB); the row floor keeps the matmuls from getting too thin at 4k+
# tokens. Measured on the demo model's shapes: 5.9x faster than 64 MiB chunks at 1024 tokens, 2.6x at 4096.
_CHUNK_ELEMENTS = 1 << 20
_MIN_CHUNK_ROWS = 64


def resolve_layers(spec: str | Sequence[int], n_layers: int) -> list[int]:
    """`ri_layers` -> sorted layer indices.

    `middle` is the middle third of the layers (at least one), where attention is most semantic; `none` is no
    layer (no RI); negative indices count from the end.
    """
    if spec == "none":
        return []
    if spec == "all":
        return list(range(n_layers))
    if spec == "first":
        return [0]
    if spec == "last":
        return [n_layers - 1]
    if spec == "middle":
        start, stop = n_layers // 3, max(n_layers // 3 + 1, (2 * n_layers) // 3)
        return list(range(start, stop))
    if not spec or any(not -n_layers <= index < n_layers for index in spec):
        raise ValueError(f"ri_layers {list(spec)} out of range for a model with {n_layers} layers")
    return sorted({index % n_layers for index in spec})


def attention_received(
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    exclude_sink: bool,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Column sums of causal attention probabilities, averaged over heads.

    Args:
        query: `[B, H, L, D]` rotary-embedded query states.
        key: `[B, H_kv, L, D]` rotary-embedded key states (H a multiple of H_kv: grouped-query attention).
        valid: bool `[B, L]`, True for real tokens, right-padded: a real query never sees a padding key.
        scaling: the score scale (usually `D ** -0.5`).
        exclude_sink: renormalise each row over keys >= 1.
        softcap: tanh soft-capping of the scores, if the model uses it.
        sliding_window: the layer's attention window, if any (query i sees keys j > i - sliding_window).
    Returns:
        float32 `[B, L]`: `sum_{valid i >= j} mean_h a[h, i, j]`.
    """
    batch, heads, length, dim = query.shape
    if (valid[:, 1:] & ~valid[:, :-1]).any():
        raise ValueError("attention_received needs right-padded batches")
    kv_heads = key.shape[1]
    # queries grouped under their key head ([B, H_kv, G, L, D]), so grouped-query keys are never repeated
    query = (query.float() * scaling).view(batch, kv_heads, heads // kv_heads, length, dim)
    key = key.float()[:, :, None]
    # with the sink excluded, key 0 leaves every row, and query 0 (which sees only key 0) gives nothing
    first = 1 if exclude_sink else 0
    row_weight = valid.float() / heads
    received = torch.zeros(batch, length, dtype=torch.float32, device=query.device)
    rows = max(_MIN_CHUNK_ROWS, _CHUNK_ELEMENTS // max(1, batch * heads * length))
    for start in range(first, length, rows):
        stop = min(length, start + rows)
        # causal: the chunk's queries see no key at or after `stop`, so those scores are never computed
        scores = torch.matmul(query[..., start:stop, :], key[..., first:stop, :].transpose(-1, -2))
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        if sliding_window:
            queries = torch.arange(start, stop, device=query.device)[:, None]
            keys = torch.arange(first, stop, device=query.device)[None, :]
            scores.masked_fill_((keys > queries) | (keys <= queries - sliding_window), float("-inf"))
        else:
            # only the diagonal block holds future keys: one masked pass over it, not over the whole chunk
            future = torch.ones(stop - start, stop - start, dtype=torch.bool, device=query.device).triu_(1)
            scores[..., start - first :].masked_fill_(future, float("-inf"))
        # unnormalised softmax in place; the row sums divide the row weights instead of every probability
        scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
        weight = row_weight[:, None, None, start:stop] / scores.sum(dim=-1)
        received[:, first:stop] += torch.einsum("bkgrc,bkgr->bc", scores, weight)
    return received


@dataclass
class AttentionCapture:
    """Accumulates attention received over the chosen layers during one forward pass."""

    layers: frozenset[int]
    exclude_sink: bool
    valid: torch.Tensor | None = None
    received: torch.Tensor | None = None
    layers_seen: list[int] = field(default_factory=list)

    def begin(self, valid: torch.Tensor) -> None:
        """Start a forward pass over a right-padded batch; `valid` is bool `[B, L]`."""
        self.valid = valid
        self.received = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        self.layers_seen = []

    def end(self) -> None:
        """Stop observing until the next `begin` (later forward passes, e.g. prompt gain's, are not counted)."""
        self.valid = None
        self.received = None

    def observe(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        scaling: float,
        softcap: float | None,
        sliding_window: int | None = None,
    ) -> None:
        """Called by the wrapped attention function for a chosen layer."""
        if self.valid is None or self.received is None:
            return
        valid = self.valid.to(query.device)
        self.received += attention_received(query, key, valid, scaling, self.exclude_sink, softcap, sliding_window).to(
            self.received.device
        )
        self.layers_seen.append(layer)

    def result(self) -> torch.Tensor:
        """float32 `[B, L]`: RI per position (mean over layers, per attending position); 0 on padding."""
        if self.valid is None or self.received is None or not self.layers_seen:
            raise RuntimeError(
                "no attention was captured: the model does not route attention through transformers' "
                "AttentionInterface, so RI cannot be computed (set weights.reasoning: 0 to score without it)"
            )
        lengths = self.valid.sum(dim=1, keepdim=True)
        positions = torch.arange(self.valid.shape[1], device=self.valid.device)[None, :]
        attending = (lengths - positions).clamp_min(1).float()
        return torch.where(self.valid, self.received / len(self.layers_seen) / attending, 0.0)


# Names the capture registers in transformers' attention (and mask) interface: one per wrapped implementation.
_CAPTURE_PREFIX = "xtf_capture_"
_WRAPPERS: dict[str, Callable[..., Any]] = {}
_REGISTER_LOCK = threading.Lock()

# id of an attention module of a model being scored -> the capture its chosen layers report to. Keyed by module,
# not by config, so that a model sharing the scored model's config object only runs its own implementation.
_OBSERVERS: dict[int, AttentionCapture] = {}


def _own_attention(module: torch.nn.Module, implementation: str) -> Callable[..., Any]:
    """The function `module` would run for `implementation` without the capture."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    source = sys.modules.get(type(module).__module__)
    # a model file may declare its own interface with local overrides, and looks the name up there
    interface = getattr(source, "ALL_ATTENTION_FUNCTIONS", None)
    if not isinstance(interface, AttentionInterface):
        interface = ALL_ATTENTION_FUNCTIONS
    own = interface.get(implementation)
    if own is None:
        # "eager" is in no mapping: the model file's own eager function runs (it may soft-cap, etc.)
        own = getattr(source, "eager_attention_forward", sdpa_attention_forward)
    return own


def _make_wrapper(name: str, implementation: str) -> Callable[..., Any]:
    def attention_with_capture(module, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
        capture = _OBSERVERS.get(id(module))
        if capture is not None:
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            capture.observe(module.layer_idx, query, key, scaling, kwargs.get("softcap"), kwargs.get("sliding_window"))
        own = _own_attention(module, implementation)
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation_internal", None) != name:
            return own(module, query, key, value, attention_mask, **kwargs)
        # some implementations read the name back from the config (flash attention picks its kernel by it)
        config._attn_implementation_internal = implementation
        try:
            return own(module, query, key, value, attention_mask, **kwargs)
        finally:
            config._attn_implementation_internal = name

    return attention_with_capture


def _register_capture(implementation: str) -> str:
    """Register `xtf_capture_<implementation>` with transformers (attention function and mask); its name.

    Registration only adds that name: the entries of existing implementations are never touched, so every model
    not switched to the name runs exactly as before.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = _CAPTURE_PREFIX + implementation
    with _REGISTER_LOCK:
        wrapper = _WRAPPERS.get(name)
        if wrapper is None:
            wrapper = _WRAPPERS[name] = _make_wrapper(name, implementation)
        # a fresh interface has no local overrides: `.get` reads what `register` wrote
        if AttentionInterface().get(name) is not wrapper:
            AttentionInterface.register(name, wrapper)
        # masking_utils builds no mask at all for a name missing from its global mapping, so the capture name gets
        # the original's mask, looked up when the mask is built (as masking_utils does for the original)
        if implementation in AttentionMaskInterface() and name not in AttentionMaskInterface():
            mask = functools.partial(_original_mask, ALL_MASK_ATTENTION_FUNCTIONS, implementation)
            AttentionMaskInterface.register(name, mask)
    return name


def _original_mask(interface: Any, implementation: str, *args: Any, **kwargs: Any) -> Any:
    return interface[implementation](*args, **kwargs)


def _configs_of(model: torch.nn.Module) -> list[Any]:
    """The model's config, its sub-configs and the config of every submodule, once each."""
    from transformers import PreTrainedConfig

    pending = [model.config, *(getattr(m, "config", None) for m in model.modules())]
    found: dict[int, Any] = {}
    while pending:
        config = pending.pop()
        if not isinstance(config, PreTrainedConfig) or id(config) in found:
            continue
        found[id(config)] = config
        pending.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", None) or {})
    return list(found.values())


@contextlib.contextmanager
def capture_attention_received(model: torch.nn.Module, layers: Sequence[int], exclude_sink: bool) -> Iterator[AttentionCapture]:
    """Switch the model to a wrapped copy of its attention implementation so that the chosen layers also report
    attention received.

    Each config of the model (sub-configs included) is switched from its implementation X to the registered
    `xtf_capture_X`, whose function calls X (SDPA, flash, eager: it still computes every layer's output) and, for
    the chosen layers of this model only, adds the probability computation; the mask is built as for X. Other models
    in the process keep X and never see the wrapper; a model sharing this model's config objects does run the
    wrapper while the capture lasts, but only X. Every config gets its implementation back on exit, exceptions
    included.
    """
    capture = AttentionCapture(frozenset(layers), exclude_sink)
    observed = [id(m) for m in model.modules() if getattr(m, "layer_idx", None) in capture.layers]
    previous_observers = {key: _OBSERVERS.get(key) for key in observed}
    switched: list[tuple[Any, str]] = []
    try:
        for config in _configs_of(model):
            implementation = getattr(config, "_attn_implementation", None)
            # None: transformers' own default dispatch; a capture name: an enclosing capture of this model
            if implementation is None or implementation.startswith(_CAPTURE_PREFIX):
                continue
            name = _register_capture(implementation)
            switched.append((config, implementation))
            # the internal attribute: the property's setter would also overwrite the sub-configs' implementations
            config._attn_implementation_internal = name
        for key in observed:
            _OBSERVERS[key] = capture
        yield capture
    finally:
        for config, implementation in reversed(switched):
            config._attn_implementation_internal = implementation
        for key, previous in previous_observers.items():
            if previous is None:
                _OBSERVERS.pop(key, None)
            else:
                _OBSERVERS[key] = previous
