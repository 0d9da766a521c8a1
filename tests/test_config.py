"""`XTFConfig` (defaults, one-line errors naming the key, scorer vs selection settings) and the CLI's
`load_xtf_config_file` (YAML file + `--set` overrides)."""

from __future__ import annotations

import pytest

from xtf_plugin.config import (
    AttributeCaps,
    AttributeWeights,
    XTFConfig,
    XTFConfigError,
    load_xtf_config,
    load_xtf_config_file,
    parse_set_option,
)
from xtf_plugin.errors import XTFError


def config_error(data, source: str = "xtf") -> str:
    """The one-line `XTFConfigError` message that `load_xtf_config(data)` raises."""
    with pytest.raises(XTFConfigError) as info:
        load_xtf_config(data, source=source)
    message = str(info.value)
    assert "\n" not in message, message
    assert isinstance(info.value, XTFError) and isinstance(info.value, ValueError)
    return message


# --- defaults and descriptions --------------------------------------------------------------------


def test_defaults():
    assert load_xtf_config(None) == XTFConfig() == load_xtf_config({})
    assert (XTFConfig().preset, XTFConfig().mode, XTFConfig().drop_ratio) == ("spans", "spans", 0.5)
    # the paper preset holds the field defaults
    config = load_xtf_config({"preset": "paper"})
    assert config.mode == "union"
    assert config.drop_ratio == 0.2
    assert config.kn_p_threshold == 0.95
    assert config.ri_fence_k == 1.5
    assert (config.caps.reasoning, config.caps.novelty, config.caps.relevance) == (0.05, 0.10, 0.05)
    assert (config.weights.reasoning, config.weights.novelty, config.weights.relevance) == (1.0, 1.0, 1.0)
    assert config.weights.enabled() == {"reasoning": True, "novelty": True, "relevance": True}
    assert config.scope == "example"
    assert config.tr_otsu_classes == 5 and config.tr_mask_classes == [0, 1]
    assert config.protect == []
    assert config.ri_layers == "middle" and config.tr_method == "vector" and config.max_length == 2048
    assert config.domain_source == "auto"


@pytest.mark.parametrize("model", [XTFConfig, AttributeWeights, AttributeCaps])
def test_every_field_has_a_description(model):
    assert model.model_fields
    for name, field in model.model_fields.items():
        assert field.description and field.description.strip(), f"{model.__name__}.{name}"


def test_list_defaults_are_not_shared():
    first, second = XTFConfig(), XTFConfig()
    first.protect.append("x")
    assert second.protect == []


# --- one-line errors naming the key ---------------------------------------------------------------


def test_unknown_key_lists_allowed_keys():
    message = config_error({"drop_rato": 0.1})
    assert message.startswith("xtf.drop_rato: unknown key (allowed: ")
    for key in XTFConfig.model_fields:
        assert key in message


def test_nested_unknown_key():
    message = config_error({"weights": {"bogus": 1}})
    assert message == "xtf.weights.bogus: unknown key (allowed: novelty, reasoning, relevance)"
    message = config_error({"caps": {"noveltyy": 0.1}})
    assert message == "xtf.caps.noveltyy: unknown key (allowed: novelty, reasoning, relevance)"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"drop_ratio": 1.0}, "xtf.drop_ratio: Input should be less than 1 (got 1.0)"),
        ({"drop_ratio": -0.1}, "xtf.drop_ratio: Input should be greater than or equal to 0 (got -0.1)"),
        ({"kn_p_threshold": 0}, "xtf.kn_p_threshold: Input should be greater than 0 (got 0)"),
        ({"caps": {"novelty": 2}}, "xtf.caps.novelty: Input should be less than or equal to 1 (got 2)"),
        ({"weights": {"novelty": -1}}, "xtf.weights.novelty: Input should be greater than or equal to 0 (got -1)"),
        ({"mode": "x"}, "xtf.mode: Input should be 'union', 'weighted' or 'spans' (got 'x')"),
        ({"scope": "batch"}, "xtf.scope: Input should be 'example' or 'dataset' (got 'batch')"),
        ({"tr_method": "gain"}, "xtf.tr_method: Input should be 'vector' or 'prompt_gain' (got 'gain')"),
        ({"tr_domain": "x"}, "xtf.tr_domain: Input should be 'auto' or 'words' (got 'x')"),
    ],
)
def test_field_errors(data, expected):
    assert config_error(data) == expected


def test_literal_or_list_field_names_the_plain_key():
    # ri_layers is a Literal or a list of ints: the key is `xtf.ri_layers`, without pydantic's union tags
    message = config_error({"ri_layers": "x"})
    assert message.startswith("xtf.ri_layers: Input should be 'all', 'middle', 'first', 'last' or 'none' (got 'x')")
    assert "literal[" not in message and "list[int]" not in message
    message = config_error({"ri_layers": [1, "a"]})
    assert "xtf.ri_layers.1: Input should be a valid integer" in message and "list[int]" not in message
    assert load_xtf_config({"ri_layers": [0, -1]}).ri_layers == [0, -1]


