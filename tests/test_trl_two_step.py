"""The two-step TRL path: `xtf score` writes a pre-tokenised parquet that unmodified `trl sft` trains on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xtf_plugin.cli import main

BIN = Path(sys.executable).parent


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_trl_sft_trains_on_scored_parquet(tiny_model_dir, gsm8k_jsonl, tmp_path, cache_dir, packing):
    scored = tmp_path / "scored"
    assert main(["score", "--model", str(tiny_model_dir), "--data", str(gsm8k_jsonl), "--out", str(scored), "--quiet"]) == 0
    config = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_name": str(scored),
        "output_dir": str(tmp_path / "run"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "max_length": 256,
        "packing": packing,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "dataloader_num_workers": 0,
    }
    config_path = tmp_path / "sft.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(BIN / "trl"), "sft", "--config", str(config_path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "train_loss" in result.stdout + result.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_sft_trainer_keeps_the_masked_labels(tiny_model_dir, gsm8k_jsonl, tmp_path, cache_dir):
    """TRL uses a pre-tokenised `labels` column as it is: the tokens XTF masked stay masked."""
    import datasets
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    scored = tmp_path / "scored"
    # the paper preset's token tests: the tiny random model's scores then mask tokens in every example
    assert main(["score", "--model", str(tiny_model_dir), "--data", str(gsm8k_jsonl), "--out", str(scored), "--quiet",
                 "--set", "preset=paper", "--set", "drop_ratio=0.4"]) == 0
    rows = pq.read_table(scored / "train.parquet").to_pylist()
    assert sum(d > 0 for row in rows for d in row["xtf_drop"]) > 0
    dataset = datasets.load_dataset(str(scored), split="train")
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        args=SFTConfig(output_dir=str(tmp_path / "run"), max_length=1024, bf16=False, report_to="none"),
        train_dataset=dataset,
    )
    assert trainer.train_dataset["labels"] == [row["labels"] for row in rows]
