"""Bad input to `xtf score`: every case either works as a user would expect, or stops with one line on stderr
naming the problem and where it is (key, file, row or line), exit code 2, no traceback, and no output folder
left behind.

Refusals run the CLI as a real subprocess, since what a shell sees (stderr, exit code, stray library output)
is the contract. Cases that must succeed run `main()` in-process like test_cli_score.py: the same code path,
without paying the torch and transformers import for each run (tens of seconds on a busy machine)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import build_model, build_tokenizer, gsm8k_rows

import xtf_plugin
from xtf_plugin.cache import CacheWarning
from xtf_plugin.cli import main

REPO_ROOT = Path(xtf_plugin.__file__).resolve().parent.parent
SCORED_COLUMNS = ("input_ids", "labels", "xtf_ri", "xtf_kn", "xtf_tr", "xtf_drop")


def run_xtf(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m xtf_plugin.cli ARGS` in a fresh interpreter, as a user's shell runs it."""
    # The subprocess must import the code under test, wherever an editable install points.
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "xtf_plugin.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def score(model: Path, data: Path, out: Path, *extra: str | Path) -> subprocess.CompletedProcess[str]:
    return run_xtf("score", "--model", model, "--data", data, "--out", out, "--quiet", *extra)


def assert_clean_error(result: subprocess.CompletedProcess[str], out: Path, *needles: str) -> str:
    """Exit 2, one stderr line `xtf score: error: ...` containing every needle, no traceback, no output."""
    error = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(error.splitlines()) == 1, error
    assert error.startswith("xtf score: error: "), error
    for needle in needles:
        assert needle in error, (needle, error)
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return error


def score_ok(model: Path, data: Path, out: Path, *extra: str | Path) -> dict[str, Any]:
    """`xtf score` in-process; it must succeed. Returns its summary.json."""
    argv = ["score", "--model", model, "--data", data, "--out", out, "--quiet", *extra]
    assert main([str(arg) for arg in argv]) == 0
    return json.loads((out / "summary.json").read_text())


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def scored_columns(out: Path) -> dict[str, np.ndarray]:
    """Each scored column of train.parquet, flattened over all examples."""
    table = pq.read_table(out / "train.parquet")
    return {
        name: np.concatenate([np.asarray(v, dtype=np.float64) for v in table[name].to_pylist()])
        for name in SCORED_COLUMNS
    }


def assert_same_scores(a: Path, b: Path) -> None:
    left, right = scored_columns(a), scored_columns(b)
    for name in SCORED_COLUMNS:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)


@pytest.fixture(autouse=True)
def _isolated_score_cache(cache_dir: Path) -> None:
    """No test here reads or writes the user's score cache (XTF_CACHE reaches the subprocesses)."""


@pytest.fixture
def data3(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "gsm3.jsonl", gsm8k_rows(3))


# --- the data file ----------------------------------------------------------------------------------


