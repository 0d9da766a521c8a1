"""The README stays true: every setting is documented, every example config it names exists."""

from __future__ import annotations

import re
from pathlib import Path

from xtf_plugin.config import XTFConfig

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_settings_table():
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", README, flags=re.MULTILINE))
    assert set(XTFConfig.model_fields) <= documented, set(XTFConfig.model_fields) - documented


def test_named_example_configs_exist():
    root = Path(__file__).resolve().parent.parent
    for name in set(re.findall(r"example_configs/[\w.-]+\.ya?ml", README)):
        assert (root / name).is_file(), name
