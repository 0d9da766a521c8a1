"""xtf_plugin: explainable token-level noise filtering (XTF, arXiv 2602.14536) for axolotl and TRL.

The core (`XTFConfig`, scoring, selection, cache) needs only transformers. The TRL classes and the axolotl
plugin are imported on first use, so `import xtf_plugin` stays light and works without TRL or axolotl installed
(axolotl's `plugins: [xtf_plugin.XTFPlugin]` imports `xtf_plugin`, then reads `XTFPlugin` from it).
"""

from __future__ import annotations

from typing import Any

from xtf_plugin.config import XTFConfig

__version__ = "0.1.0"
__all__ = ["XTFCallback", "XTFConfig", "XTFPlugin", "XTFSFTConfig", "XTFSFTTrainer", "__version__"]

_LAZY = {
    "XTFSFTConfig": "xtf_plugin.integrations.trl",
    "XTFSFTTrainer": "xtf_plugin.integrations.trl",
    "XTFCallback": "xtf_plugin.integrations.trl",
    "XTFPlugin": "xtf_plugin.integrations.axolotl",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xtf_plugin' has no attribute {name!r}")
