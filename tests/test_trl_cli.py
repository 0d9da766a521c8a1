"""`xtf sft`: the real CLI in a subprocess (TRL's parser, accelerate launch, XTFSFTTrainer), QLoRA included."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_xtf_sft(*args: str, cwd: Path = ROOT, **extra_env: str) -> subprocess.CompletedProcess:
    # PYTHONPATH: the processes import this checkout, whatever checkout the environment's editable install names
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), **extra_env}
    return subprocess.run(
        [str(BIN / "xtf"), "sft", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=900
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "model", "extra"),
    [
        # TRL's eval split too (the mixture's train split again), which XTF leaves alone
        ("trl-cpu.yaml", "tiny_model_dir", ["--xtf", '{"preset": "paper", "drop_ratio": 0.3}', "--eval_strategy",
                                            "steps", "--eval_steps", "2", "--dataset_test_split", "train"]),
        # QLoRA: the 4-bit nf4 model (bitsandbytes' CPU kernel) scores with its adapter disabled, then trains
        ("trl-qlora.yaml", "model64_dir", ["--max_length", "256"]),
    ],
)
def test_xtf_sft_trains_with_the_example_configs(config, model, extra, request, tmp_path, cache_dir):
    out = tmp_path / "run"
    result = run_xtf_sft(
        "--config", f"example_configs/{config}", "--model_name_or_path", str(request.getfixturevalue(model)),
        "--output_dir", str(out), "--max_steps", "2", *extra,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "XTF: kept" in log and "xtf/kept_fraction" in log
    assert (out / "adapter_model.safetensors").is_file()
    assert ("eval_loss" in log) == ("--eval_strategy" in extra)


def run_trl_sft(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(BIN / "trl"), "sft", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def hub_errors(stderr: str) -> list[str]:
    """The huggingface_hub exception lines of a run's output (type and message)."""
    return [line for line in stderr.splitlines() if line.startswith("huggingface_hub.errors.")]


def test_push_to_hub_goes_to_the_hub_as_with_trl_sft(tiny_model_dir, tmp_path):
    """`xtf sft` runs TRL's own script, so `--push_to_hub true` reaches the hub exactly as `trl sft` does (here,
    offline, both stop at the same hub call) instead of being accepted and ignored. Same settings for both: the
    example config without its `xtf:` block, which `trl sft` would hand to accelerate as an unknown key."""
    settings = yaml.safe_load((ROOT / "example_configs" / "trl-cpu.yaml").read_text())
    settings.pop("xtf")
    config = tmp_path / "trl.yaml"
    config.write_text(yaml.safe_dump(settings))
    common = ["--config", str(config), "--model_name_or_path", str(tiny_model_dir), "--max_steps", "1",
              "--push_to_hub", "true", "--hub_model_id", "someone/xtf-test"]
    ours = run_xtf_sft(*common, "--output_dir", str(tmp_path / "xtf"))
    theirs = run_trl_sft(*common, "--output_dir", str(tmp_path / "trl"))
    assert ours.returncode != 0 and theirs.returncode != 0
    assert hub_errors(theirs.stderr), theirs.stderr[-2000:]
    assert hub_errors(ours.stderr) == hub_errors(theirs.stderr), ours.stderr[-2000:]


def test_streaming_dataset_is_refused_in_one_line(tmp_path, tiny_model_dir):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"prompt": "1 + 1 =", "completion": " 2"}, {"prompt": "2 + 2 =", "completion": " 4"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_xtf_sft("--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(folder),
                         "--dataset_streaming", "true", "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
                         "--bf16", "false")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "xtf sft: error: xtf: a streaming (iterable) training set cannot be filtered" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--xtf", '{"drop_ratio": 2}'], "xtf.drop_ratio"),
        (["--xtf", '{"bogus": 1}'], "xtf.bogus: unknown key"),
        (["--xtf", "drop_ratio=0.1"], "xtf: 'drop_ratio=0.1' is neither a JSON object nor a YAML file"),
    ],
)
def test_bad_xtf_setting_fails_before_training(tmp_path, extra, message):
    result = run_xtf_sft("--config", "example_configs/trl-cpu.yaml", "--output_dir", str(tmp_path / "run"), *extra)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_key_in_the_yaml_block_names_the_file(tmp_path):
    config = tmp_path / "cfg.yaml"
    text = (ROOT / "example_configs" / "trl-cpu.yaml").read_text().replace("preset: spans", "presets: spans")
    config.write_text(text)
    result = run_xtf_sft("--config", str(config))
    assert result.returncode == 2
    assert f"{config}: xtf.presets: unknown key" in result.stderr


def test_accelerate_arguments_are_removed_where_they_occur():
    from xtf_plugin.integrations.trl.sft import _without_subsequence

    argv = ["--config", "c.yaml", "--max_steps", "2", "--num_processes", "2", "--lora_r", "2"]
    assert _without_subsequence(argv, ["--num_processes", "2"]) == ["--config", "c.yaml", "--max_steps", "2", "--lora_r", "2"]


@pytest.mark.slow
def test_xtf_sft_two_processes(tiny_model_dir, tmp_path, cache_dir):
    """`accelerate launch` underneath, as `trl sft`: two CPU processes (gloo) train one model; the main process
    score together, each running part of the forward passes (one summary line, from the main process)."""
    out = tmp_path / "run"
    result = run_xtf_sft(
        "--config", "example_configs/trl-cpu.yaml", "--model_name_or_path", str(tiny_model_dir),
        "--output_dir", str(out), "--max_steps", "2", "--multi_gpu", "--num_processes", "2", "--use_cpu", "true",
        XTF_VERBOSITY="debug",  # each rank's share of the work too
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert log.count("XTF: kept") == 1
    # the ranks split the forward passes (rank 0's count is in its summary line)
    passes = re.search(r"XTF rank 1: (\d+) forward passes, 0 cached shards", log)
    assert passes and int(passes.group(1)) > 0, log[-3000:]
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in log  # the two processes form one DDP run
    assert "xtf/kept_fraction" in log and (out / "adapter_model.safetensors").is_file()
