"""Schema of the axolotl YAML keys the plugin adds: one nested `xtf:` block, validated by `XTFConfig`.

axolotl mixes `XTFArgs` into its own config model (`get_input_args`), so a wrong value fails in axolotl's
own validation with the dotted key, e.g. `xtf.drop_ratio  Input should be less than 1`. No `xtf:` block (or
`xtf: null`) leaves the plugin switched off; `xtf: {}` switches it on with the defaults.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from xtf_plugin.config import XTFConfig


class XTFArgs(BaseModel):
    """Top-level mixin that adds the nested `xtf:` field to axolotl's config."""

    xtf: XTFConfig | None = Field(
        default=None,
        json_schema_extra={
            "description": "XTF token filtering (xtf_plugin): the response tokens the base model scores as "
            "noise get label -100. Needs `plugins: [xtf_plugin.XTFPlugin]`."
        },
    )


SOFT_UNSUPPORTED = (
    "xtf.soft: per-token loss weights are not supported in axolotl (the plugin's mask travels in the labels); "
    "remove soft or set it to false"
)
"""The error for `xtf.soft: true` (soft mode needs a loss of its own; `XTFSFTTrainer` has one)."""
