"""Score cache: selection-only changes never run the model; broken or foreign entries are recomputed."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import build_model, gsm8k_rows

from xtf_plugin.cache import CacheWarning, ScoreCache
from xtf_plugin.config import XTFConfig
from xtf_plugin.data import tokenize_records
from xtf_plugin.pipeline import score_dataset


class ForwardCounter:
    """Counts real forward calls of a model's decoder."""

    def __init__(self, model):
        self.calls = 0
        model.get_decoder().register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1


@pytest.fixture
def data(tiny_tokenizer):
    return tokenize_records(gsm8k_rows(6), tiny_tokenizer)


def score(model, tokenizer, data, cache_dir, **settings):
    counter = ForwardCounter(model)
    scored = score_dataset(model, tokenizer, data, XTFConfig(cache_dir=str(cache_dir), **settings), progress=False)
    return scored, counter.calls


def cache_files(cache_dir):
    return sorted(p for p in cache_dir.rglob("*") if p.is_file())


def test_selection_change_reuses_cache_without_running_the_model(tiny_model, tiny_tokenizer, data, cache_dir):
    first, calls = score(tiny_model, tiny_tokenizer, data, cache_dir, preset="paper", drop_ratio=0.1)
    assert calls > 0
    second, calls = score(tiny_model, tiny_tokenizer, data, cache_dir, preset="paper", drop_ratio=0.3,
                          mode="weighted", weights={"novelty": 0})
    assert calls == 0
    assert second.stats["cached_shards"] == 1
    for name in ("ri", "kn", "tr"):
        np.testing.assert_array_equal(getattr(first.scores, name), getattr(second.scores, name))
    assert (second.selection.reasons > 0).sum() > (first.selection.reasons > 0).sum()
    assert not [p for p in cache_files(cache_dir) if p.name.startswith(".tmp-")]


def test_scorer_setting_or_other_weights_rescore(tiny_model, tiny_tokenizer, tiny_model_dir, data, cache_dir, tmp_path):
    score(tiny_model, tiny_tokenizer, data, cache_dir)
    _, calls = score(tiny_model, tiny_tokenizer, data, cache_dir, ri_layers="first")
    assert calls > 0
    other = build_model(tmp_path / "other", tiny_tokenizer, seed=1)
    _, calls = score(other, tiny_tokenizer, data, cache_dir)
    assert calls > 0