def test_missing_data_file(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "nope.jsonl"
    assert_clean_error(score(tiny_model_dir, missing, out), out, str(missing), "no such file")


def test_empty_data_file(tiny_model_dir, tmp_path):
    out, data = tmp_path / "out", tmp_path / "empty.jsonl"
    data.write_text("")
    assert_clean_error(score(tiny_model_dir, data, out), out, str(data), "empty")


def test_blank_lines_only_data_file(tiny_model_dir, tmp_path):
    out, data = tmp_path / "out", tmp_path / "blank.jsonl"
    data.write_text("\n  \n\n")
    assert_clean_error(score(tiny_model_dir, data, out), out, str(data), "no examples")


def test_malformed_json_line_names_the_line(tiny_model_dir, tmp_path):
    out, data = tmp_path / "out", tmp_path / "bad.jsonl"
    rows = [json.dumps(row) for row in gsm8k_rows(3)]
    data.write_text(f'{rows[0]}\n{rows[1]}\n{{"question": "unterminated\n{rows[2]}\n')
    assert_clean_error(score(tiny_model_dir, data, out), out, f"{data}:3:", "malformed JSON")


def test_non_utf8_names_file_and_line(tiny_model_dir, tmp_path):
    out, data = tmp_path / "out", tmp_path / "latin1.jsonl"
    rows = [json.dumps(row).encode() for row in gsm8k_rows(3)]
    rows[1] = json.dumps({"question": "Jos\u00e9 buys 3 apples", "answer": "3"}, ensure_ascii=False).encode("latin-1")
    data.write_bytes(b"\n".join(rows) + b"\n")
    assert_clean_error(score(tiny_model_dir, data, out), out, f"{data}:2:", "UTF-8")


@pytest.mark.parametrize(
    ("rows", "format", "needles"),
    [
        # row 2 lacks the answer: named by row and column
        (
            [{"question": "q1", "answer": "a1"}, {"question": "q2"}],
            "alpaca",
            ["row 2", "missing column answer", "alpaca"],
        ),
        ([{"prompt": "p"}], "prompt-completion", ["row 1", "missing column completion"]),
        ([{"prompt": "p", "completion": "c"}], "messages", ["row 1", "missing column messages"]),
        # auto cannot tell the format from the first row's columns
        ([{"text": "just text"}], "auto", ["row 1", "cannot tell the format", "--format"]),
    ],
)
def test_missing_fields_for_format(tiny_model_dir, tmp_path, rows, format, needles):
    out, data = tmp_path / "out", write_jsonl(tmp_path / "rows.jsonl", rows)
    assert_clean_error(score(tiny_model_dir, data, out, "--format", format), out, str(data), *needles)


def test_empty_response_is_kept_counted_and_named(tiny_model_dir, tmp_path, cache_dir):
    """TRL and axolotl train on an example with an empty answer (its end of sequence), so XTF keeps it,
    counts it in summary.json and names its row in one warning; nothing of it is masked."""
    out = tmp_path / "out"
    rows = [gsm8k_rows(1)[0], {"question": "How many?", "answer": "   "}, {"question": "And now?", "answer": ""}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    result = score(tiny_model_dir, data, out, "--set", "preset=paper")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "empty response" in line]
    assert len(warnings) == 1 and "2 example(s)" in warnings[0] and "(rows 2, 3)" in warnings[0], result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples"] == 3 and summary["examples_empty_response"] == 2
    table = pq.read_table(out / "train.parquet").to_pydict()
    for row in (1, 2):
        trained = [label for label in table["labels"][row] if label != -100]
        assert trained and all(reason == 0 for reason in table["xtf_drop"][row])


def test_entirely_protected_response_is_kept_unmasked(tiny_model_dir, tiny_tokenizer, tmp_path, cache_dir):
    from xtf_plugin.data import tokenize_records

    rows = gsm8k_rows(3)
    rows[1]["answer"] = "#### 42"  # the whole response is the protected answer line
    data, out = write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "out"
    # the paper preset's token tests, so that the other examples of the tiny random model lose tokens
    summary = score_ok(tiny_model_dir, data, out, "--set", "preset=paper", "--set", "protect=['^#### .*']",
                       "--set", "drop_ratio=0.5")
    assert summary["examples"] == 3
    table = pq.read_table(out / "train.parquet").to_pylist()
    original = tokenize_records(rows, tiny_tokenizer).labels[1]
    assert table[1]["labels"] == original.tolist()  # every response token still trained
    assert not any(table[1]["xtf_drop"])
    assert summary["protected_tokens"] >= int((original != -100).sum())
    assert summary["dropped_tokens"] > 0  # the other examples are filtered as usual


def test_longer_than_max_length_is_truncated_and_counted(tiny_model_dir, tiny_tokenizer, tmp_path, cache_dir):
    from xtf_plugin.data import tokenize_records

    rows = gsm8k_rows(6)
    lengths = [len(ids) for ids in tokenize_records(rows, tiny_tokenizer).input_ids]
    max_length = sorted(lengths)[2]
    too_long = sum(n > max_length for n in lengths)
    assert 0 < too_long < len(rows)
    data, out = write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "out"
    summary = score_ok(tiny_model_dir, data, out, "--set", f"max_length={max_length}")
    assert summary["examples"] == len(rows)  # none dropped
    assert summary["examples_truncated"] == too_long
    table = pq.read_table(out / "train.parquet").to_pylist()
    assert [len(r["input_ids"]) for r in table] == [min(n, max_length) for n in lengths]


# --- the model and tokenizer ------------------------------------------------------------------------


def test_model_path_that_does_not_exist(data3, tmp_path):
    out, model = tmp_path / "out", tmp_path / "no-such-model"
    assert_clean_error(score(model, data3, out), out, "--model", str(model), "no such folder")


@pytest.fixture(scope="module")
def no_pad_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("no-pad")
    build_model(directory, build_tokenizer(directory, pad_token=False))
    return directory


@pytest.fixture(scope="module")
def no_template_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("no-template")
    build_model(directory, build_tokenizer(directory, chat_template=False))
    return directory


def test_tokenizer_without_pad_token_scores(no_pad_model_dir, data3, tmp_path, cache_dir):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(no_pad_model_dir).pad_token is None
    out = tmp_path / "out"
    summary = score_ok(no_pad_model_dir, data3, out)
    assert summary["examples"] == 3 and summary["response_tokens"] > 0
    assert np.isfinite(scored_columns(out)["xtf_kn"]).sum() > 0


def test_messages_without_chat_template(no_template_model_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    out, data = tmp_path / "out", write_jsonl(tmp_path / "chat.jsonl", rows)
    assert_clean_error(score(no_template_model_dir, data, out), out, str(data), "row 1", "no chat template")


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory, tiny_model_dir, tiny_tokenizer) -> tuple[Path, str]:
    """The tiny model with the embedding row of '~' set to NaN, and that token's text: only examples that
    contain '~' produce NaN."""
    import torch
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("nan-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    (token,) = tiny_tokenizer("~", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    model.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory, "~"


def test_nan_scores_name_the_example(nan_model_dir, tmp_path, cache_dir):
    directory, poison = nan_model_dir
    rows = gsm8k_rows(3)
    assert not any(poison in row["question"] + row["answer"] for row in rows)
    rows[1]["answer"] += f" {poison}"
    out, data = tmp_path / "out", write_jsonl(tmp_path / "rows.jsonl", rows)
    assert_clean_error(score(directory, data, out), out, "NaN", "example 2")
    assert not list(cache_dir.rglob("*.npz"))  # broken scores are never cached


def test_nan_domain_word_vector_names_the_token(nan_model_dir, tiny_tokenizer, tmp_path, cache_dir):
    """The broken token only as a domain word: the scoring pass is finite, the relevance table is not."""
    directory, poison = nan_model_dir
    rows = gsm8k_rows(3)
    assert not any(poison in row["question"] + row["answer"] for row in rows)
    (token,) = tiny_tokenizer(poison, add_special_tokens=False)["input_ids"]
    out, config = tmp_path / "out", write_config(tmp_path / "xtf.yaml", {"tr_method": "vector", "tr_domain_words": ["sum", poison]})
    result = score(directory, write_jsonl(tmp_path / "rows.jsonl", rows), out, "--config", config)
    assert_clean_error(result, out, "NaN", f"token id {token}", "TR domain words")
    cached = [p.relative_to(cache_dir).parts for p in cache_dir.rglob("*.npz")]
    assert cached and not [parts for parts in cached if "relevance" in parts]  # scores cached, the table not


# --- settings -------------------------------------------------------------------------------------


def write_config(path: Path, xtf: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"xtf": xtf}))
    return path


