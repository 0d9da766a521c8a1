"""`xtf score` end to end on a tiny local model: the real CLI, the real output files."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import yaml

from xtf_plugin.cli import main


def run_score(model_dir, data, out, *extra):
    return main(["score", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--quiet", *extra])


def test_score_writes_aligned_columns(tiny_model_dir, gsm8k_jsonl, tmp_path, cache_dir):
    out = tmp_path / "scored"
    assert run_score(tiny_model_dir, gsm8k_jsonl, out, "--set", "drop_ratio=0.3") == 0
    rows = pq.read_table(out / "train.parquet").to_pylist()
    assert len(rows) == 12  # one row per input example
    for row in rows:
        n = len(row["input_ids"])
        for column in ("labels", "attention_mask", "xtf_ri", "xtf_kn", "xtf_tr", "xtf_drop"):
            assert len(row[column]) == n, column
        for j in range(n):
            if row["xtf_drop"][j]:
                assert row["labels"][j] == -100
            elif row["labels"][j] != -100:
                assert row["labels"][j] == row["input_ids"][j]
            scored = not math.isnan(row["xtf_kn"][j])
            assert scored == (row["labels"][j] != -100 or row["xtf_drop"][j] != 0) or j == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples"] == 12
    assert summary["dropped_tokens"] == sum(1 for r in rows for d in r["xtf_drop"] if d)
    config = yaml.safe_load((out / "xtf_config.yaml").read_text())
    assert config["xtf"]["drop_ratio"] == 0.3


def test_existing_output_needs_overwrite(tiny_model_dir, gsm8k_jsonl, tmp_path, cache_dir, capsys):
    out = tmp_path / "scored"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    assert run_score(tiny_model_dir, gsm8k_jsonl, out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user file"
    assert run_score(tiny_model_dir, gsm8k_jsonl, out, "--overwrite") == 0
    assert (out / "train.parquet").is_file()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("drop_ratio=1.5", "xtf.drop_ratio"),
        ("weights.bogus=1", "xtf.weights.bogus"),
        ("mode=sometimes", "xtf.mode"),
    ],
)
def test_bad_setting_names_the_key(tiny_model_dir, gsm8k_jsonl, tmp_path, option, message, capsys):
    assert run_score(tiny_model_dir, gsm8k_jsonl, tmp_path / "out", "--set", option) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