def test_all_weights_zero():
    message = config_error({"weights": {"reasoning": 0, "novelty": 0, "relevance": 0}})
    assert message.startswith("xtf.weights: all weights are zero")
    assert load_xtf_config({"weights": {"reasoning": 0, "novelty": 0}}).weights.enabled() == {
        "reasoning": False,
        "novelty": False,
        "relevance": True,
    }


def test_invalid_protect_regex():
    message = config_error({"protect": ["^#### .*", "(unclosed"]})
    assert message.startswith("xtf.protect: invalid regular expression '(unclosed'")
    assert load_xtf_config({"protect": ["^#### .*"]}).protect == ["^#### .*"]


def test_cross_field_checks():
    message = config_error({"tr_mask_classes": [1, 5]})
    assert message == "xtf: tr_mask_classes [1, 5] must be below tr_otsu_classes (5)"
    message = config_error({"tr_otsu_classes": 3, "tr_mask_classes": [3]})
    assert message == "xtf: tr_mask_classes [3] must be below tr_otsu_classes (3)"
    assert load_xtf_config({"tr_otsu_classes": 3, "tr_mask_classes": [2, 0, 2]}).tr_mask_classes == [0, 2]
    message = config_error({"tr_domain": "words"})
    assert message == "xtf: tr_domain is 'words' but tr_domain_words is empty"
    # the spans preset scores TR as the prompt gain, which has no domain: words set for it would be ignored
    message = config_error({"tr_domain_words": ["sum"]})
    assert message == ("xtf: tr_domain_words is only read with tr_method: vector (tr_method is prompt_gain, the "
                       "spans preset's): set tr_method: vector, or remove it")
    assert load_xtf_config({"preset": "paper", "tr_domain_words": ["sum"]}).domain_source == "words"
    message = config_error({"tr_method": "vector", "tr_domain": "auto", "tr_domain_words": ["sum"]})
    assert "tr_domain is 'auto' but tr_domain_words is set" in message
    assert load_xtf_config({"tr_method": "vector", "tr_domain_words": ["sum", "total"]}).domain_source == "words"
    assert config_error({"soft": True}) == "xtf: soft: true needs mode: weighted"
    assert load_xtf_config({"soft": True, "mode": "weighted"}).soft is True


def test_source_prefixes_the_key():
    assert config_error({"drop_ratio": 2}, source="cfg.yaml: xtf").startswith("cfg.yaml: xtf.drop_ratio: ")


def test_assignment_is_validated():
    config = XTFConfig()
    with pytest.raises(ValueError):
        config.drop_ratio = 1.5


# --- scorer settings vs selection settings --------------------------------------------------------

SELECTION_CHANGES = [
    {"mode": "weighted"},
    {"mode": "weighted", "scope": "dataset"},
    {"weights": {"novelty": 0}},
    {"drop_ratio": 0.3},
    {"span_fence_k": 2.0},
    {"span_ungrounded_k": 2.0},
    {"caps": {"reasoning": 0.5, "novelty": 0.01}},
    {"protect": ["^#### .*"]},
    {"kn_p_threshold": 0.5},
    {"ri_fence_k": 3.0},
    {"ri_scale": "linear"},
    {"tr_otsu_classes": 3, "tr_mask_classes": [0]},
    {"batch_size": 1},
    # read only by `xtf score`'s tokenisation; the token ids it yields are part of the data fingerprint
    {"max_length": 512},
]


@pytest.mark.parametrize("change", SELECTION_CHANGES)
def test_selection_settings_do_not_change_scorer_settings(change):
    changed = load_xtf_config(change)
    base = XTFConfig(preset=changed.preset)  # a mode other than spans implies the paper preset
    assert changed != base
    assert changed.scorer_settings() == base.scorer_settings()
    assert changed.relevance_settings() == base.relevance_settings()


@pytest.mark.parametrize(
    "change",
    [
        {"ri_layers": "all"},
        {"ri_layers": [0, 1]},
        {"ri_exclude_sink": False},
        {"tr_method": "vector"},
        # the presets score TR differently (spans: the prompt gain, paper: the vector cosine)
        {"preset": "paper"},
    ],
)
def test_scorer_settings_change(change):
    assert load_xtf_config(change).scorer_settings() != XTFConfig().scorer_settings()


