"""`XTFSFTConfig`: TRL's `SFTConfig` with one more field, `xtf`.

    XTFSFTConfig(output_dir="out", xtf={"drop_ratio": 0.1})     # Python
    xtf: {drop_ratio: 0.1}                                       # a `--config` YAML of `xtf sft`
    --xtf '{"drop_ratio": 0.1}'   or   --xtf xtf_settings.yaml   # the command line

`xtf` is read once, in `__post_init__`, into an `XTFConfig` (`config.to_xtf_config`): a bad key fails when the
arguments are parsed, naming the key, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from xtf_plugin.config import to_xtf_config


@dataclass
class XTFSFTConfig(SFTConfig):
    """`SFTConfig` plus the XTF settings.

    Args:
        xtf: the XTF settings: an `XTFConfig`, a mapping of `xtf:` keys, a JSON object as a string, or the path
            of a YAML file (its `xtf:` block, or the whole file); None for the defaults (preset `spans`).
            After construction it is always an `XTFConfig`.
        **kwargs: as for `SFTConfig`.
    """

    # a JSON string on the command line is parsed like TRL's own dict-valued fields
    _VALID_DICT_FIELDS = [*SFTConfig._VALID_DICT_FIELDS, "xtf"]

    xtf: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "XTF settings: a JSON object of xtf keys (e.g. '{\"drop_ratio\": 0.1}') or a YAML file with "
            "an xtf: block; default: preset spans. In a --config YAML: an xtf: mapping."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.xtf = to_xtf_config(self.xtf, source="xtf")  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        # the trainer logs and saves its arguments as JSON
        out = super().to_dict()
        out["xtf"] = to_xtf_config(self.xtf).model_dump(mode="json")
        return out
