"""`XTFPlugin`: XTF token filtering in axolotl, switched on by an `xtf:` block.

    plugins:                   # needed on axolotl 0.19 and 0.20; on 0.21 and newer the installed package's
      - xtf_plugin.XTFPlugin   # entry point registers the plugin for every config
    xtf:
      drop_ratio: 0.2

The plugin is thin. `load_datasets` runs axolotl's own dataset loader (tokenisation, filtering, packing
preparation, the `dataset_prepared_path` cache), scores the training rows with the base model through the
score cache, and returns axolotl's `TrainDatasetMeta` with only the training set's `labels` changed (XTF's
noise tokens set to -100). Everything downstream (packing, `pad_to_sequence_len`, gradient accumulation,
Liger FLCE, Cut Cross Entropy, DeepSpeed, FSDP) sees ordinary labels, so the plugin needs no trainer,
collator or loss of its own. A callback adds `xtf/kept_fraction` and `xtf/dropped_<attribute>` to every
training log.

Without an `xtf:` block every hook is a no-op.
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger

from xtf_plugin.config import XTFConfigError, to_xtf_config
from xtf_plugin.integrations.axolotl.args import SOFT_UNSUPPORTED
from xtf_plugin.integrations.common import XTFLogCallback

# axolotl's logging shows INFO only for loggers under `axolotl` (others: warnings and errors)
LOG = get_logger("axolotl.integrations.xtf")


def xtf_active(cfg: Any) -> bool:
    """Whether the config switches XTF on (an `xtf:` block, possibly empty `{}`)."""
    return cfg.get("xtf") is not None


def lists_xtf_plugin(cfg: Any) -> bool:
    """Whether `plugins:` names `XTFPlugin` (as `xtf_plugin.XTFPlugin`, `xtf_plugin:XTFPlugin` or by its module)."""
    names = [str(name).replace(":", ".") for name in cfg.get("plugins") or []]
    return any(name.startswith("xtf_plugin.") and name.endswith(".XTFPlugin") for name in names)


class XTFPlugin(BasePlugin):
    """axolotl plugin for XTF (explainable token-level noise filtering, arXiv 2602.14536).

    Hooks used: `register` (early checks on the raw YAML), `get_input_args` (the `xtf:` schema),
    `load_datasets` (score and mask the training set), `add_callbacks_pre_trainer` and `post_trainer_create`
    (the log callback, first in the callback list).
    """

    def __init__(self) -> None:
        super().__init__()
        self.run: Any = None  # XTFRun of the last load_datasets in this process
        self.callback: XTFLogCallback | None = None

    def register(self, cfg: dict) -> None:
        """Checks the raw YAML: refuses `rl:`, reward models, `kd_trainer:` and `xtf.soft`, reports a bad `xtf:`
        value in one line."""
        if "xtf" in cfg and cfg.get("xtf") is None:
            LOG.warning("xtf_plugin: the `xtf:` block is empty, so XTF is off; write `xtf: {}` for the defaults")
        if not xtf_active(cfg):
            # (axolotl >= 0.21 registers the installed plugin for every config: silent unless the user listed it)
            if lists_xtf_plugin(cfg):
                LOG.warning("xtf_plugin: XTFPlugin is listed in `plugins:` but there is no `xtf:` block: XTF is off")
            return
        for key in ("rl", "reward_model", "process_reward_model"):
            if cfg.get(key):
                raise XTFConfigError(
                    f"{key}: XTF works on supervised fine-tuning labels and does not support `{key}: "
                    f"{cfg.get(key)}`; remove `{key}:` or the `xtf:` block"
                )
        if cfg.get("kd_trainer"):
            raise XTFConfigError(
                "kd_trainer: the KD plugin's distillation loss keeps the `target_mask` it built from the labels "
                "before XTF masked them, so XTF would filter only its CE term; remove `kd_trainer:` or the `xtf:` block"
            )
        block = cfg.get("xtf")
        if not isinstance(block, dict):
            raise XTFConfigError(f"xtf: expected a mapping of XTF settings (got {block!r})")
        config = to_xtf_config(block)
        if config.soft:
            raise XTFConfigError(SOFT_UNSUPPORTED)

    def get_input_args(self) -> str:
        return "xtf_plugin.integrations.axolotl.args.XTFArgs"

    def load_datasets(self, cfg: Any, preprocess: bool = False) -> Any:
        """axolotl's own loader, then XTF's mask in the training set's `labels`.

        `axolotl preprocess` runs this too, so the expensive scoring happens there once and fills the score
        cache; `axolotl train` then finds every score in the cache, also after a change of selection settings
        (`drop_ratio`, `mode`, `weights`, caps, thresholds, `protect`), and runs no forward pass.
        """
        if not xtf_active(cfg):
            return None
        for key in ("rl", "reward_model", "process_reward_model"):
            if cfg.get(key):
                raise XTFConfigError(f"{key}: XTF does not support `{key}:`; remove it or the `xtf:` block")
        from axolotl.common.datasets import load_datasets

        from xtf_plugin.integrations.axolotl.dataset import mask_train_dataset

        meta = load_datasets(cfg=cfg)
        meta.train_dataset, self.run = mask_train_dataset(cfg, meta.train_dataset)
        if cfg.get("total_supervised_tokens"):
            # axolotl counted the trained tokens before the mask (it only logs them)
            cfg.total_supervised_tokens = int(self.run.summary["response_tokens"] - self.run.summary["dropped_tokens"])
        LOG.info(self.run.line())
        return meta

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list:
        if not xtf_active(cfg):
            return []
        if self.run is None:
            LOG.warning(
                "xtf_plugin: `xtf:` is set but the plugin's load_datasets hook did not run in this process (the "
                "datasets were loaded outside axolotl's plugin manager), so the labels are NOT masked"
            )
            return []
        self.callback = XTFLogCallback(self.run.metrics)
        return [self.callback]

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", None)
        if self.callback is not None and callbacks is not None and self.callback in callbacks:
            # first, so that every reporter (W&B, TensorBoard, the console printer) receives the entries
            callbacks.remove(self.callback)
            callbacks.insert(0, self.callback)
