"""Scoring survives interruption, is deterministic, splits over processes without changing a bit, and loses
nothing: real `xtf score` subprocesses (SIGKILL included) on a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import gsm8k_rows

REPO = Path(__file__).resolve().parent.parent
SCORE_COLUMNS = ("input_ids", "labels", "xtf_ri", "xtf_kn", "xtf_tr", "xtf_drop")


def write_rows(path: Path, n: int) -> Path:
    """n question/answer rows: the bundled sample, repeated with a numbered prefix past its 200 rows."""
    base = gsm8k_rows(200)
    rows = [
        {"question": (f"Variant {i // len(base)}: " if i >= len(base) else "") + base[i % len(base)]["question"],
         "answer": base[i % len(base)]["answer"]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def score_command(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "xtf_plugin.cli", "score", "--model", str(model_dir), "--data", str(data),
            "--out", str(out), "--quiet", *extra]


def environment(cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "XTF_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **extra}


def run_score(model_dir: Path, data: Path, out: Path, cache: Path, *extra: str, **env: str) -> dict:
    proc = subprocess.run(score_command(model_dir, data, out, *extra), capture_output=True, text=True,
                          env=environment(cache, **env), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def read_columns(out: Path) -> dict[str, list]:
    table = pq.read_table(out / "train.parquet")
    return {name: table.column(name).to_pylist() for name in SCORE_COLUMNS}


def assert_bit_identical(a: dict[str, list], b: dict[str, list]) -> None:
    """Same rows, same ids, labels and reason bits, and scores equal bit for bit (NaN where NaN)."""
    for name in SCORE_COLUMNS:
        assert len(a[name]) == len(b[name]), name
        for row_a, row_b in zip(a[name], b[name], strict=True):
            x, y = np.asarray(row_a, dtype=np.float64), np.asarray(row_b, dtype=np.float64)
            np.testing.assert_array_equal(x, y, err_msg=name)  # treats NaN == NaN


def forward_entries(cache: Path) -> list[Path]:
    # finished entries only: a write in progress is a hidden temporary file in the same folder
    return sorted(p for p in (cache / "forward").glob("*/*.npz") if not p.name.startswith("."))


@pytest.mark.slow
def test_killed_score_resumes_from_finished_shards(tiny_model_dir, tmp_path):
    """SIGKILL `xtf score` after its first shard is cached: nothing is written to --out, and the next run
    takes the finished shard from the cache and gives exactly what an uninterrupted run gives."""
    data = write_rows(tmp_path / "rows.jsonl", 600)  # 3 shards: 256, 256, 88
    cache, out = tmp_path / "cache", tmp_path / "out"
    slow = ("--set", "batch_size=2")  # many small forward passes, so the kill lands mid-run
    proc = subprocess.Popen(score_command(tiny_model_dir, data, out, *slow), env=environment(cache), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not forward_entries(cache) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "scoring finished before it could be interrupted"
    finished = len(forward_entries(cache))
    assert 0 < finished < 3
    assert not out.exists()  # the output folder appears whole or not at all
    resumed = run_score(tiny_model_dir, data, out, cache, *slow)
    assert resumed["cached_shards"] == finished
    fresh_out = tmp_path / "fresh"
    fresh = run_score(tiny_model_dir, data, fresh_out, tmp_path / "fresh-cache", *slow)
    assert fresh["cached_shards"] == 0 and resumed["examples"] == fresh["examples"] == 600
    # the resumed run skipped the finished shards' first passes (one per batch of 2); the prompt gain's second
    # pass comes after every first pass, so the killed run had none cached
    assert fresh["forward_passes"] - resumed["forward_passes"] == 256 * finished // 2
    assert_bit_identical(read_columns(out), read_columns(fresh_out))


def test_two_runs_give_bit_identical_scores_and_masks(tiny_model_dir, tmp_path):
    """Same input, model and settings, two fresh processes without cache: identical bits (CPU)."""
    data = write_rows(tmp_path / "rows.jsonl", 40)
    first, second = tmp_path / "first", tmp_path / "second"
    run_score(tiny_model_dir, data, first, tmp_path / "c1", "--no-cache")
    run_score(tiny_model_dir, data, second, tmp_path / "c2", "--no-cache")
    assert_bit_identical(read_columns(first), read_columns(second))


@pytest.mark.slow
def test_two_processes_score_exactly_like_one(tiny_model_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m xtf_plugin.cli score` (gloo on CPU): the ranks split the forward passes
    of every shard and the output equals the one-process run's bit for bit."""
    data = write_rows(tmp_path / "rows.jsonl", 300)  # two shards, the second one short
    single = run_score(tiny_model_dir, data, tmp_path / "single", tmp_path / "c1", "--set", "batch_size=4",
                       OMP_NUM_THREADS="1")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = [torchrun, "--nproc_per_node", "2", "-m", *score_command(tiny_model_dir, data, tmp_path / "split",
                                                                        "--set", "batch_size=4")[2:]]
    proc = subprocess.run(command, capture_output=True, text=True, env=environment(tmp_path / "c2"), cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    split = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert split["examples"] == single["examples"] == 300
    # 75 batches, then the prompt gain's second pass over some responses; rank 0 ran about half of each (the
    # summary is rank 0's)
    assert 75 < single["forward_passes"] < 150
    assert 0.4 * single["forward_passes"] <= split["forward_passes"] <= 0.6 * single["forward_passes"]
    assert_bit_identical(read_columns(tmp_path / "single"), read_columns(tmp_path / "split"))
    assert len(forward_entries(tmp_path / "c2")) == 2  # rank 0 cached both gathered shards


READ_ONLY_MOUNT = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"'
"""Shell words that mount folder `$0` read-only over itself, inside the mount namespace of `unshare -m`."""


def _read_only_mounts_work(folder: Path) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(["unshare", "-m", "sh", "-c", READ_ONLY_MOUNT + ' && ! touch "$0/probe" 2>/dev/null',
                            str(folder)], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_cache_on_a_read_only_mount_is_read_and_never_written(tiny_model_dir, tmp_path):
    """A cache on a read-only file system (a shared model store): its entries are used, new scores are not
    saved, one warning says so, and the output equals a normal run's."""
    cache = tmp_path / "cache"
    if shutil.which("unshare") is None or not _read_only_mounts_work(tmp_path / "probe"):
        pytest.skip("needs unshare and mount (a mount namespace): not allowed here")
    # the first shard's 256 rows fill the cache; the run on the mount needs them and 44 more
    run_score(tiny_model_dir, write_rows(tmp_path / "first.jsonl", 256), tmp_path / "first", cache)
    entries = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    data, out = write_rows(tmp_path / "rows.jsonl", 300), tmp_path / "out"
    command = ["unshare", "-m", "sh", "-c", READ_ONLY_MOUNT + ' && exec "$@"', str(cache),
               *score_command(tiny_model_dir, data, out)]
    proc = subprocess.run(command, capture_output=True, text=True, env=environment(cache), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("cannot be written") == 1, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cached_shards"] == 1 and summary["examples"] == 300
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == entries  # nothing written, nothing removed
    normal = tmp_path / "normal"
    run_score(tiny_model_dir, data, normal, tmp_path / "normal-cache")
    assert_bit_identical(read_columns(out), read_columns(normal))


@pytest.mark.parametrize("action", ["mask", "remove"])
def test_nothing_lost(tiny_model_dir, tiny_tokenizer, tmp_path, action):
    """Every example comes out, token ids and prompt labels untouched; a response label changes only to
    -100 and only where `xtf_drop` says so. With `action: remove` (the spans preset's) that holds for
    `xtf_input_ids` / `xtf_labels`, and the training columns are those without the dropped tokens."""
    from xtf_plugin.data import read_records, tokenize_records

    data = write_rows(tmp_path / "rows.jsonl", 30)
    out = tmp_path / "out"
    run_score(tiny_model_dir, data, out, tmp_path / "cache", "--set", "drop_ratio=0.5", "--set", f"action={action}")
    before = tokenize_records(read_records(str(data)), tiny_tokenizer, "auto", 2048, source=str(data))
    table = pq.read_table(out / "train.parquet")
    after = {name: table.column(name).to_pylist() for name in table.column_names}
    full = ("xtf_input_ids", "xtf_labels") if action == "remove" else ("input_ids", "labels")
    assert_only_dropped_labels_changed(before.input_ids, before.labels, after[full[0]], after[full[1]],
                                       after["xtf_drop"])
    assert sum(sum(1 for d in row if d) for row in after["xtf_drop"]) > 0  # the check above had work to do
    if action == "remove":
        for ids, labels, all_ids, all_labels, drop in zip(after["input_ids"], after["labels"], after["xtf_input_ids"],
                                                          after["xtf_labels"], after["xtf_drop"], strict=True):
            kept = np.asarray(drop) == 0
            assert ids == np.asarray(all_ids)[kept].tolist() and labels == np.asarray(all_labels)[kept].tolist()


def assert_only_dropped_labels_changed(ids_before, labels_before, ids_after, labels_after, drop) -> None:  # type: ignore[no-untyped-def]
    assert len(ids_after) == len(ids_before) == len(labels_after) == len(drop)
    for a, b, la, lb, d in zip(ids_before, ids_after, labels_before, labels_after, drop, strict=True):
        a, b, la, lb, d = (np.asarray(x) for x in (a, b, la, lb, d))
        np.testing.assert_array_equal(a, b)
        assert (lb[la == -100] == -100).all()  # prompt (untrained) tokens stay untrained
        changed = la != lb
        assert (lb[changed] == -100).all() and (d[changed] != 0).all()
        assert (lb[d != 0] == -100).all()
        assert ((la != -100) & (lb != -100)).any()  # never an example left without a trained token
