"""axolotl integration: `XTFPlugin` (YAML: `plugins: [xtf_plugin.XTFPlugin]`) and its `xtf:` schema `XTFArgs`."""

from xtf_plugin.integrations.axolotl.args import XTFArgs
from xtf_plugin.integrations.axolotl.plugin import XTFPlugin

__all__ = ["XTFArgs", "XTFPlugin"]
