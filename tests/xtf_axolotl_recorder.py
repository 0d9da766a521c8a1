"""Test-only axolotl plugin: records what the loss sees and what the trainer logs.

Listed after `xtf_plugin.XTFPlugin` in a test config (`plugins: [xtf_plugin.XTFPlugin,
xtf_axolotl_recorder.RecorderPlugin]`, with this folder on PYTHONPATH), it writes to `output_dir`:

- `recorded_batches.jsonl`: per training micro-batch, the `input_ids`, `labels` and (when present)
  `position_ids` / `attention_mask` tensors that reached `compute_loss`, as nested lists;
- `recorded_logs.jsonl`: every `logs` dict the trainer's callbacks received;
- `recorded_model.json`: what was trained (4-bit or not, PEFT or not, trainable parameters).

It changes nothing in training.
"""

from __future__ import annotations

import json
from pathlib import Path

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

BATCHES = "recorded_batches.jsonl"
LOGS = "recorded_logs.jsonl"
MODEL = "recorded_model.json"


def _append(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


class _LogRecorder(TrainerCallback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs is not None:
            _append(self.path, {k: (v if isinstance(v, int | float | str) else str(v)) for k, v in logs.items()})
        return control


class RecorderPlugin(BasePlugin):
    """Records `compute_loss` inputs and trainer logs (see the module docstring)."""

    def add_callbacks_post_trainer(self, cfg, trainer):  # type: ignore[no-untyped-def]
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        return [_LogRecorder(out / LOGS)]

    def post_trainer_create(self, cfg, trainer):  # type: ignore[no-untyped-def]
        model = trainer.model
        info = {
            "is_loaded_in_4bit": bool(getattr(model, "is_loaded_in_4bit", False)),
            "linear_classes": sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}),
            "peft": hasattr(model, "peft_config"),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        (Path(cfg.output_dir) / MODEL).write_text(json.dumps(info))
        path = Path(cfg.output_dir) / BATCHES
        compute_loss = trainer.compute_loss

        def recording_compute_loss(model, inputs, *args, **kwargs):  # type: ignore[no-untyped-def]
            if model.training:
                keys = ("input_ids", "labels", "position_ids", "attention_mask")
                _append(path, {k: inputs[k].tolist() for k in keys if k in inputs})
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = recording_compute_loss
