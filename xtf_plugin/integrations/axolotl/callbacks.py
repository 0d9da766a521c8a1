"""`XTFLogCallback`: puts XTF's fractions into every training log of the axolotl trainer."""

from __future__ import annotations

from transformers import TrainerCallback


class XTFLogCallback(TrainerCallback):
    """Adds `xtf/kept_fraction` and `xtf/dropped_<attribute>` to every training log (the ones with `loss`).

    The plugin moves this callback to the front of the trainer's callback list, so the reporting integrations
    (W&B, TensorBoard, MLflow, the console printer) all see the entries: callbacks share one `logs` dict and
    run in list order.

    Args:
        metrics: the entries to add (the same for the whole run: the mask is fixed before training).
    """

    def __init__(self, metrics: dict[str, float]) -> None:
        self.metrics = dict(metrics)

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs is not None and "loss" in logs:
            logs.update(self.metrics)
            # the trainer appended a copy of `logs` to the history before calling the callbacks
            if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
                state.log_history[-1].update(self.metrics)
        return control
