"""TRL integration: `XTFSFTConfig` + `XTFSFTTrainer`, `XTFCallback` and the `xtf sft` command."""

from xtf_plugin.integrations.trl.callback import XTFCallback
from xtf_plugin.integrations.trl.config import XTFSFTConfig
from xtf_plugin.integrations.trl.trainer import XTFSFTTrainer

__all__ = ["XTFCallback", "XTFSFTConfig", "XTFSFTTrainer"]
