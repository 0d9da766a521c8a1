"""On-disk score cache.

An entry is an `.npz` file named by the SHA-256 of everything its content depends on: the model (path,
config and a fingerprint of its weights), the tokenizer, the tokenised examples and the scorer settings.
Selection settings are not part of any key, so changing `mode`, `weights`, `drop_ratio`, caps or `protect`
reuses every entry and never runs the model.

Writes go to a temporary file in the same folder and are moved into place with `os.replace`, so a reader
never sees half an entry. Each entry records its own key; an entry that cannot be read (truncated, corrupt)
or whose recorded key differs is reported with a warning, deleted and recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
_SAMPLES_PER_TENSOR = 1024


class CacheWarning(UserWarning):
    """A cache entry was unusable and is being recomputed."""


def stable_hash(value: Any) -> str:
    """SHA-256 hex of a JSON-serialisable value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model: Any) -> dict[str, Any]:
    """Identity of a model: its path, its config and a hash of evenly spaced samples of every weight.

    Sampling (1024 values per tensor, plus names, shapes and dtypes) reads a few MB even for an 8B model, and
    any fine-tune or different checkpoint changes it.
    """
    import torch

    # Under PEFT's disable_adapter() the adapter weights do not change any score, and they are initialised at
    # random per process: leave them out, so every rank of a run (and every run) finds the same cache entries.
    adapters_off = any(getattr(m, "disable_adapters", False) for m in model.modules() if hasattr(m, "lora_A"))
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if not isinstance(tensor, torch.Tensor) or (adapters_off and "lora_" in name):
                continue
            if adapters_off:  # the base model's own parameter names, so plain and PEFT-wrapped runs share entries
                name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
            flat = tensor.detach().reshape(-1)
            if flat.numel() == 0 or flat.device.type == "meta":
                continue
            count = min(_SAMPLES_PER_TENSOR, flat.numel())
            index = torch.arange(count, dtype=torch.int64) * (flat.numel() - 1) // max(1, count - 1)
            digest.update(flat[index.to(flat.device)].to(torch.float64).cpu().numpy().tobytes())
    config = model.config.to_dict() if hasattr(model, "config") else {}
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"):
        config.pop(volatile, None)
    return {
        "name_or_path": str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")),
        "config": stable_hash(config),
        "weights": digest.hexdigest(),
    }


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of a tokenizer's vocabulary, special tokens and chat template."""
    vocab = sorted(tokenizer.get_vocab().items())
    return stable_hash(
        {
            "vocab": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
            "special": [str(t) for t in getattr(tokenizer, "all_special_tokens", [])],
            "chat_template": getattr(tokenizer, "chat_template", None),
        }
    )


def data_fingerprint(input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> str:
    """Hash of tokenised examples (ids, labels, and where each example starts)."""
    digest = hashlib.sha256()
    for ids, lab in zip(input_ids, labels, strict=True):
        digest.update(np.int64(len(ids)).tobytes())
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(lab, dtype=np.int64).tobytes())
    return digest.hexdigest()


class ScoreCache:
    """A folder of `.npz` entries, `<root>/<kind>/<key[:2]>/<key>.npz`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.unwritable = False

    def path(self, kind: str, key: str) -> Path:
        """Where the entry `key` of `kind` lives."""
        return self.root / kind / key[:2] / f"{key}.npz"

    def load(self, kind: str, key: str, fields: Sequence[str]) -> dict[str, np.ndarray] | None:
        """The arrays of an entry, or None when it is missing or unusable (then deleted, with a warning)."""
        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as archive:
                meta = json.loads(bytes(archive["__meta__"]).decode())
                if meta.get("key") != key or meta.get("version") != CACHE_FORMAT_VERSION:
                    raise ValueError("the entry was written for different inputs")
                arrays = {name: archive[name] for name in fields}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            warnings.warn(f"score cache entry {path} is unusable ({error}); recomputing", CacheWarning, stacklevel=2)
            with contextlib.suppress(OSError):  # a read-only cache keeps it
                path.unlink(missing_ok=True)
            return None
        return arrays

    def save(self, kind: str, key: str, arrays: dict[str, np.ndarray]) -> Path | None:
        """Write an entry atomically and return its path; None when the cache cannot be written (a read-only
        mount, a full disk: one warning per cache, the run goes on without saving)."""
        path = self.path(kind, key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(path.parent)
            handle, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
        except OSError as error:
            if not self.unwritable:
                warnings.warn(f"score cache {self.root} cannot be written ({error}); new scores are not saved",
                              CacheWarning, stacklevel=2)
            self.unwritable = True
            return None
        meta = np.frombuffer(json.dumps({"key": key, "version": CACHE_FORMAT_VERSION}).encode(), dtype=np.uint8)
        try:
            with os.fdopen(handle, "wb") as tmp:
                np.savez(tmp, __meta__=meta, **arrays)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return path


STALE_TEMPORARY_SECONDS = 24 * 3600


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete day-old temporary files: a process killed mid-write (SIGKILL, out of memory) cannot clean up
    after itself, and a younger file may be another process's write in progress."""
    for tmp in folder.glob(".tmp-*.npz"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                tmp.unlink()
        except OSError:  # another process removed or renamed it first
            pass
