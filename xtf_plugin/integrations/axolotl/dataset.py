"""Scoring axolotl's prepared training set and writing XTF's mask into its `labels` column.

Called from `XTFPlugin.load_datasets`, after axolotl's own loader has tokenised (or reloaded from
`dataset_prepared_path`) the datasets and before the training model is loaded. Every row of the prepared
training set is one example (with `sample_packing` too: packing happens later, in the sampler and collator),
so each row is scored as it is and only its `labels` change. The rows are scored a part at a time where the
settings allow it (`mask_dataset`), and the new `labels` column is written next to the dataset's cache files,
so memory does not grow with the training set.

Memory: the scoring model is the base model loaded here, on its own, *before* the training model exists, and
it is freed (`del`, `gc.collect()`, `torch.cuda.empty_cache()`) before this function returns. Peak memory is
therefore one model, never two: the scoring model (4-bit when `load_in_4bit: true`, so QLoRA scores the
weights it trains on) or, later, the training model. The price is loading the base model twice per run; when
every score is in the cache the first load only fingerprints the weights (no forward pass).
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from xtf_plugin.config import to_xtf_config
from xtf_plugin.distributed import is_main_process, local_device
from xtf_plugin.errors import XTFError
from xtf_plugin.integrations.axolotl.args import SOFT_UNSUPPORTED
from xtf_plugin.integrations.common import mask_dataset
from xtf_plugin.pipeline import SHARD_EXAMPLES


@dataclass
class XTFRun:
    """What the plugin keeps after masking, for logging: summary, trainer-log metrics, scoring model."""

    summary: dict[str, Any]
    metrics: dict[str, float]
    scoring_model: str
    shards: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """One log line: what scored, how much ran the model, how much came from the cache."""
        s = self.summary
        return (
            f"XTF: scoring model {self.scoring_model}; {s['examples']} examples, {s['response_tokens']} response "
            f"tokens; forward passes: {s['forward_passes']}, cached shards: {s['cached_shards']}/{self.shards}, "
            f"scoring {s['scoring_seconds']:.1f} s, total {self.seconds:.1f} s; kept fraction "
            f"{self.metrics['xtf/kept_fraction']:.4f}"
        )


def load_scoring_model(cfg: Any, tokenizer: Any, device: str) -> Any:
    """The frozen base model (`cfg.base_model`) as QLoRA / LoRA / full fine-tuning will see it.

    `load_in_4bit: true` loads the 4-bit nf4 model (bitsandbytes, double quantisation, as axolotl's QLoRA);
    dtype (compute dtype when 4-bit): float32 on CPU or when axolotl trains in float32, else bfloat16 on a GPU
    that supports it (float32 on one that does not). If axolotl's tokenizer has more tokens than the checkpoint
    (added `tokens:` / special tokens), the embeddings grow to the tokenizer's size, the new rows set to the
    mean row (not random) so that the model fingerprint, and with it the score cache, is stable across runs.
    """
    from xtf_plugin.models import load_model

    name = str(cfg.base_model)
    if cfg.get("load_in_8bit"):
        from axolotl.utils.logging import get_logger

        get_logger("axolotl.integrations.xtf").warning(
            "xtf_plugin: load_in_8bit is not mirrored by the scorer; XTF scores with the unquantised base model"
        )
    try:
        dtype = "float32" if cfg.get("torch_dtype") == torch.float32 else "auto"
        model = load_model(name, dtype=dtype, load_in_4bit=bool(cfg.load_in_4bit), device=device)
    except XTFError as error:
        detail = str(error).split(": ", 1)[-1]
        raise XTFError(f"base_model: XTF cannot load the scoring model {name!r}: {detail}") from error
    embeddings = model.get_input_embeddings()
    if embeddings is not None and embeddings.num_embeddings < len(tokenizer):
        _grow_embeddings(model, len(tokenizer))
    return model


def _grow_embeddings(model: Any, size: int) -> None:
    old = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        matrices = [model.get_input_embeddings().weight]
        output = model.get_output_embeddings()
        if output is not None and output.weight is not matrices[0]:
            matrices.append(output.weight)
        for weight in matrices:
            weight[old:] = weight[:old].float().mean(0).to(weight.dtype)


def release_memory() -> None:
    """Returns the memory of objects just dropped (call after deleting the last reference to the model)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mask_train_dataset(cfg: Any, dataset: Any) -> tuple[Any, XTFRun]:
    """Score every row of axolotl's prepared training set and return it with masked `labels`; writes the HTML
    report of the training set to `output_dir/xtf_report.html` (main process).

    Rows, row order, every other column and every label outside the dropped response tokens stay as they are.
    On several processes every rank loads the scoring model, the ranks split the forward passes between them
    and every rank gets the same masks.
    """
    from axolotl.loaders import load_tokenizer
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise XTFError(
            "xtf: the training set is streamed (`streaming:` / `pretraining_dataset:`); XTF needs the whole "
            "tokenised set before training: remove streaming or the `xtf:` block"
        )
    missing = [c for c in ("input_ids", "labels") if c not in dataset.column_names]
    if missing:
        raise XTFError(
            f"xtf: the prepared training set has no {' / '.join(missing)} column (columns: "
            f"{', '.join(dataset.column_names)}); XTF needs tokenised SFT examples"
        )
    started = time.perf_counter()
    config = to_xtf_config(cfg.get("xtf"))
    if config.soft:
        raise XTFError(SOFT_UNSUPPORTED)
    tokenizer = load_tokenizer(cfg)
    device = local_device()
    # every rank at once: the ranks split the forward passes and gather the scores (see score_dataset)
    model = load_scoring_model(cfg, tokenizer, device)
    quantized = bool(getattr(model, "is_loaded_in_4bit", False))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    try:
        result = mask_dataset(model, tokenizer, dataset, config, progress=is_main_process(),
                              report_dir=cfg.get("output_dir"))
    finally:
        del model
        release_memory()
    description = f"{cfg.base_model} ({'4-bit nf4, compute ' + dtype if quantized else dtype}, {device})"
    run = XTFRun(
        summary=result.summary,
        metrics=result.log_metrics,
        scoring_model=description,
        shards=math.ceil(len(dataset) / SHARD_EXAMPLES),
        seconds=time.perf_counter() - started,
        extra={"quantized": quantized, "report": result.report},
    )
    return result.dataset, run
