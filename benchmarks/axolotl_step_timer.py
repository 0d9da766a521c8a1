"""Benchmark-only axolotl plugin: writes the time of every optimizer step's end to `step_times.jsonl` in
`output_dir` (`plugins: [..., axolotl_step_timer.StepTimerPlugin]`, with `benchmarks/` on PYTHONPATH). It changes
nothing in training."""

from __future__ import annotations

import json
import time
from pathlib import Path

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

STEP_TIMES = "step_times.jsonl"


class _StepClock(TrainerCallback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, event: str, step: int) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"event": event, "step": step, "time": time.perf_counter()}) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._write("train_begin", state.global_step)

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._write("step_end", state.global_step)


class StepTimerPlugin(BasePlugin):
    """Adds the step clock to the trainer."""

    def add_callbacks_post_trainer(self, cfg, trainer):  # type: ignore[no-untyped-def]
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / STEP_TIMES).unlink(missing_ok=True)
        return [_StepClock(out / STEP_TIMES)]
