"""XTF inside axolotl: `XTFPlugin` with real axolotl (its config loader, its CLI in subprocesses), a tiny local
Llama and tokenizer, on CPU.

What the loss saw is recorded by a test-only plugin (`xtf_axolotl_recorder.RecorderPlugin`, listed after
`XTFPlugin`); the expected masked labels are computed here, independently, with `mask_examples` on the rows of
the dataset axolotl prepared (`dataset_prepared_path` holds it unmasked: XTF masks after axolotl's cache).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import build_model, build_tokenizer, gsm8k_rows

pytest.importorskip("axolotl")

from axolotl.cli.config import load_cfg  # noqa: E402
from axolotl.integrations.base import PluginManager  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402

from xtf_plugin.config import XTFConfig, XTFConfigError, to_xtf_config  # noqa: E402
from xtf_plugin.errors import XTFError  # noqa: E402

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
AXOLOTL = Path(sys.executable).parent / "axolotl"
XTF_BLOCK = {"mode": "weighted", "drop_ratio": 0.4}
XTF_LINE = re.compile(r"XTF: scoring model (?P<model>.+?); (?P<examples>\d+) examples.*?forward passes: (?P<passes>\d+), cached shards: (?P<cached>\d+)/(?P<shards>\d+)")


@pytest.fixture(autouse=True)
def reset_plugin_manager():
    """As axolotl's own tests do: plugins registered by one config must not leak into the next (the manager is
    a process-wide singleton; module-level references to it must stay valid, so it is cleared, not replaced)."""
    manager = PluginManager.get_instance()
    manager.plugins.clear()
    manager.cfg = None
    yield
    manager.plugins.clear()
    manager.cfg = None


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 32) and its tokenizer."""
    directory = tmp_path_factory.mktemp("axolotl-tiny")
    build_model(directory, build_tokenizer(directory))
    return directory