@pytest.mark.parametrize(
    "change",
    [{"tr_space": "embedding"}, {"tr_center": False}, {"tr_domain_words": ["sum"]}, {"tr_domain_top_k": 8}],
)
def test_relevance_settings_change(change):
    # vector TR is the paper preset's
    changed, base = load_xtf_config({"preset": "paper", **change}), XTFConfig(preset="paper")
    assert changed.relevance_settings() != base.relevance_settings()
    assert changed.scorer_settings() == base.scorer_settings()


# --- load_xtf_config_file ---------------------------------------------------------------------------------


def test_build_config_without_file():
    assert load_xtf_config_file(None, []) == XTFConfig()


def test_build_config_xtf_block(tmp_path):
    path = tmp_path / "axolotl.yaml"
    path.write_text(
        "base_model: some/model\n"
        "datasets:\n  - path: data.jsonl\n"
        "xtf:\n  mode: weighted\n  drop_ratio: 0.3\n  weights:\n    relevance: 0\n  protect:\n    - '^#### .*'\n"
    )
    config = load_xtf_config_file(str(path), [])
    assert config.mode == "weighted" and config.drop_ratio == 0.3
    assert config.weights.relevance == 0 and config.weights.novelty == 1.0
    assert config.protect == ["^#### .*"]


def test_build_config_top_level_keys(tmp_path):
    path = tmp_path / "xtf.yaml"
    path.write_text("kn_p_threshold: 0.9\ncaps:\n  novelty: 0.2\n")
    config = load_xtf_config_file(str(path), [])
    assert config.kn_p_threshold == 0.9 and config.caps.novelty == 0.2 and config.caps.reasoning == 0.05


def test_build_config_empty_file_and_empty_block(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_xtf_config_file(str(empty), []) == XTFConfig()
    block = tmp_path / "block.yaml"
    block.write_text("xtf:\n")
    assert load_xtf_config_file(str(block), []) == XTFConfig()


def test_set_overrides_are_yaml_typed(tmp_path):
    config = load_xtf_config_file(None, ["weights.novelty=0", "drop_ratio=0.1", "mode=weighted", "protect=['^#### .*']"])
    assert config.weights.novelty == 0 and config.weights.reasoning == 1.0
    assert config.drop_ratio == 0.1 and config.mode == "weighted" and config.protect == ["^#### .*"]
    assert parse_set_option("weights.novelty=0") == (["weights", "novelty"], 0)
    assert parse_set_option("drop_ratio=0.1") == (["drop_ratio"], 0.1)
    assert parse_set_option("tr_center=false") == (["tr_center"], False)
    assert parse_set_option("ri_layers=[0, -1]") == (["ri_layers"], [0, -1])
    assert parse_set_option("cache_dir=") == (["cache_dir"], "")
    # overrides win over the file
    path = tmp_path / "xtf.yaml"
    path.write_text("xtf:\n  drop_ratio: 0.4\n  weights:\n    reasoning: 0.5\n")
    config = load_xtf_config_file(str(path), ["drop_ratio=0.1", "weights.novelty=0"])
    assert config.drop_ratio == 0.1
    assert (config.weights.reasoning, config.weights.novelty, config.weights.relevance) == (0.5, 0, 1.0)


def test_set_errors():
    with pytest.raises(XTFError) as info:
        load_xtf_config_file(None, ["drop_ratio"])
    assert str(info.value) == "--set drop_ratio: expected key=value, e.g. --set drop_ratio=0.1"
    with pytest.raises(XTFError, match="empty key"):
        load_xtf_config_file(None, ["=1"])
    with pytest.raises(XTFError, match="drop_ratio is not a mapping"):
        load_xtf_config_file(None, ["drop_ratio=0.1", "drop_ratio.x=1"])
    with pytest.raises(XTFConfigError) as info:
        load_xtf_config_file(None, ["weights.bogus=1"])
    assert str(info.value).startswith("xtf.weights.bogus: unknown key")


def test_build_config_file_errors(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(XTFError) as info:
        load_xtf_config_file(str(missing), [])
    assert str(info.value) == f"{missing}: no such file"

    bad = tmp_path / "bad.yaml"
    bad.write_text("xtf:\n  drop_ratio: 0.1\n  mode: weighted: yes\n")
    with pytest.raises(XTFError) as info:
        load_xtf_config_file(str(bad), [])
    assert str(info.value) == f"{bad}:3: invalid YAML"

    listing = tmp_path / "list.yaml"
    listing.write_text("- drop_ratio: 0.1\n")
    with pytest.raises(XTFError, match="expected a mapping"):
        load_xtf_config_file(str(listing), [])

    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("xtf:\n  drop_ratio: 1.5\n")
    with pytest.raises(XTFConfigError) as info:
        load_xtf_config_file(str(invalid), [])
    assert str(info.value) == f"{invalid}: xtf.drop_ratio: Input should be less than 1 (got 1.5)"
