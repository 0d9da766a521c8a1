"""`XTFConfig`: the one schema behind the YAML `xtf:` block, the CLI and the Python API.

`preset` picks the starting point of every other field (`spans`, the default, or `paper`, whose values are the
field defaults below); keys a user sets override the preset's. Fields fall into two groups, and the split
matters for the score cache:

* scorer settings (`ri_layers`, `ri_exclude_sink`, `tr_*`) change what the model computes; changing one re-runs
  the model (`max_length` only changes the token ids `xtf score` gives the model, which the cache key holds).
  The presets differ in two of them (`tr_method`, `ri_layers`), so a change between `spans` and `paper` (or a
  `mode` that implies `paper`) scores once more;
* selection settings (`mode`, `action`, `weights`, `drop_ratio`, `scope`, `caps`, `kn_p_threshold`, `ri_fence_k`,
  `tr_otsu_classes`, `tr_mask_classes`, `span_fence_k`, `span_ungrounded_k`, `protect`) only change which scored
  tokens are masked; changing them never re-runs the model, except the prompt gain's second pass, which feeds
  only what the selection reads (`selection.prompt_gain_wanted`): a `mode` other than spans, or a `span_*_k`
  lowered to about `selection.GAIN_SPAN_K`, feeds more.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xtf_plugin.errors import XTFError


@dataclass(frozen=True)
class Attribute:
    """One of XTF's three token attributes.

    Attributes:
        name: the attribute (`reasoning`), as in settings (`weights.reasoning`) and summaries.
        short: its score's short name (`RI`), as reports write it.
        field: the score's field of `TokenScores` and column `xtf_<field>` of the output (`ri`).
        bit: the reason bit set in `xtf_drop` when a token is dropped for lacking it (1, 2, 4).
    """

    name: str
    short: str
    field: str
    bit: int


ATTRIBUTE_REGISTRY: tuple[Attribute, ...] = (
    Attribute("reasoning", "RI", "ri", 1),
    Attribute("novelty", "KN", "kn", 2),
    Attribute("relevance", "TR", "tr", 4),
)
"""The one table of the three attributes, in reason-bit order; every other view below derives from it."""

ATTRIBUTES: tuple[str, ...] = tuple(a.name for a in ATTRIBUTE_REGISTRY)
REASON_BITS: dict[str, int] = {a.name: a.bit for a in ATTRIBUTE_REGISTRY}
SHORT_NAMES: dict[str, str] = {a.name: a.short for a in ATTRIBUTE_REGISTRY}
SCORE_FIELDS: tuple[str, ...] = tuple(a.field for a in ATTRIBUTE_REGISTRY)


PRESETS: dict[str, dict[str, Any]] = {
    # The field defaults of XTFConfig: the paper's union of three capped token tests, with the three measured
    # departures that make each test select anything at all (docs/method.md, "How the scores are computed").
    "paper": {},
    # Spans are whole lines, sentences and phrases: taken out of the input they leave a cleaned response, which
    # measured better than masking them in place on both downstream tasks; the prompt gain tells inserted lines
    # from the response's own, at the cost of a second forward pass over the spans it reads it for
    # (benchmarks/README.md). Spans selection never reads RI, so the preset does not pay for the attention capture.
    "spans": {"mode": "spans", "drop_ratio": 0.5, "action": "remove", "tr_method": "prompt_gain", "ri_layers": "none"},
}
"""Preset name -> the settings it gives; keys a user sets override them (mappings merged key by key)."""

DEFAULT_PRESET = "spans"
"""The preset of a config that names none: the one that measured best (benchmarks/README.md, Downstream)."""


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, nested mappings merged key by key."""
    out = dict(base)
    for key, value in override.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AttributeWeights(_Strict):
    """Per-attribute weights: in `union` mode a zero switches the attribute off; in `weighted` mode they
    weight the rank-normalised scores."""

    reasoning: float = Field(1.0, ge=0, description="Weight of reasoning importance (RI, attention received).")
    novelty: float = Field(1.0, ge=0, description="Weight of knowledge novelty (KN, 1 - p(token)).")
    relevance: float = Field(1.0, ge=0, description="Weight of task relevance (TR).")

    @model_validator(mode="after")
    def _not_all_zero(self) -> AttributeWeights:
        if self.reasoning == 0 and self.novelty == 0 and self.relevance == 0:
            raise ValueError("all weights are zero: set at least one of reasoning, novelty, relevance above 0")
        return self

    def enabled(self) -> dict[str, bool]:
        """Attribute name -> whether its weight is non-zero."""
        return {name: getattr(self, name) > 0 for name in ATTRIBUTES}


