"""The prompt gain's second pass runs only where the selection reads the gain (`selection.prompt_gain_wanted`),
and what it leaves out changes no decision: a real tiny model scores GSM8K answers with inserted lines, and every
selection is compared with the one made from the gain of every response token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gsm8k_rows
from transformers import AutoModelForCausalLM

from xtf_plugin import selection
from xtf_plugin.config import XTFConfig
from xtf_plugin.data import tokenize_records
from xtf_plugin.pipeline import score_dataset
from xtf_plugin.scoring.engine import ScoringStats, alone_log_probs, alone_plan, score_forward
from xtf_plugin.selection import GAIN_SPAN_K, prompt_gain_wanted, select_tokens
from xtf_plugin.spans import find_spans
from xtf_plugin.tokens import TokenTexts, special_token_ids

INSERTED = ["Click here to subscribe for weekly deals and offers.\n", "Posted by user 8812 on the forum archive.\n"]


@pytest.fixture(scope="module")
def noisy_data(tiny_tokenizer):
    rows = gsm8k_rows(48)
    for i, row in enumerate(rows):
        if i % 4 == 0:  # a line inserted before the last line of every fourth answer
            lines = row["answer"].split("\n")
            row = {**row, "answer": "\n".join([*lines[:-1], INSERTED[i // 4 % 2].strip(), lines[-1]])}
            rows[i] = row
    return tokenize_records(rows, tiny_tokenizer, format="alpaca", max_length=1024)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def full_gain_scores(model, data, config):
    """Scores whose TR is the prompt gain of every response token (the second pass over whole responses)."""
    scores = score_forward(model, data.input_ids, data.labels, config, progress=False)
    scores.tr = scores.tr - alone_log_probs(model, data.input_ids, data.labels, [len(x) for x in data.input_ids],
                                            config, progress=False)
    return scores


@pytest.mark.parametrize("settings", [{"span_fence_k": 1.5, "span_ungrounded_k": 1.0},
                                      {"span_fence_k": 2.0, "span_ungrounded_k": 0.5},
                                      {"span_fence_k": 1.5, "drop_ratio": 0.3}])
def test_the_second_pass_feeds_only_the_spans_the_selection_reads(settings, model, tiny_tokenizer, noisy_data,
                                                                  monkeypatch):
    # A random model's prompt gains are within +-0.01 (measured), its span surprises within 0.1 of log(400):
    # k below the defaults and a gain threshold at the gains' median make both rules decide something.
    monkeypatch.setattr(selection, "UNGROUNDED_GAIN", 0.0)
    config = XTFConfig(**settings)
    scored = score_dataset(model, tiny_tokenizer, noisy_data, config, progress=False, use_cache=False)
    response = scored.response
    wanted = prompt_gain_wanted(scored.scores, response, scored.spans, config)
    # the gain is there exactly at the wanted tokens (the first token of an example has no score at all)
    np.testing.assert_array_equal(np.isfinite(scored.scores.tr), wanted & np.isfinite(scored.scores.kn))
    assert 0 < wanted.sum() < 0.6 * response.sum()
    # each example is fed from its response's start to its last wanted token, the others not at all
    stops = [int(np.flatnonzero(wanted[s])[-1]) + 1 if wanted[s].any() else 0 for s in scored.scores.example_slices()]
    fed = sum(stop - int(np.flatnonzero(y != -100)[0]) for y, stop in zip(noisy_data.labels, stops, strict=True) if stop)
    assert scored.stats["tokens_scored_by_model"] == sum(len(x) for x in noisy_data.input_ids) + fed
    # ... and the gains it gives are those of a pass over every whole response (other batches: last float bits)
    full = full_gain_scores(model, noisy_data, config)
    np.testing.assert_allclose(scored.scores.tr[wanted], full.tr[wanted], atol=5e-5, rtol=0)
    # the decisions are the ones the gain of every token gives
    spans = find_spans(scored.input_ids, scored.offsets, response, TokenTexts(tiny_tokenizer),
                       special_token_ids(tiny_tokenizer))
    everything = select_tokens(full, response, scored.protected, config, spans)
    np.testing.assert_array_equal(scored.selection.reasons, everything.reasons)
    assert everything.thresholds["off_task_spans"] > 0  # the comparison decides something
    if "span_ungrounded_k" in settings:
        assert everything.thresholds["ungrounded_spans"] > 0


def test_settings_above_the_floor_reuse_the_cached_gain(model, tiny_tokenizer, noisy_data, tmp_path):
    assert min(XTFConfig().span_ungrounded_k, XTFConfig().span_fence_k) > GAIN_SPAN_K
    cache = str(tmp_path / "cache")
    first = score_dataset(model, tiny_tokenizer, noisy_data, XTFConfig(cache_dir=cache), progress=False)
    assert first.stats["forward_passes"] > 0
    assert 0 < np.isfinite(first.scores.tr).sum() < first.response.sum() / 2  # the defaults feed a few spans
    for settings in ({}, {"drop_ratio": 0.2}, {"span_ungrounded_k": GAIN_SPAN_K + 0.3}, {"span_fence_k": 2.7}):
        again = score_dataset(model, tiny_tokenizer, noisy_data, XTFConfig(cache_dir=cache, **settings), progress=False)
        assert again.stats["forward_passes"] == 0, settings
    np.testing.assert_array_equal(again.scores.tr, first.scores.tr)
    # a lower k than the floor needs more spans' gain: the second pass runs again (its own shard entry), the first not
    lower = XTFConfig(cache_dir=cache, span_ungrounded_k=GAIN_SPAN_K - 0.8)
    widened = score_dataset(model, tiny_tokenizer, noisy_data, lower, progress=False)
    assert 0 < widened.stats["tokens_scored_by_model"] < sum(len(x) for x in noisy_data.input_ids)
    assert np.isfinite(widened.scores.tr).sum() > np.isfinite(first.scores.tr).sum()
    # and it gives what a run without the cache gives, bit for bit
    fresh = score_dataset(model, tiny_tokenizer, noisy_data, lower, progress=False, use_cache=False)
    np.testing.assert_array_equal(widened.scores.tr, fresh.scores.tr)
    np.testing.assert_array_equal(widened.selection.reasons, fresh.selection.reasons)


def test_alone_pass_stops_where_told(model, noisy_data):
    ids, labels = noisy_data.input_ids[:6], noisy_data.labels[:6]
    config = XTFConfig(batch_size=4)
    whole = alone_log_probs(model, ids, labels, [len(x) for x in ids], config, progress=False)
    starts = [int(np.flatnonzero(y != -100)[0]) for y in labels]
    stops = [0, starts[1], starts[2] + 5, len(ids[3]), starts[4] + 1, 0]
    stats = ScoringStats()
    cut = alone_log_probs(model, ids, labels, stops, config, progress=False, stats=stats)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])])
    for k, stop in enumerate(stops):
        part = slice(offsets[k], offsets[k + 1])
        before = np.arange(len(ids[k])) < stop
        assert np.isnan(cut[part][~before]).all()
        np.testing.assert_allclose(cut[part][before], whole[part][before], atol=5e-5, rtol=0)
        assert np.isfinite(cut[part][before & (labels[k] != -100)]).all()
    # examples 0, 1 and 5 are not fed: three examples, in one batch of at most four
    assert alone_plan(labels, stops, config) == [[3, 2, 4]] and stats.forward_passes == 1
    assert stats.tokens == (stops[2] - starts[2]) + (stops[3] - starts[3]) + 1


def test_union_mode_feeds_every_response_and_nothing_when_tr_is_off(model, tiny_tokenizer, noisy_data):
    everywhere = XTFConfig(preset="paper", tr_method="prompt_gain")
    scored = score_dataset(model, tiny_tokenizer, noisy_data, everywhere, progress=False, use_cache=False)
    np.testing.assert_array_equal(np.isfinite(scored.scores.tr), scored.response & np.isfinite(scored.scores.kn))
    off = everywhere.model_copy(update={"weights": everywhere.weights.model_copy(update={"relevance": 0.0})})
    unread = score_dataset(model, tiny_tokenizer, noisy_data, off, progress=False, use_cache=False)
    assert unread.stats["prompt_gain_tokens"] == 0 and np.isnan(unread.scores.tr).all()