def test_drop_ratio_out_of_range_via_set(tiny_model_dir, data3, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(score(tiny_model_dir, data3, out, "--set", "drop_ratio=1.5"), out, "xtf.drop_ratio", "1.5")


def test_drop_ratio_out_of_range_via_config_file(tiny_model_dir, data3, tmp_path):
    out, config = tmp_path / "out", write_config(tmp_path / "xtf.yaml", {"drop_ratio": 1.5})
    result = score(tiny_model_dir, data3, out, "--config", config)
    assert_clean_error(result, out, str(config), "xtf.drop_ratio", "1.5")


def test_all_weights_zero(tiny_model_dir, data3, tmp_path):
    out = tmp_path / "out"
    zero = ("--set", "weights.reasoning=0", "--set", "weights.novelty=0", "--set", "weights.relevance=0")
    assert_clean_error(score(tiny_model_dir, data3, out, *zero), out, "xtf.weights", "all weights are zero")


def test_unknown_key_in_config_file(tiny_model_dir, data3, tmp_path):
    out, config = tmp_path / "out", write_config(tmp_path / "xtf.yaml", {"drop_ratio": 0.1, "drop_ration": 0.2})
    result = score(tiny_model_dir, data3, out, "--config", config)
    assert_clean_error(result, out, str(config), "xtf.drop_ration", "unknown key")


@pytest.mark.parametrize("words", [["", "  "], ["\n", "\t"]])
def test_domain_words_that_tokenize_to_nothing(tiny_model_dir, data3, tmp_path, words):
    out, config = tmp_path / "out", write_config(tmp_path / "xtf.yaml", {"tr_domain_words": words})
    result = score(tiny_model_dir, data3, out, "--config", config)
    assert_clean_error(result, out, str(config), "xtf.tr_domain_words")


# --- the score cache ------------------------------------------------------------------------------


def test_cache_from_another_model_is_not_reused(tiny_model_dir, tiny_tokenizer, data3, tmp_path, cache_dir):
    # Same folder, new weights (a re-saved fine-tune): only the weights tell the two models apart.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    score_ok(model, data3, tmp_path / "a")
    build_model(model, tiny_tokenizer, seed=1)
    assert score_ok(model, data3, tmp_path / "b")["cached_shards"] == 0
    assert (
        score_ok(model, data3, tmp_path / "b-fresh", "--set", f"cache_dir={tmp_path / 'fresh-cache'}")["cached_shards"]
        == 0
    )
    assert_same_scores(tmp_path / "b", tmp_path / "b-fresh")
    assert not np.allclose(
        scored_columns(tmp_path / "a")["xtf_kn"], scored_columns(tmp_path / "b")["xtf_kn"], equal_nan=True
    )


def test_truncated_cache_file_is_recomputed(tiny_model_dir, data3, tmp_path, cache_dir):
    score_ok(tiny_model_dir, data3, tmp_path / "first")
    entries = sorted(cache_dir.rglob("*.npz"))
    forward = [p for p in entries if p.relative_to(cache_dir).parts[0] == "forward"]
    assert forward, entries
    with forward[0].open("r+b") as handle:
        handle.truncate(forward[0].stat().st_size // 2)
    with pytest.warns(CacheWarning, match="unusable.*recomputing") as warned:
        summary = score_ok(tiny_model_dir, data3, tmp_path / "second")
    assert any(str(forward[0]) in str(w.message) for w in warned)
    assert summary["cached_shards"] == 0
    assert_same_scores(tmp_path / "first", tmp_path / "second")


# --- the output folder ----------------------------------------------------------------------------


def test_existing_output_needs_overwrite(tiny_model_dir, data3, tmp_path, cache_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    error = score(tiny_model_dir, data3, out)
    assert error.returncode == 2 and "Traceback" not in error.stderr
    assert error.stderr.strip() == f"xtf score: error: {out}: already exists; pass --overwrite to replace it"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    summary = score_ok(tiny_model_dir, data3, out, "--overwrite")
    assert summary["examples"] == 3 and not (out / "keep.txt").exists()


def test_debug_shows_the_traceback(tiny_model_dir, tmp_path):
    result = run_xtf(
        "--debug", "score", "--model", tiny_model_dir, "--data", tmp_path / "nope.jsonl", "--out", tmp_path / "out"
    )
    assert result.returncode != 0 and "Traceback" in result.stderr and "XTFError" in result.stderr
    assert not (tmp_path / "out").exists()