def write_alpaca(path: Path, n: int = 16) -> Path:
    """GSM8K rows as an Alpaca JSONL (instruction / input / output)."""
    rows = [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in gsm8k_rows(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def axolotl_config(tmp_path: Path, model_dir: Path, name: str, xtf: dict | None = XTF_BLOCK, recorder: bool = True, **overrides) -> Path:
    """A CPU axolotl config for the tiny model; written to `tmp_path/<name>.yml`."""
    data = tmp_path / "data.jsonl"
    if not data.exists():
        write_alpaca(data)
    cfg: dict = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "val_set_size": 0,
        "sequence_len": 768,
        "sample_packing": False,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 3,
        "num_epochs": 1,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "output_dir": str(tmp_path / f"out-{name}"),
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 0,
        "dataset_num_proc": 1,
    }
    plugins = []
    if xtf is not None:
        plugins.append("xtf_plugin.XTFPlugin")
        cfg["xtf"] = {**xtf, "cache_dir": str(tmp_path / "xtf-cache")}
    if recorder:
        plugins.append("xtf_axolotl_recorder.RecorderPlugin")
    if plugins:
        cfg["plugins"] = plugins
    cfg.update(overrides)
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def axolotl_env() -> dict[str, str]:
    return {
        **os.environ,
        # this checkout first, whatever checkout the environment's editable install names
        "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_axolotl(*args: str | Path) -> str:
    """Runs the real axolotl CLI; returns stdout + stderr (fails the test with the tail on a non-zero exit)."""
    proc = subprocess.run([str(AXOLOTL), *map(str, args)], capture_output=True, text=True, env=axolotl_env(), cwd=REPO,
                          timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"axolotl {' '.join(map(str, args))} failed:\n{output[-6000:]}"
    return output


def xtf_line(output: str) -> dict:
    """The plugin's log line (scoring model, forward passes, cached shards)."""
    found = XTF_LINE.findall(output)
    assert found, f"no XTF scoring line in the output:\n{output[-4000:]}"
    model, examples, passes, cached, shards = found[-1]
    return {"model": model, "examples": int(examples), "passes": int(passes), "cached": int(cached), "shards": int(shards)}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_logs(out: Path) -> list[dict]:
    return [log for log in read_jsonl(out / "recorded_logs.jsonl") if "loss" in log]


def prepared_rows(tmp_path: Path) -> tuple[list[list[int]], list[list[int]]]:
    """input_ids and labels of the (single) dataset axolotl prepared under `dataset_prepared_path`."""
    from datasets import load_from_disk

    folders = [p for p in (tmp_path / "prepared").iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    dataset = load_from_disk(str(folders[0]))
    return dataset["input_ids"], dataset["labels"]


def expected_labels(model_dir: Path, tmp_path: Path, xtf: dict, load_in_4bit: bool = False) -> dict[tuple[int, ...], list[int]]:
    """XTF's masked labels per example (keyed by input_ids), computed here with a cache of its own."""
    from transformers import AutoTokenizer

    from xtf_plugin.integrations.common import mask_examples
    from xtf_plugin.models import load_model

    ids, labels = prepared_rows(tmp_path)
    config = XTFConfig(**xtf, cache_dir=str(tmp_path / "expected-cache"))
    model = load_model(str(model_dir), dtype="float32", load_in_4bit=load_in_4bit, device="cpu")
    result = mask_examples(model, AutoTokenizer.from_pretrained(model_dir), ids, labels, config, progress=False)
    return {tuple(i): lab.tolist() for i, lab in zip(ids, result.labels, strict=True)}


def recorded_examples(out: Path) -> list[tuple[tuple[int, ...], list[int]]]:
    """(input_ids, labels) of every example in every training micro-batch that reached compute_loss; packed
    rows are cut at their position-id restarts, padding (attention_mask 0) is left out."""
    examples = []
    for batch in read_jsonl(out / "recorded_batches.jsonl"):
        for row, ids in enumerate(batch["input_ids"]):
            mask = batch["attention_mask"][row] if "attention_mask" in batch else [1] * len(ids)
            length = sum(1 for m in mask if m)
            assert all(mask[:length]) and not any(mask[length:]), "expected right padding"
            positions = batch.get("position_ids")
            starts = [j for j in range(length) if positions[row][j] == 0] if positions else [0]
            assert starts[0] == 0
            for a, b in zip(starts, [*starts[1:], length], strict=True):
                examples.append((tuple(ids[a:b]), batch["labels"][row][a:b]))
    return examples


def assert_loss_saw(out: Path, expected: dict[tuple[int, ...], list[int]], original: dict[tuple[int, ...], list[int]]) -> int:
    """Every example the loss saw has exactly the expected labels; returns how many tokens XTF masked."""
    examples = recorded_examples(out)
    assert len(examples) >= 6  # 3 steps, 2 examples or more each
    masked = 0
    for ids, labels in examples:
        assert ids in expected, "an example the loss saw is not a row of the prepared dataset"
        assert labels == expected[ids]
        before = original[ids]
        # prompt labels untouched; only trained tokens may become -100
        assert all(new == old or new == -100 for new, old in zip(labels, before, strict=True))
        masked += sum(1 for new, old in zip(labels, before, strict=True) if new == -100 and old != -100)
    return masked


# --- 1. configuration through axolotl's own loader ------------------------------------------------------


def cfg_dict(tmp_path: Path, tiny_dir: Path, **overrides) -> DictDefault:
    path = axolotl_config(tmp_path, tiny_dir, "cfg", recorder=False, **overrides)
    return DictDefault(yaml.safe_load(path.read_text()))


def test_xtf_block_validates_through_load_cfg(tmp_path, tiny_dir):
    cfg = load_cfg(cfg_dict(tmp_path, tiny_dir, xtf={"drop_ratio": 0.3, "weights": {"relevance": 0}, "protect": ["^#### .*"]}))
    assert "xtf_plugin.XTFPlugin" in PluginManager.get_instance().plugins
    assert cfg.xtf.drop_ratio == 0.3
    assert cfg.xtf.weights.relevance == 0
    config = to_xtf_config(cfg.xtf)
    assert config.drop_ratio == 0.3 and config.protect == ["^#### .*"] and (config.preset, config.mode) == ("spans", "spans")
    assert config.cache_dir == str(tmp_path / "xtf-cache")


@pytest.mark.parametrize(
    ("xtf", "key"),
    [({"drop_ratio": 2}, "xtf.drop_ratio"), ({"bogus": 1}, "xtf.bogus"), ({"weights": {"novelty": -1}}, "xtf.weights.novelty")],
)
def test_bad_xtf_value_names_the_key(tmp_path, tiny_dir, xtf, key):
    with pytest.raises(XTFConfigError) as error:
        load_cfg(cfg_dict(tmp_path, tiny_dir, xtf=xtf))
    message = str(error.value)
    assert message.startswith(key) and "\n" not in message


def test_bad_xtf_value_fails_axolotl_schema_too(tmp_path, tiny_dir):
    """axolotl's own schema (the plugin's XTFArgs merged in) rejects the value, naming the dotted key."""
    from axolotl.utils.config import validate_config
    from pydantic import ValidationError

    load_cfg(cfg_dict(tmp_path, tiny_dir))  # registers the plugin
    raw = cfg_dict(tmp_path, tiny_dir, xtf={"drop_ratio": 2})
    with pytest.raises(ValidationError) as error:
        validate_config(raw)
    assert "xtf.drop_ratio" in str(error.value)
    raw = cfg_dict(tmp_path, tiny_dir, xtf={"bogus": 1})
    with pytest.raises(ValidationError) as error:
        validate_config(raw)
    assert "xtf.bogus" in str(error.value)


def test_soft_mode_is_refused(tmp_path, tiny_dir):
    """Soft weights need a loss of their own; the axolotl plugin only masks labels."""
    with pytest.raises(XTFConfigError) as error:
        load_cfg(cfg_dict(tmp_path, tiny_dir, xtf={"mode": "weighted", "soft": True}))
    assert str(error.value).startswith("xtf.soft:")


def test_rl_with_the_plugin_is_refused(tmp_path, tiny_dir):
    with pytest.raises(XTFConfigError) as error:
        load_cfg(cfg_dict(tmp_path, tiny_dir, rl="dpo"))
    message = str(error.value)
    assert message.startswith("rl:") and "dpo" in message and "\n" not in message


def test_knowledge_distillation_is_refused(tmp_path, tiny_dir):
    """The KD plugin's trainer and collator keep the labels, but its distillation term masks with the
    `target_mask` built at tokenisation, before XTF masks the labels: XTF would filter only the CE term."""
    plugins = ["xtf_plugin.XTFPlugin", "axolotl.integrations.kd.KDPlugin"]
    with pytest.raises(XTFConfigError) as error:
        load_cfg(cfg_dict(tmp_path, tiny_dir, kd_trainer=True, plugins=plugins))
    message = str(error.value)
    assert message.startswith("kd_trainer:") and "\n" not in message


def test_without_xtf_block_every_hook_is_a_no_op(tmp_path, tiny_dir):
    raw = cfg_dict(tmp_path, tiny_dir, xtf=None, plugins=["xtf_plugin.XTFPlugin"])
    cfg = load_cfg(raw)
    assert cfg.xtf is None
    plugin = PluginManager.get_instance().plugins["xtf_plugin.XTFPlugin"]
    assert plugin.load_datasets(cfg, preprocess=False) is None
    assert plugin.load_datasets(cfg, preprocess=True) is None
    assert plugin.add_callbacks_pre_trainer(cfg, model=None) == []
    assert plugin.post_trainer_create(cfg, trainer=None) is None


def entry_points_load_plugins() -> bool:
    """axolotl >= 0.21 registers every plugin of the `axolotl.plugins` entry-point group for every config."""
    import axolotl.integrations.base as base

    return hasattr(base, "get_builtin_plugins") and hasattr(base, "PLUGIN_ENTRY_POINT_GROUP")


def test_the_package_declares_the_plugin_as_an_entry_point():
    from importlib.metadata import entry_points

    installed = [p.value for p in entry_points(group="axolotl.plugins")]
    assert "xtf_plugin:XTFPlugin" in installed


def test_xtf_block_without_the_plugin_is_dropped_by_axolotl_019(tmp_path, tiny_dir):
    """axolotl < 0.21 loads only the plugins a config lists and ignores keys no schema declares, so there an
    `xtf:` block without `plugins: [xtf_plugin.XTFPlugin]` vanishes (documented in the integration README)."""
    if entry_points_load_plugins():
        pytest.skip("axolotl >= 0.21 registers the installed plugin for every config")
    raw = cfg_dict(tmp_path, tiny_dir)
    del raw["plugins"]
    assert load_cfg(raw).xtf is None


def test_xtf_block_alone_switches_xtf_on_with_axolotl_021(tmp_path, tiny_dir):
    """axolotl >= 0.21: the installed entry point registers XTFPlugin for every config, so the `xtf:` block
    alone is read, validated (a typo names its key) and acted on; listing the plugin too registers it once."""
    import axolotl.integrations.base as base

    if not entry_points_load_plugins():
        pytest.skip("axolotl < 0.21 loads only the plugins a config lists")
    base.reset_plugin_entry_points_cache()
    raw = cfg_dict(tmp_path, tiny_dir)
    del raw["plugins"]
    cfg = load_cfg(raw)
    assert cfg.xtf is not None and cfg.xtf["drop_ratio"] == XTF_BLOCK["drop_ratio"]
    assert "xtf_plugin.XTFPlugin" in PluginManager.get_instance().plugins
    with pytest.raises(Exception, match="xtf.drop_ratio"):
        load_cfg(DictDefault({**raw, "xtf": {**XTF_BLOCK, "drop_ratio": 2}}))
    PluginManager.get_instance().plugins.clear()
    load_cfg(cfg_dict(tmp_path, tiny_dir, plugins=["xtf_plugin.XTFPlugin"]))
    assert [name for name in PluginManager.get_instance().plugins if "XTFPlugin" in name] == ["xtf_plugin.XTFPlugin"]


def test_remove_takes_the_selected_tokens_out_of_the_rows(tmp_path, tiny_dir):
    """`action: remove`: every column aligned with `input_ids` loses the selected tokens; position ids restart."""
    from axolotl.common.datasets import load_datasets

    cfg = load_cfg(cfg_dict(tmp_path, tiny_dir, xtf={"preset": "paper", "action": "remove"}))
    original = load_datasets(cfg=cfg).train_dataset
    plugin = PluginManager.get_instance().plugins["xtf_plugin.XTFPlugin"]
    cleaned = plugin.load_datasets(cfg, preprocess=False).train_dataset
    removed = plugin.run.summary["dropped_tokens"]
    assert removed > 0
    assert sum(map(len, cleaned["input_ids"])) == sum(map(len, original["input_ids"])) - removed
    for row in cleaned:
        n = len(row["input_ids"])
        assert len(row["labels"]) == n and len(row["attention_mask"]) == n
        if "position_ids" in row:
            assert row["position_ids"] == list(range(n))
        if "length" in row:
            assert row["length"] == n


@pytest.mark.slow
def test_train_with_sample_packing_on_removed_tokens(tmp_path, tiny_dir):
    """`axolotl train` with `sample_packing` and `action: remove`: every example the loss saw, cut out of its
    packed row at the position-id restarts, is an example with the selected tokens taken out, its labels XTF's."""
    from transformers import AutoTokenizer

    from xtf_plugin.integrations.common import mask_examples
    from xtf_plugin.models import load_model

    xtf = {"preset": "paper", "action": "remove"}  # the tiny random model selects many tokens under the paper's tests
    cfg = axolotl_config(tmp_path, tiny_dir, "remove", xtf=xtf, sample_packing=True, pad_to_sequence_len=True)
    output = run_axolotl("train", cfg, "--launcher", "python")
    assert xtf_line(output)["examples"] == 16
    ids, labels = prepared_rows(tmp_path)
    model = load_model(str(tiny_dir), dtype="float32", device="cpu")
    result = mask_examples(model, AutoTokenizer.from_pretrained(tiny_dir), ids, labels,
                           XTFConfig(**xtf, cache_dir=str(tmp_path / "expected-cache")), progress=False)
    expected = {tuple(np.asarray(i)[k].tolist()): lab.tolist() for i, k, lab in zip(ids, result.kept, result.labels, strict=True)}
    assert sum(int((~k).sum()) for k in result.kept) > 0  # tokens were removed
    seen = recorded_examples(tmp_path / "out-remove")
    assert len(seen) >= 6
    for example_ids, example_labels in seen:
        assert example_ids in expected, "an example the loss saw is not a cleaned row"
        assert example_labels == expected[example_ids]


def test_plugin_is_a_lazy_attribute_of_the_package():
    """axolotl's `load_plugin("xtf_plugin.XTFPlugin")` imports `xtf_plugin` and reads the attribute; a bare
    `import xtf_plugin` imports neither axolotl nor TRL."""
    from axolotl.integrations.base import load_plugin

    from xtf_plugin.integrations.axolotl import XTFPlugin

    assert type(load_plugin("xtf_plugin.XTFPlugin")) is XTFPlugin
    code = "import sys, xtf_plugin; assert not {'axolotl', 'trl'} & set(sys.modules), sorted(sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]


def test_unloadable_scoring_model_names_base_model(tmp_path, tiny_dir):
    """A base model whose weights cannot be loaded (here: config and tokenizer, no weights) fails in one line
    naming `base_model`."""
    import shutil

    broken = tmp_path / "no-weights"
    broken.mkdir()
    for item in tiny_dir.iterdir():
        if not item.name.endswith(".safetensors"):
            shutil.copy(item, broken / item.name)
    cfg = load_cfg(cfg_dict(tmp_path, broken))
    with pytest.raises(XTFError) as error:
        PluginManager.get_instance().load_datasets(cfg, preprocess=False)
    message = str(error.value)
    assert message.startswith("base_model:") and str(broken) in message and "\n" not in message


def test_scorer_grows_embeddings_deterministically(tmp_path, tiny_dir):
    """A tokenizer with added tokens (axolotl's `tokens:`) gets matching embeddings in the scorer, the same on
    every load, so the score cache keeps hitting."""
    import torch
    from transformers import AutoTokenizer

    from xtf_plugin.cache import model_fingerprint
    from xtf_plugin.integrations.axolotl.dataset import load_scoring_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.add_tokens(["<calc>", "</calc>"])
    cfg = DictDefault({"base_model": str(tiny_dir), "torch_dtype": torch.float32})
    first = load_scoring_model(cfg, tokenizer, "cpu")
    second = load_scoring_model(cfg, tokenizer, "cpu")
    assert first.get_input_embeddings().num_embeddings == len(tokenizer)
    assert first.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert model_fingerprint(first) == model_fingerprint(second)


# --- 2. end to end with the real CLI ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_preprocess_then_train(tmp_path, tiny_dir, packing):
    # axolotl turns pad_to_sequence_len on for packing when it is unset; written out so that this stays covered
    padding = {"pad_to_sequence_len": True} if packing else {}
    cfg = axolotl_config(tmp_path, tiny_dir, "xtf", sample_packing=packing, **padding)
    out = tmp_path / "out-xtf"

    # preprocess tokenises, saves axolotl's prepared dataset and scores it (filling the score cache)
    scored = xtf_line(run_axolotl("preprocess", cfg))
    assert scored["examples"] == 16 and scored["passes"] > 0 and scored["cached"] == 0

    # train: every score from the cache, labels masked, fractions in every log
    output = run_axolotl("train", cfg, "--launcher", "python")
    trained = xtf_line(output)
    assert trained["passes"] == 0 and trained["cached"] == trained["shards"] == 1
    assert "xtf/kept_fraction" in output  # the console log
    assert (out / "xtf_report.html").is_file()
    logs = train_logs(out)
    assert len(logs) == 3
    kept = logs[0]["xtf/kept_fraction"]
    assert 0.5 < kept < 0.7  # weighted mode, drop_ratio 0.4
    for log in logs:
        assert log["xtf/kept_fraction"] == kept
        assert {"xtf/dropped_reasoning", "xtf/dropped_novelty", "xtf/dropped_relevance"} <= set(log)

    ids, labels = prepared_rows(tmp_path)
    original = {tuple(i): lab for i, lab in zip(ids, labels, strict=True)}
    expected = expected_labels(tiny_dir, tmp_path, XTF_BLOCK)
    assert assert_loss_saw(out, expected, original) > 0

    if packing:
        # every packed row was padded to sequence_len, the padding with label -100
        for batch in read_jsonl(out / "recorded_batches.jsonl"):
            for row, labels in enumerate(batch["labels"]):
                assert len(labels) == 768
                length = sum(1 for m in batch["attention_mask"][row] if m)
                assert length < 768 and set(labels[length:]) == {-100}
        return

    # a selection-only change (drop_ratio) reuses every score: no forward pass
    cfg_02 = axolotl_config(tmp_path, tiny_dir, "xtf02", xtf={**XTF_BLOCK, "drop_ratio": 0.2})
    output = run_axolotl("train", cfg_02, "--launcher", "python")
    rerun = xtf_line(output)
    assert rerun["passes"] == 0 and rerun["cached"] == 1
    assert train_logs(tmp_path / "out-xtf02")[0]["xtf/kept_fraction"] > kept
    assert_loss_saw(tmp_path / "out-xtf02", expected_labels(tiny_dir, tmp_path, {**XTF_BLOCK, "drop_ratio": 0.2}), original)

    # the same run without the plugin trains on the unmasked labels, and its loss differs
    baseline_cfg = axolotl_config(tmp_path, tiny_dir, "baseline", xtf=None)
    output = run_axolotl("train", baseline_cfg, "--launcher", "python")
    # no scoring, no summary, no report (on axolotl >= 0.21 the installed plugin is registered, and idle)
    assert "XTF: " not in output and "xtf/kept_fraction" not in output
    baseline = tmp_path / "out-baseline"
    assert assert_loss_saw(baseline, original, original) == 0
    assert abs(train_logs(baseline)[-1]["loss"] - logs[-1]["loss"]) > 1e-3
    assert "xtf/kept_fraction" not in train_logs(baseline)[-1]


RANKS_SCRIPT = """
import hashlib, json, os, sys


def main():
    from accelerate import PartialState

    # On CPU accelerate is multi-process only when asked (cpu=True: gloo); on GPUs axolotl's PartialState is.
    state = PartialState(cpu=True)
    import torch

    if not torch.cuda.is_available():
        # load_cfg's GPU peer-to-peer probe (several processes) catches the AssertionError of a CPU-only torch,
        # not the RuntimeError of a CUDA build on a machine without a driver (axolotl 0.21 on Python 3.12)
        import axolotl.utils.environment

        axolotl.utils.environment.check_cuda_p2p_support = lambda: True
    from axolotl.cli.config import load_cfg
    from axolotl.integrations.base import PluginManager

    cfg = load_cfg(sys.argv[1])
    meta = PluginManager.get_instance().load_datasets(cfg, preprocess=False)
    run = PluginManager.get_instance().plugins["xtf_plugin.XTFPlugin"].run
    digest = hashlib.sha256(json.dumps(list(meta.train_dataset["labels"])).encode()).hexdigest()
    result = {"backend": state.backend, "processes": state.num_processes, "rows": len(meta.train_dataset),
              "forward_passes": run.summary["forward_passes"], "cached_shards": run.summary["cached_shards"],
              "labels": digest}
    with open(os.path.join(sys.argv[2], f"rank{state.process_index}.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":  # datasets starts helper processes with spawn, which re-imports this file
    main()
"""


@pytest.mark.slow
def test_axolotl_021_cli_with_the_xtf_block_alone(tmp_path, tiny_dir):
    """`axolotl preprocess` on axolotl >= 0.21 with no `plugins:` at all: the installed entry point registers
    XTFPlugin, and the `xtf:` block alone scores and masks."""
    if not entry_points_load_plugins():
        pytest.skip("axolotl < 0.21 loads only the plugins a config lists")
    cfg = axolotl_config(tmp_path, tiny_dir, "alone", recorder=False)
    settings = yaml.safe_load(cfg.read_text())
    del settings["plugins"]
    cfg.write_text(yaml.safe_dump(settings, sort_keys=False))
    scored = xtf_line(run_axolotl("preprocess", cfg))
    assert scored["examples"] == 16 and scored["passes"] > 0


@pytest.mark.slow
def test_two_processes_split_the_scoring(tmp_path, tiny_dir):
    """Two processes (torchrun, gloo on CPU) run the hook together: each runs part of the forward passes, the
    scores are gathered, and both end with the same masked labels."""
    cfg = axolotl_config(tmp_path, tiny_dir, "ranks", recorder=False)
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", str(script), str(cfg), str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert first["backend"] == "gloo" and first["processes"] == 2
    assert first["forward_passes"] > 0 and second["forward_passes"] > 0
    assert first["cached_shards"] == second["cached_shards"] == 0
    assert first["rows"] == second["rows"] == 16 and first["labels"] == second["labels"]


# --- 3. QLoRA for real on CPU ------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_preprocess_resumes_from_finished_shards(tmp_path, tiny_dir):
    """SIGKILL `axolotl preprocess` after XTF cached its first shard: the next preprocess takes the finished
    shards from the cache and scores only the rest, and every cache entry equals an uninterrupted run's."""
    base = gsm8k_rows(200)
    rows = [{"instruction": f"Variant {i // 200}: {base[i % 200]['question']}", "input": "",
             "output": base[i % 200]["answer"]} for i in range(600)]  # 3 shards: 256, 256, 88
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    xtf = {**XTF_BLOCK, "batch_size": 2}  # many small forward passes, so the kill lands mid-run
    cfg = axolotl_config(tmp_path, tiny_dir, "xtf", xtf=xtf, recorder=False)
    cache = tmp_path / "xtf-cache"

    def entries(folder: Path) -> list[Path]:  # finished entries only: a write in progress is a hidden temporary
        return sorted(p.relative_to(folder) for p in (folder / "forward").glob("*/*.npz") if not p.name.startswith("."))

    proc = subprocess.Popen([str(AXOLOTL), "preprocess", str(cfg)], env=axolotl_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 500
    while not entries(cache) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "preprocess finished before it could be interrupted"
    finished = len(entries(cache))
    assert 0 < finished < 3
    resumed = xtf_line(run_axolotl("preprocess", cfg))
    assert resumed["examples"] == 600 and resumed["shards"] == 3 and resumed["cached"] == finished
    assert resumed["passes"] == (600 - 256 * finished) // 2
    expected_labels(tiny_dir, tmp_path, xtf)  # scores the prepared rows afresh, into a cache of its own
    fresh = tmp_path / "expected-cache"
    assert entries(cache) == entries(fresh) and len(entries(fresh)) == 3
    for entry in entries(fresh):
        with np.load(cache / entry) as a, np.load(fresh / entry) as b:
            assert sorted(a.files) == sorted(b.files)
            for name in a.files:
                np.testing.assert_array_equal(a[name], b[name], err_msg=f"{entry}: {name}")


@pytest.mark.slow
def test_qlora_scores_with_the_4bit_model(tmp_path, model64_dir):
    model_dir = model64_dir  # hidden size 64: bitsandbytes quantises it to 4 bits
    cfg = axolotl_config(
        tmp_path,
        model_dir,
        "qlora",
        adapter="qlora",
        load_in_4bit=True,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_target_linear=True,
        lora_mlp_kernel=False,
        lora_qkv_kernel=False,
        lora_o_kernel=False,
    )
    output = run_axolotl("train", cfg, "--launcher", "python")
    scored = xtf_line(output)
    assert "4-bit nf4" in scored["model"] and scored["passes"] > 0
    out = tmp_path / "out-qlora"
    trained = json.loads((out / "recorded_model.json").read_text())
    assert trained["is_loaded_in_4bit"] and trained["peft"] and "Linear4bit" in trained["linear_classes"]
    logs = train_logs(out)
    assert len(logs) == 3 and all("xtf/kept_fraction" in log for log in logs)
    ids, labels = prepared_rows(tmp_path)
    original = {tuple(i): lab for i, lab in zip(ids, labels, strict=True)}
    # the labels the loss saw are the ones the 4-bit model's scores give
    assert assert_loss_saw(out, expected_labels(model_dir, tmp_path, XTF_BLOCK, load_in_4bit=True), original) > 0


# --- 4. the example configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "example_configs").glob("axolotl-*.yml")), ids=lambda p: p.name)
def test_example_config_validates(path):
    """Each axolotl example validates against axolotl's schema with the plugin's `xtf:` block merged in (the
    models and datasets they name are not downloaded: `load_cfg` would fetch the model config)."""
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config

    raw = DictDefault(yaml.safe_load(path.read_text()))
    assert raw.plugins == ["xtf_plugin.XTFPlugin"] and raw.xtf is not None
    prepare_plugins(raw)
    cfg = validate_config(raw)
    assert cfg.xtf is not None
    to_xtf_config(cfg.xtf)
