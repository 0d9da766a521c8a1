"""`xtf score` a part of the examples at a time (`pipeline.ScoringRun`): the spans selection is fitted on every
example in a first pass and each part is decided with that fit in a second, so the output is byte for byte the one
of a single part, while only one part's tokens and scores are held. Real CLI, tiny real model, real files; the part
size is made small so that 60 GSM8K rows make several parts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import gsm8k_rows

import xtf_plugin.output as output
import xtf_plugin.pipeline as pipeline
from xtf_plugin.cli import main
from xtf_plugin.config import XTFConfig
from xtf_plugin.data import tokenize_records
from xtf_plugin.models import load_model, load_tokenizer
from xtf_plugin.pipeline import ScoringRun, decides_in_parts, score_dataset

RUN_FIELDS = {"scoring_seconds", "total_seconds", "tokens_per_second", "prompt_gain_seconds", "cached_shards",
              "forward_passes", "tokens_scored_by_model", "prompt_gain_tokens"}
"""What a run cost: time, and the work the cache saved."""
# span fences low enough that some of the tiny random model's spans are off-task
LOOSE = ["--set", "span_fence_k=1.0", "--set", "span_ungrounded_k=0.5", "--set", "drop_ratio=0.5"]


@pytest.fixture
def rows60(tmp_path):
    path = tmp_path / "gsm8k60.jsonl"
    rows = gsm8k_rows(60)
    for row in rows[::7]:  # a response that loops: its second copy is a repeat
        row["answer"] = row["answer"].split("\n")[0] + "\n" + row["answer"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def small_parts(monkeypatch, part_examples):
    """Shards of 4 examples, parts (and row groups) of `part_examples`."""
    monkeypatch.setattr(pipeline, "SHARD_EXAMPLES", 4)
    monkeypatch.setattr(pipeline, "PART_EXAMPLES", part_examples)
    monkeypatch.setattr(output, "ROWS_PER_GROUP", 8)


@pytest.mark.parametrize("extra", [[], ["--no-cache", *LOOSE, "--set", "action=remove"]])
def test_parts_write_the_folder_of_one_part(tiny_model_dir, rows60, tmp_path, cache_dir, monkeypatch, extra):
    written = {}
    for name, part_examples in (("parts", 8), ("one", 10**6)):
        small_parts(monkeypatch, part_examples)
        out = tmp_path / name
        assert main(["score", "--model", str(tiny_model_dir), "--data", str(rows60), "--out", str(out), "--quiet",
                     *extra]) == 0
        written[name] = (out / "train.parquet").read_bytes(), json.loads((out / "summary.json").read_text())
    assert written["parts"][0] == written["one"][0]
    parts, one = written["parts"][1], written["one"][1]
    assert {k: v for k, v in parts.items() if k not in RUN_FIELDS} == {k: v for k, v in one.items() if k not in RUN_FIELDS}
    if extra:  # both computed every score
        assert all(parts[k] == one[k] for k in ("forward_passes", "tokens_scored_by_model", "prompt_gain_tokens"))
        assert one["dropped_spans"]["dropped_spans"] > 0 and one["dropped_spans"]["dropped_repeats"] > 0
        assert one["thresholds"]["off_task_spans"] > 0 and one["forward_passes"] > 0
    else:  # the second run read every shard the first wrote (same shards, same keys)
        assert parts["cached_shards"] == 0 and one["cached_shards"] == 15 and one["forward_passes"] == 0


def test_a_run_holds_one_part_and_decides_it_as_the_whole(tiny_model_dir, monkeypatch):
    """`ScoringRun.parts` asks for one part's tokens at a time, twice each (one pass to fit, one to decide), and
    yields parts whose masks and scores are those of `score_dataset` on the whole dataset."""
    monkeypatch.setattr(pipeline, "SHARD_EXAMPLES", 4)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), device="cpu")
    rows = gsm8k_rows(30)
    config = XTFConfig(preset="spans", span_fence_k=1.0, span_ungrounded_k=0.5, drop_ratio=0.5)
    asked = []

    def part_of(first, last):
        asked.append((first, last))
        return tokenize_records(rows[first:last], tokenizer, "auto", config.max_length, first=first)

    parts = list(ScoringRun(model, tokenizer, config, progress=False, use_cache=False).parts(part_of, len(rows), 8))
    bounds = [(0, 8), (8, 16), (16, 24), (24, 30)]
    assert asked == bounds + bounds and [p.n_examples for p in parts] == [8, 8, 8, 6]
    whole = score_dataset(model, tokenizer, part_of(0, 30), config, progress=False, use_cache=False)
    assert np.array_equal(np.concatenate([p.selection.reasons for p in parts]), whole.selection.reasons)
    assert (whole.selection.reasons > 0).any()
    for name in ("kn", "tr"):
        assert np.array_equal(np.concatenate([getattr(p.scores, name) for p in parts]), getattr(whole.scores, name),
                              equal_nan=True)
    assert parts[-1].stats["response_tokens"] == int(whole.response.sum())
    assert parts[-1].stats["forward_passes"] == whole.stats["forward_passes"]


def test_settings_fitted_on_every_token_take_one_part(tiny_model_dir, monkeypatch):
    """Union mode's TR cuts and weighted mode's ranks are fitted on every token: the whole dataset is one part."""
    assert decides_in_parts(XTFConfig()) and decides_in_parts(XTFConfig(preset="spans"))
    assert not decides_in_parts(XTFConfig(preset="paper")) and not decides_in_parts(XTFConfig(mode="weighted"))
    assert not decides_in_parts(XTFConfig(preset="spans", tr_method="vector"))
    monkeypatch.setattr(pipeline, "SHARD_EXAMPLES", 4)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), device="cpu")
    rows = gsm8k_rows(20)
    data = tokenize_records(rows, tokenizer)
    parts = list(ScoringRun(model, tokenizer, XTFConfig(preset="paper"), progress=False, use_cache=False)
                 .parts(lambda first, last: data, len(rows), 8))
    assert [p.n_examples for p in parts] == [20]
    with pytest.raises(ValueError, match="multiple of 4"):
        list(ScoringRun(model, tokenizer, XTFConfig(), progress=False, use_cache=False)
             .parts(lambda first, last: data, len(rows), 6))
    assert not math.isnan(float(parts[0].scores.kn[parts[0].response][0]))


def test_data_that_changes_between_the_passes_is_refused(tiny_model_dir, monkeypatch):
    """Pass 2 reads the rows again: a part whose tokens are not those pass 1 scored stops the run, naming it."""
    from xtf_plugin.errors import XTFError

    monkeypatch.setattr(pipeline, "SHARD_EXAMPLES", 4)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), device="cpu")
    rows = gsm8k_rows(16)
    asked = []

    def part_of(first, last):
        asked.append(first)
        if len(asked) > 2 and first == 8:  # the file was edited after pass 1 read it
            rows[9] = {**rows[9], "answer": rows[9]["answer"] + " Edited."}
        return tokenize_records(rows[first:last], tokenizer, "auto", 2048, first=first)

    run = ScoringRun(model, tokenizer, XTFConfig(), progress=False, use_cache=False)
    with pytest.raises(XTFError, match="examples 9 to 16 changed while they were scored"):
        list(run.parts(part_of, len(rows), 8))


def tokenized_dataset(tokenizer, n: int, folder=None):
    """A tokenised training set as TRL and axolotl hold it: `input_ids`, `labels`, an aligned `attention_mask`, a
    `length`, and a list column of other lengths; saved and loaded back from `folder` (memory-mapped, with cache
    files) or held in memory."""
    from datasets import Dataset, load_from_disk

    rows = gsm8k_rows(n)
    for row in rows[::7]:
        row["answer"] = row["answer"].split("\n")[0] + "\n" + row["answer"]
    data = tokenize_records(rows, tokenizer)
    dataset = Dataset.from_dict({
        "input_ids": [x.tolist() for x in data.input_ids],
        "attention_mask": [[1] * len(x) for x in data.input_ids],
        "labels": [x.tolist() for x in data.labels],
        "length": [len(x) for x in data.input_ids],
        "tags": [[i, i] for i in range(n)],
    })
    if folder is None:
        return dataset
    dataset.save_to_disk(str(folder))
    return load_from_disk(str(folder))


def expected_rows(dataset, result) -> dict:
    """`dataset` as `result` (`mask_examples` on its rows) says it should be trained: labels with the -100s and, with
    `action: remove`, the kept tokens of `input_ids` and of the aligned `attention_mask`, and their `length`."""
    rows = dataset.to_dict()
    rows["labels"] = [labels.tolist() for labels in result.labels]
    if result.removes_tokens:
        for name in ("input_ids", "attention_mask"):
            if name in rows:
                rows[name] = [np.asarray(row)[kept].tolist() for row, kept in zip(rows[name], result.kept, strict=True)]
        if "length" in rows:
            rows["length"] = [len(labels) for labels in result.labels]
    return rows


@pytest.mark.parametrize("action", ["mask", "remove"])
def test_a_tokenised_dataset_masked_in_parts_equals_one_part(tiny_model_dir, tmp_path, monkeypatch, action):
    """`mask_dataset` (the axolotl path) scores a `datasets.Dataset` a part of the rows at a time and writes the new
    columns to a content-named Arrow file beside the dataset's own: the rows are those `mask_examples` decides on
    the whole dataset at once, for a memory-mapped dataset read through a shuffled index (as axolotl hands it over),
    one whose every column changes, and one held in memory (which stays in memory)."""
    from xtf_plugin.integrations.common import _memory_mapped, mask_dataset, mask_examples

    monkeypatch.setattr(pipeline, "SHARD_EXAMPLES", 4)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), device="cpu")
    config = XTFConfig(preset="spans", span_fence_k=1.0, span_ungrounded_k=0.5, drop_ratio=0.5, action=action,
                       cache_dir=str(tmp_path / "cache"))
    source = tokenized_dataset(tokenizer, 30, tmp_path / "prepared").shuffle(seed=0)
    whole = mask_examples(model, tokenizer, source["input_ids"], source["labels"], config, progress=False)
    expected = expected_rows(source, whole)
    parts = mask_dataset(model, tokenizer, source, config, progress=False, report_dir=tmp_path / "out",
                         part_examples=8)
    one = mask_dataset(model, tokenizer, source, config, progress=False, part_examples=10**6)
    held = tokenized_dataset(tokenizer, 30).shuffle(seed=0)
    assert _memory_mapped(source) and not _memory_mapped(held)  # read through fresh mappings; read as it is
    in_memory = mask_dataset(model, tokenizer, held, config, progress=False, part_examples=8)
    for result in (parts, one, in_memory):
        assert result.dataset.to_dict() == expected
        assert result.dataset.column_names == source.column_names
        assert {k: v for k, v in result.summary.items() if k not in RUN_FIELDS} == \
            {k: v for k, v in whole.summary.items() if k not in RUN_FIELDS}
    assert whole.summary["dropped_tokens"] > 0 and whole.summary["dropped_spans"]["dropped_spans"] > 0
    # axolotl's columns only: every one of them is written anew with `action: remove`
    narrow = source.select_columns(["input_ids", "attention_mask", "labels"])
    assert mask_dataset(model, tokenizer, narrow, config, progress=False, part_examples=8).dataset.to_dict() == \
        {name: expected[name] for name in narrow.column_names}
    if action == "remove":  # the other list column is left as it was
        assert sum(parts.dataset["length"]) < sum(source["length"]) and parts.dataset["tags"] == source["tags"]
    # the new columns: one memory-mapped file beside the dataset's, named by content (both runs wrote the same), and
    # no temporary left
    def columns_files(result) -> set[str]:
        return {Path(f["filename"]).name for f in result.dataset.cache_files if "xtf-columns-" in f["filename"]}

    assert len(columns_files(parts)) == 1 and columns_files(parts) == columns_files(one)
    assert columns_files(parts) <= {p.name for p in (tmp_path / "prepared").iterdir()}
    assert not [p for p in (tmp_path / "prepared").iterdir() if p.name.startswith(".")]
    assert not in_memory.dataset.cache_files
    assert parts.report is not None and "XTF report" in (tmp_path / "out" / "xtf_report.html").read_text()
    assert one.report is None