def test_truncated_entry_is_detected_and_recomputed(tiny_model, tiny_tokenizer, data, cache_dir):
    first, _ = score(tiny_model, tiny_tokenizer, data, cache_dir)
    entries = [p for p in cache_files(cache_dir) if "forward" in p.parts]
    assert len(entries) == 1
    blob = entries[0].read_bytes()
    entries[0].write_bytes(blob[: len(blob) // 2])
    with pytest.warns(CacheWarning, match="unusable"):
        again, calls = score(tiny_model, tiny_tokenizer, data, cache_dir)
    assert calls > 0
    np.testing.assert_array_equal(first.scores.kn, again.scores.kn)
    # the recomputed entry is whole again
    _, calls = score(tiny_model, tiny_tokenizer, data, cache_dir)
    assert calls == 0


def test_entry_written_for_other_inputs_is_rejected(tmp_path):
    cache = ScoreCache(tmp_path)
    cache.save("forward", "a" * 64, {"x": np.arange(3)})
    # an entry copied under another key's name must not be trusted
    cache.path("forward", "b" * 64).parent.mkdir(parents=True, exist_ok=True)
    cache.path("forward", "a" * 64).rename(cache.path("forward", "b" * 64))
    with pytest.warns(CacheWarning, match="different inputs"):
        assert cache.load("forward", "b" * 64, ("x",)) is None
    assert not cache.path("forward", "b" * 64).exists()


def test_disabled_adapter_weights_are_not_part_of_the_key(tiny_model_dir, tiny_tokenizer, data, cache_dir):
    """Scoring a LoRA model under disable_adapter() reuses the base model's entries, whatever the adapter holds
    (ranks of one run initialise their adapters differently)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from xtf_plugin.integrations.common import base_model_for_scoring

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    score(base, tiny_tokenizer, data, cache_dir)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"))
    with base_model_for_scoring(peft) as scorer:
        _, calls = score(scorer, tiny_tokenizer, data, cache_dir)
    assert calls == 0
    _, calls = score(peft, tiny_tokenizer, data, cache_dir)  # adapters active: a different model
    assert calls > 0


def test_temporaries_of_killed_writers_are_removed_after_a_day(tmp_path):
    """A writer killed between mkstemp and rename leaves `.tmp-*.npz`; the next write into that folder deletes
    it once it is a day old, and leaves a younger one (possibly another process's write in progress)."""
    import os
    import time

    cache = ScoreCache(tmp_path)
    folder = cache.path("forward", "ab" + "0" * 62).parent
    folder.mkdir(parents=True)
    stale, fresh = folder / ".tmp-old.npz", folder / ".tmp-new.npz"
    for tmp in (stale, fresh):
        tmp.write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(stale, (two_days_ago, two_days_ago))
    cache.save("forward", "ab" + "1" * 62, {"x": np.arange(3)})
    assert not stale.exists() and fresh.exists()
    np.testing.assert_array_equal(cache.load("forward", "ab" + "1" * 62, ["x"])["x"], np.arange(3))


def test_two_processes_sharing_a_cache_never_corrupt_it(tiny_model_dir, gsm8k_jsonl, tmp_path):
    """Two `xtf score` runs on the same data and cache folder at the same time (two jobs, or ranks that are not
    one process group): every entry both write is whole, and both outputs equal a single run's, bit for bit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pyarrow.parquet as pq

    shared = tmp_path / "shared-cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XTF_CACHE": str(shared),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

    def command(out):
        return [sys.executable, "-m", "xtf_plugin.cli", "score", "--model", str(tiny_model_dir), "--data",
                str(gsm8k_jsonl), "--out", str(out), "--quiet", "--set", "batch_size=2"]

    runs = [subprocess.Popen(command(tmp_path / f"out{k}"), env=env, stderr=subprocess.PIPE, text=True) for k in range(2)]
    errors = [run.communicate(timeout=600)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    single = subprocess.run(command(tmp_path / "single"), env={**env, "XTF_CACHE": str(tmp_path / "own-cache")},
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    expected = pq.read_table(tmp_path / "single" / "train.parquet")
    for k in range(2):
        table = pq.read_table(tmp_path / f"out{k}" / "train.parquet")
        assert table.column_names == expected.column_names
        for name in expected.column_names:  # NaN (prompt tokens' scores) equal to NaN
            np.testing.assert_array_equal(table[name].combine_chunks().flatten().to_numpy(zero_copy_only=False),
                                          expected[name].combine_chunks().flatten().to_numpy(zero_copy_only=False))
            assert table[name].combine_chunks().value_lengths() == expected[name].combine_chunks().value_lengths()
    entries = list(shared.rglob("*.npz"))
    assert entries and not [e for e in entries if e.name.startswith(".tmp-")]
    for entry in entries:
        with np.load(entry) as archive:
            assert "__meta__" in archive.files


def test_unwritable_cache_warns_once_and_scores(tiny_model, tiny_tokenizer, data, tmp_path):
    """A cache that cannot be written (here its folder's place is taken by a file; on a cluster, a read-only
    model store) costs the saving only: one warning, the same scores."""
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    with pytest.warns(CacheWarning, match="cannot be written") as caught:
        scored, _ = score(tiny_model, tiny_tokenizer, data, blocked)
    assert sum("cannot be written" in str(w.message) for w in caught) == 1
    reference, _ = score(tiny_model, tiny_tokenizer, data, tmp_path / "writable")
    np.testing.assert_array_equal(scored.scores.kn, reference.scores.kn)
    np.testing.assert_array_equal(scored.selection.reasons, reference.selection.reasons)