class AttributeCaps(_Strict):
    """Union mode: the most an attribute may mask, as a fraction of an example's response tokens (the
    official code's `percentage_interest`)."""

    reasoning: float = Field(0.05, ge=0, le=1, description="Cap on RI drops per example (fraction).")
    novelty: float = Field(0.10, ge=0, le=1, description="Cap on KN drops per example (fraction).")
    relevance: float = Field(0.05, ge=0, le=1, description="Cap on TR drops per example (fraction).")


class XTFConfig(_Strict):
    """Settings of XTF token filtering. Every field can be set in YAML (`xtf:` block), with
    `xtf score --set key=value`, or in Python."""

    preset: Literal["paper", "spans"] = Field(
        DEFAULT_PRESET,
        description="Named starting point for every other key, applied when the config is built (keys you set "
        "override it): spans (default) = mask the off-task sentences, lines or phrases of each response and its "
        "repeats, never the task's format; paper = the paper's three token tests, OR-ed, with the official caps (the field "
        "defaults below; also the preset of a config that names mode union or weighted and no preset).",
    )

    # --- selection --------------------------------------------------------------------------------
    mode: Literal["union", "weighted", "spans"] = Field(
        "union",
        description="union: the paper's per-attribute tests, OR-ed; weighted: drop the lowest drop_ratio "
        "fraction of the weighted, rank-normalised combined score; spans: mask the off-task spans (sentences, "
        "lines) of each response, and the runs of spans it says again right after themselves.",
    )
    weights: AttributeWeights = Field(default_factory=AttributeWeights, description="Attribute weights.")
    drop_ratio: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="union: ceiling on the fraction of an example's response tokens that may be masked (0.2); "
        "spans: the same for off-task spans (the spans preset: 0.5), counted on the tokens left after the "
        "response's repeats, which are always masked; weighted: the fraction masked.",
    )
    scope: Literal["example", "dataset"] = Field(
        "example", description="weighted mode: rank and drop per example or across the whole dataset."
    )
    soft: bool = Field(
        False,
        description="weighted mode, XTFSFTTrainer only: weight each response token's loss by its combined score "
        "(in [0, 1]) instead of dropping tokens; not with packing or padding-free batches.",
    )
    action: Literal["mask", "remove"] = Field(
        "mask",
        description="What happens to a selected token: `mask` gives it label -100 and leaves it in the input "
        "(the paper); `remove` also takes it out of the input, as if the response had been cleaned (the spans "
        "preset's choice: its selections are whole sentences, lines and phrases). `XTFCallback`, which only "
        "sees labels, masks.",
    )
    caps: AttributeCaps = Field(default_factory=AttributeCaps, description="Union mode per-attribute caps.")
    kn_p_threshold: float = Field(
        0.95, gt=0, le=1, description="KN: a token lacks novelty when the model's p(token) exceeds this."
    )
    ri_fence_k: float = Field(
        1.5, ge=0, description="RI: a token lacks importance below the per-example fence Q1 - k * IQR."
    )
    ri_scale: Literal["log", "linear"] = Field(
        "log",
        description="RI: scale the Tukey fence is computed on. Attention received spans orders of magnitude "
        "(roughly log-normal); on the linear scale the lower fence is below 0 for almost every example.",
    )
    tr_otsu_classes: int = Field(
        5, ge=2, le=8, description="TR: number of Multi-Otsu classes fitted to the dataset's TR scores."
    )
    tr_mask_classes: list[int] = Field(
        default_factory=lambda: [0, 1],
        description="TR: Multi-Otsu classes (0 = lowest) whose tokens lack relevance. The paper masks only the "
        "second-lowest ([1]) because its lowest class held whitespace symbols; with centred vectors the lowest "
        "class is where off-task tokens land (benchmarks/results/tr_variants.json).",
    )
    span_fence_k: float = Field(
        3.0,
        gt=0,
        description="spans: a span is off-task when its mean surprise (-log p of its word tokens) lies more than "
        "k robust standard deviations (1.4826 MAD) above the median span of the dataset (repeats aside).",
    )
    span_ungrounded_k: float = Field(
        2.5,
        gt=0,
        description="spans with tr_method prompt_gain: a span more than k robust standard deviations above the "
        "median span, below span_fence_k's fence, is off-task too when the prompt makes its words less likely "
        "(prompt gain under -0.1 nats per word): a fluent line inserted into a response, grounded in no prompt.",
    )
    protect: list[str] = Field(
        default_factory=list,
        description="Regular expressions (multiline) over the example text; response tokens they touch are "
        "never masked, e.g. '^#### .*' for GSM8K's answer line.",
    )

    # --- scoring ----------------------------------------------------------------------------------
    ri_layers: Literal["all", "middle", "first", "last", "none"] | list[int] = Field(
        "middle",
        description="RI: decoder layers whose attention is read: all, middle (the middle third), first, last, "
        "a list of indices (negative counts from the end), or none: no RI (xtf_ri is NaN; the spans preset's, "
        "whose selection does not read RI).",
    )
    ri_exclude_sink: bool = Field(
        True,
        description="RI: renormalise each attention row without position 0 (the attention sink), so the "
        "share a query spends on the sink does not scale what the other tokens receive.",
    )
    tr_method: Literal["vector", "prompt_gain"] = Field(
        "vector",
        description="TR: vector = cosine of the token's context-free vector to the domain vector (paper); "
        "prompt_gain = log p(token | prompt, prefix) - log p(token | prefix) (second forward pass; the spans "
        "preset's, whose selection reads it: see span_ungrounded_k).",
    )
    tr_space: Literal["hidden", "embedding"] = Field(
        "hidden",
        description="TR vector space: hidden = last hidden state of the token fed alone (official code); "
        "embedding = the input-embedding row (cheaper).",
    )
    tr_center: bool = Field(
        True,
        description="TR: subtract the mean token vector before the cosine; single-token vectors are strongly "
        "anisotropic and uncentred cosines barely rank anything.",
    )
    tr_domain: Literal["auto", "words"] | None = Field(
        None,
        description="TR domain vector source: auto = frequent content words of the dataset's responses; "
        "words = tr_domain_words. Default: words if tr_domain_words is set, else auto.",
    )
    tr_domain_words: list[str] | None = Field(
        None, description="TR expert words whose mean vector is the domain vector."
    )
    tr_domain_top_k: int = Field(32, ge=1, description="tr_domain auto: how many frequent words to use.")

    # --- run --------------------------------------------------------------------------------------
    max_length: int = Field(2048, ge=2, description="Examples are truncated to this many tokens (counted).")
    batch_size: int = Field(8, ge=1, description="Most examples per scoring forward pass.")
    batch_tokens: int = Field(
        4096,
        ge=1,
        description="Most tokens per scoring forward pass, padding included (an example longer than this is "
        "scored alone; a batch closes before its padding passes 1/8 of this): long examples go a few at a time, "
        "short ones batch_size at a time.",
    )
    cache_dir: str | None = Field(
        None, description="Score cache folder. Default: $XTF_CACHE or ~/.cache/xtf_plugin/scores."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        preset = data.get("preset")
        if preset is None:
            # a user who names another mode gets that mode's preset (weighted mode keeps drop_ratio 0.2, not
            # the spans preset's 0.5)
            default_mode = PRESETS[DEFAULT_PRESET]["mode"]
            preset = DEFAULT_PRESET if data.get("mode", default_mode) == default_mode else "paper"
            data = {**data, "preset": preset}
        # an unknown name is left for the field's own check, which names the allowed values
        return _merged(PRESETS[preset], data) if isinstance(preset, str) and preset in PRESETS else data

    @field_validator("protect")
    @classmethod
    def _compile_protect(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
        return patterns

    @field_validator("tr_domain_words")
    @classmethod
    def _no_blank_words(cls, words: list[str] | None) -> list[str] | None:
        # A blank word tokenises to nothing or to a bare whitespace token, whose vector says nothing about the
        # domain; caught here, before a model is loaded and scored, rather than after.
        blank = [word for word in words or [] if not word.strip()]
        if blank:
            raise ValueError(f"blank words {blank!r}: every domain word needs a non-whitespace character")
        return words

    @field_validator("tr_mask_classes")
    @classmethod
    def _non_empty_classes(cls, classes: list[int]) -> list[int]:
        if not classes or any(c < 0 for c in classes):
            raise ValueError("give at least one class index >= 0")
        return sorted(set(classes))

    @model_validator(mode="after")
    def _consistent(self) -> XTFConfig:
        if self.ri_layers == "none" and self.mode != "spans" and self.weights.reasoning > 0:
            raise ValueError(f"ri_layers is none (the spans preset's) but mode {self.mode} reads RI "
                             "(weights.reasoning > 0): set ri_layers (the paper's: middle) or weights.reasoning: 0")
        if max(self.tr_mask_classes) >= self.tr_otsu_classes:
            raise ValueError(
                f"tr_mask_classes {self.tr_mask_classes} must be below tr_otsu_classes ({self.tr_otsu_classes})"
            )
        if self.tr_domain == "words" and not self.tr_domain_words:
            raise ValueError("tr_domain is 'words' but tr_domain_words is empty")
        if self.tr_domain == "auto" and self.tr_domain_words:
            raise ValueError("tr_domain is 'auto' but tr_domain_words is set: remove one of them")
        if self.tr_method == "prompt_gain" and (self.tr_domain_words or self.tr_domain):
            key = "tr_domain_words" if self.tr_domain_words else "tr_domain"
            raise ValueError(f"{key} is only read with tr_method: vector (tr_method is prompt_gain, the spans "
                             "preset's): set tr_method: vector, or remove it")
        if self.soft and self.mode != "weighted":
            raise ValueError("soft: true needs mode: weighted")
        if self.soft and self.action == "remove":
            raise ValueError("soft: true weights every token and removes none: set action: mask")
        return self

    # --- derived views ----------------------------------------------------------------------------
    @property
    def domain_source(self) -> Literal["auto", "words"]:
        """Where the TR domain vector comes from, after applying the default."""
        if self.tr_domain is not None:
            return self.tr_domain
        return "words" if self.tr_domain_words else "auto"

    def scorer_settings(self) -> dict[str, Any]:
        """The settings that change what the model computes (part of the score cache key)."""
        return {
            "ri_layers": self.ri_layers,
            "ri_exclude_sink": self.ri_exclude_sink,
            "tr_method": self.tr_method,
        }

    def relevance_settings(self) -> dict[str, Any]:
        """The settings of the vector TR score (key of the per-token relevance table)."""
        return {
            "tr_space": self.tr_space,
            "tr_center": self.tr_center,
            "domain_source": self.domain_source,
            "tr_domain_words": self.tr_domain_words,
            "tr_domain_top_k": self.tr_domain_top_k,
        }

    def resolved_cache_dir(self) -> Path:
        """The score cache folder after applying defaults."""
        import os

        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        if os.environ.get("XTF_CACHE"):
            return Path(os.environ["XTF_CACHE"]).expanduser()
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return base / "xtf_plugin" / "scores"


class XTFConfigError(XTFError):
    """A bad `xtf:` setting; the message is one line naming the key."""


def format_validation_error(error: ValidationError, prefix: str = "xtf") -> str:
    """One line per problem, each naming the dotted key, e.g. `xtf.drop_ratio: Input should be less than 1`."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in (prefix, *_key_path(item["loc"])) if part != "")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = f"unknown key (allowed: {', '.join(_allowed_keys(item['loc']))})"
        elif "input" in item and item["type"] not in ("missing",) and item["loc"]:
            # (a model-level check's input is the whole mapping: not repeated)
            message = f"{message} (got {item['input']!r})"
        lines.append(f"{key}: {message}")
    return "; ".join(lines)


def _key_path(loc: tuple[Any, ...]) -> list[Any]:
    """The user's dotted key of an error location, without pydantic's union-member tags such as
    `literal['all','middle','first','last']` or `list[int]` (kept: field names and list indices)."""
    model: type[BaseModel] | None = XTFConfig
    parts: list[Any] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(part)
        elif model is not None:
            parts.append(part)
            field = model.model_fields.get(str(part))
            annotation = field.annotation if field else None
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return parts


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = XTFConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return sorted(model.model_fields)


def load_xtf_config(data: Mapping[str, Any] | None, source: str = "xtf") -> XTFConfig:
    """Validate a mapping into an `XTFConfig`, raising `XTFConfigError` with a one-line message."""
    try:
        return XTFConfig.model_validate(dict(data or {}))
    except ValidationError as error:
        raise XTFConfigError(format_validation_error(error, prefix=source)) from error


def to_xtf_config(value: XTFConfig | Mapping[str, Any] | str | None, source: str = "xtf") -> XTFConfig:
    """The one reading of a user's `xtf` value, wherever it comes from.

    Args:
        value: an `XTFConfig`; a mapping of `xtf:` keys (a YAML block, axolotl's `DictDefault`); a JSON object
            as a string (`--xtf '{"drop_ratio": 0.1}'`); the path of a YAML file (its `xtf:` block, or the
            whole file); None for the defaults.
        source: how an error names where the value came from.
    """
    if isinstance(value, XTFConfig):
        return value
    if value is None:
        return XTFConfig()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as error:
                raise XTFConfigError(f"{source}: not a JSON object ({error.msg}, column {error.colno})") from error
            return load_xtf_config(parsed, source=source)
        if not Path(text).expanduser().is_file():
            raise XTFConfigError(
                f"{source}: {text!r} is neither a JSON object nor a YAML file (e.g. '{{\"drop_ratio\": 0.1}}')"
            )
        return load_xtf_config_file(Path(text).expanduser())
    if hasattr(value, "to_dict"):  # axolotl's DictDefault (None values already dropped)
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise XTFConfigError(f"{source}: expected a mapping of xtf settings, got {type(value).__name__}")
    return load_xtf_config(value, source=source)


def read_yaml_mapping(config_file: str | Path, what: str = "settings") -> dict[str, Any]:
    """A YAML file that must hold a mapping; one-line errors name the file (and the line of a syntax error)."""
    path = Path(config_file)
    if not path.is_file():
        raise XTFError(f"{config_file}: no such file")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise XTFError(f"{config_file}{line}: invalid YAML") from error
    if not isinstance(loaded, dict):
        raise XTFError(f"{config_file}: expected a mapping of {what}")
    return loaded


def parse_set_option(item: str) -> tuple[list[str], Any]:
    """`weights.novelty=0` -> (['weights', 'novelty'], 0); the value is parsed as YAML."""
    if "=" not in item:
        raise XTFError(f"--set {item}: expected key=value, e.g. --set drop_ratio=0.1")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise XTFError(f"--set {item}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_xtf_config_file(config_file: str | Path | None, overrides: Sequence[str] = ()) -> XTFConfig:
    """`XTFConfig` from an optional YAML file (its `xtf:` block, or the whole file) plus dotted `key=value`
    overrides (`xtf score --set`)."""
    data: dict[str, Any] = {}
    source = "xtf"
    if config_file:
        loaded = read_yaml_mapping(config_file, "xtf settings")
        data = dict(loaded.get("xtf", loaded) or {})
        source = f"{config_file}: xtf"
    for item in overrides:
        keys, value = parse_set_option(item)
        node = data
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise XTFError(f"--set {item}: {part} is not a mapping")
        node[keys[-1]] = value
    return load_xtf_config(data, source=source)
