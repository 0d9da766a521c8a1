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
    first, calls = score(tiny_model, tiny_tokenizer, data, cache_dir, drop_ratio=0.1)
    assert calls > 0
    second, calls = score(
        tiny_model, tiny_tokenizer, data, cache_dir, drop_ratio=0.3, mode="weighted", weights={"novelty": 0}
    )
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
