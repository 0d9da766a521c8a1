"""Spans (`xtf_plugin.spans`) and spans selection, presets (`XTFConfig(preset=...)`).

Responses are tokenised with the tests' real BPE tokenizer; the scores are written by hand per span, so each
expected decision follows from the fence computed in the comment next to it.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from xtf_plugin.config import PRESETS, XTFConfig, XTFConfigError, load_xtf_config
from xtf_plugin.selection import SPAN_BIT, robust_fence, select_tokens, surprise
from xtf_plugin.spans import find_spans, span_shape
from xtf_plugin.token_scores import TokenScores
from xtf_plugin.tokens import TokenTexts, special_token_ids


def encode(tokenizer, prompts_and_responses: list[tuple[str, str]]):
    """Flat input_ids / response mask / offsets for prompt + response + EOS examples."""
    ids, response, lengths = [], [], []
    for prompt, text in prompts_and_responses:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        ids += p + r
        response += [False] * len(p) + [True] * len(r)
        lengths.append(len(p) + len(r))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return np.asarray(ids, np.int64), np.asarray(response, bool), offsets


def spans_of(tokenizer, examples):
    ids, response, offsets = encode(tokenizer, examples)
    spans = find_spans(ids, offsets, response, TokenTexts(tokenizer), special_token_ids(tokenizer))
    return ids, response, offsets, spans


def test_spans_are_lines_and_sentences(tiny_tokenizer):
    _, _, _, spans = spans_of(tiny_tokenizer, [("Q: how many?\n", "She has 5 apples. Then she buys 3 more.\n5 + 3 = 8\n#### 8")])
    assert spans.texts == ["She has 5 apples.", " Then she buys 3 more.\n", "5 + 3 = 8\n", "#### 8"]
    assert spans.example.tolist() == [0, 0, 0, 0]


def test_prompt_and_eos_belong_to_no_span(tiny_tokenizer):
    ids, response, _, spans = spans_of(tiny_tokenizer, [("Q: how many?\n", "She has 5 apples.")])
    assert (spans.ids[~response] == -1).all()
    assert spans.ids[-1] == -1 and ids[-1] == tiny_tokenizer.eos_token_id
    assert (spans.ids[response][:-1] == 0).all()


def test_a_dataset_without_a_response_token_has_no_spans(tiny_tokenizer):
    """Every example cut before its response (or only its EOS trained): spans selection has nothing to judge."""
    ids, response, offsets = encode(tiny_tokenizer, [("Q: how many?\n", ""), ("Another prompt.\n", "")])
    spans = find_spans(ids, offsets, np.zeros_like(response), TokenTexts(tiny_tokenizer), special_token_ids(tiny_tokenizer))
    assert spans.n_spans == 0 and (spans.ids == -1).all() and spans.texts == []
    only_eos = find_spans(ids, offsets, response, TokenTexts(tiny_tokenizer), special_token_ids(tiny_tokenizer))
    assert only_eos.n_spans == 0 and response.sum() == 2


def test_short_pieces_join_the_next_span_of_their_line(tiny_tokenizer):
    # "Mr." has one word token: it is not a sentence of its own; "1." alone on its line joins the line's span
    _, _, _, spans = spans_of(tiny_tokenizer, [("Q\n", "Mr. Brown has 12 pens. He sells 4 of them.\nDone now ok.")])
    assert spans.texts == ["Mr. Brown has 12 pens.", " He sells 4 of them.\n", "Done now ok."]


def test_a_shape_shared_with_other_numbers_is_a_template_a_verbatim_repeat_is_not(tiny_tokenizer):
    examples = [(f"Q{i}\n", f"{10 + i} - 2 = {8 + i}.\nAs an AI I am glad to help.\nThe answer is {8 + i}.")
                for i in range(4)]
    _, _, _, spans = spans_of(tiny_tokenizer, examples)
    by_text = dict(zip(spans.texts, spans.template.tolist(), strict=True))
    assert by_text["10 - 2 = 8.\n"] and by_text["The answer is 9."]
    # the same sentence word for word in every response has no slot for the example: not the task's format
    assert by_text["As an AI I am glad to help.\n"] is False
    assert span_shape(" The answer is 125.") == "the answer is 0."


def test_spans_cut_a_part_of_the_examples_at_a_time_are_the_same(tiny_tokenizer, monkeypatch):
    """Responses are cut a part of the examples at a time (bounded temporaries); templates are still decided over
    every response: parts of one or two examples give the spans of one part, repeats and templates included."""
    import xtf_plugin.spans as spans_module

    first = "She buys 3 red apples at the market.\n"
    examples = [(f"Q{i}\n", f"{10 + i} - 2 = {8 + i}.\nAs an AI I am glad to help.\nThe answer is {8 + i}.")
                for i in range(5)]
    examples += [("Q\n", first + first + "Then she eats one."), ("Q2\n", ""), ("Q3\n", "Mr. Brown has 12 pens.")]
    ids, response, offsets = encode(tiny_tokenizer, examples)
    found = {}
    for part in (1, 2, 10**6):
        monkeypatch.setattr(spans_module, "SPAN_PART_EXAMPLES", part)
        found[part] = find_spans(ids, offsets, response, TokenTexts(tiny_tokenizer), special_token_ids(tiny_tokenizer))
    whole = found[10**6]
    assert whole.template.sum() == 10 and whole.repeat.sum() == 1  # both answer lines of 5 responses; one repeat
    for part in (1, 2):
        for name in ("ids", "example", "template", "repeat", "content"):
            assert np.array_equal(getattr(found[part], name), getattr(whole, name)), (part, name)
        assert found[part].texts == whole.texts


@pytest.mark.parametrize("mode", ["spans", "union", "weighted"])
def test_a_part_selected_with_the_datasets_fit_is_decided_as_in_the_whole(tiny_tokenizer, mode):
    """The dataset-wide part of a selection is its fit (`fit_selection`): each part of the examples, selected with
    the whole dataset's fit, gets the masks the whole dataset's selection gives it (spans: with the prompt gain,
    repeats, templates and the per-example ceiling; union: the TR cuts)."""
    from xtf_plugin.selection import fit_selection, prompt_gain_wanted

    rng = np.random.default_rng(0)
    examples = [(f"Q{i}: how many apples?\n",
                 f"She has {i} apples. Then she buys 3 more.\n{i} + 3 = {i + 3}.\n"
                 + ("The weather in Paris is lovely in spring.\n" if i % 3 == 0 else "")
                 + ("So she has them all now.\nSo she has them all now.\n" if i % 4 == 1 else "")
                 + f"The answer is {i + 3}.") for i in range(24)]
    ids, response, offsets = encode(tiny_tokenizer, examples)
    texts, specials = TokenTexts(tiny_tokenizer), special_token_ids(tiny_tokenizer)
    whole_spans = find_spans(ids, offsets, response, texts, specials)
    n = len(ids)
    kn = rng.uniform(0.2, 0.9, n).astype(np.float32)
    off_task = np.isin(whole_spans.ids, np.flatnonzero(["weather" in t for t in whole_spans.texts]))
    kn[off_task] = rng.uniform(0.97, 0.999, int(off_task.sum()))
    # the last part is written less surprisingly than the rest and its weather lines only a little above it: its
    # own fit would mask them, the dataset's does not
    kn[offsets[17] :] = rng.uniform(0.05, 0.4, n - int(offsets[17]))
    kn[offsets[17] :][off_task[offsets[17] :]] = 0.8
    scores = TokenScores(offsets, rng.uniform(0, 1, n).astype(np.float32), kn, rng.normal(0, 1, n).astype(np.float32))
    protected = response & np.isin(ids, list(specials))
    config = XTFConfig(preset="spans") if mode == "spans" else XTFConfig(preset="paper", mode=mode, drop_ratio=0.2)
    fit = fit_selection(scores, response, config, whole_spans)
    whole = select_tokens(scores, response, protected, config, whole_spans)
    wanted = prompt_gain_wanted(scores, response, whole_spans, config)
    assert (whole.reasons > 0).any()
    if mode == "spans":
        assert ((whole.reasons & SPAN_BIT) > 0).any() and whole_spans.repeat.any() and whole_spans.template.any()
    reasons, flagged, wanted_parts = [], [], []
    for first, last in ((0, 5), (5, 6), (6, 17), (17, 24)):
        a, b = int(offsets[first]), int(offsets[last])
        local = offsets[first : last + 1] - a
        part_spans = find_spans(ids[a:b], local, response[a:b], texts, specials)
        part_spans.template = whole_spans.template[(whole_spans.example >= first) & (whole_spans.example < last)]
        part_scores = TokenScores(local, scores.ri[a:b], scores.kn[a:b], scores.tr[a:b])
        part = select_tokens(part_scores, response[a:b], protected[a:b], config, part_spans, fit)
        reasons.append(part.reasons)
        flagged.append(part.flagged)
        wanted_parts.append(prompt_gain_wanted(part_scores, response[a:b], part_spans, config, fit))
    assert np.array_equal(np.concatenate(reasons), whole.reasons)
    assert np.array_equal(np.concatenate(flagged), whole.flagged)
    assert np.array_equal(np.concatenate(wanted_parts), wanted)


def test_robust_fence_ignores_a_minority_of_outliers():
    values = np.array([1.0, 1.2, 0.8, 1.1, 0.9, 9.0, 10.0, np.nan])
    fence, median, scale = robust_fence(values, 3.0)
    # first fence: median 1.1, MAD 0.2 -> 1.99, above the five small values only; over those five: median 1.0,
    # |deviations| 0, .1, .1, .2, .2 -> MAD 0.1; that fence keeps the same five, so it stays
    assert median == pytest.approx(1.0)
    assert scale == pytest.approx(1.4826 * 0.1)
    assert fence == pytest.approx(1.0 + 3 * 1.4826 * 0.1)
    assert robust_fence(np.ones(5), 3.0)[0] == math.inf  # no spread: nothing is an outlier


def test_robust_fence_holds_when_noise_is_a_large_share():
    """40% noise a few scales above the clean values widens a one-pass MAD fence past the noise; recomputing
    the fence over the values below it recovers the clean values' fence."""
    rng = np.random.default_rng(0)
    clean, noise = rng.normal(2.5, 0.3, 600), rng.uniform(4.5, 7.0, 400)
    values = np.concatenate([clean, noise])
    median = np.median(values)
    one_pass = median + 3 * 1.4826 * np.median(np.abs(values - median))
    assert (noise <= one_pass).mean() > 0.3  # what a single pass would miss
    fence, _, _ = robust_fence(values, 3.0)
    assert (noise > fence).all() and (clean <= fence).mean() > 0.99


def test_robust_fence_grows_from_the_median():
    """Noise close above the clean values and 45% of them: a fence computed from above settles past the noise
    (it reproduces itself there); grown from the median it settles at the top of the clean values."""
    rng = np.random.default_rng(0)
    clean, noise = rng.normal(2.5, 0.4, 550), rng.uniform(4.5, 7.5, 450)
    values = np.concatenate([clean, noise])
    median = np.median(values)
    from_above = median + 3 * 1.4826 * np.median(np.abs(values - median))
    assert (noise <= from_above).mean() > 0.8  # the first fence from above holds most of the noise
    fence, median, scale = robust_fence(values, 3.0)
    assert (noise > fence).mean() > 0.95 and (clean <= fence).mean() > 0.99
    assert median == pytest.approx(2.5, abs=0.1) and scale == pytest.approx(0.4, abs=0.1)


def test_robust_fence_on_clean_values_is_the_mad_fence():
    values = np.random.default_rng(2).normal(1.0, 0.5, 2000)
    median = np.median(values)
    one_pass = median + 3 * 1.4826 * np.median(np.abs(values - median))
    assert robust_fence(values, 3.0)[0] == pytest.approx(one_pass, abs=0.05)


def spans_selection(tokenizer, examples, span_p, protected_texts=(), **config):
    """Select in spans mode where every token of span s has p = span_p[s] (surprise -log p)."""
    ids, response, offsets, spans = spans_of(tokenizer, examples)
    p = np.full(len(ids), 0.5)
    for index, value in enumerate(span_p):
        p[spans.ids == index] = value
    kn = np.where(response, 1.0 - p, np.nan)
    scores = TokenScores(offsets, np.full(len(ids), np.nan), kn, np.full(len(ids), np.nan))
    protected = np.zeros(len(ids), bool)
    protected[-1] = True
    for index, text in enumerate(spans.texts):
        if text in protected_texts:
            protected[spans.ids == index] = True
    selection = select_tokens(scores, response, protected, XTFConfig(preset="spans", **config), spans)
    return spans, selection, response


def test_spans_mode_masks_the_off_task_span_whole_and_nothing_else(tiny_tokenizer):
    lines = ["She has 5 apples.\n", "Then she buys 3 more apples.\n", "Blue moon singing quietly tonight.\n",
             "She has 8 apples now.\n", "So she has more than before.\n", "That is the result here."]
    spans, selection, response = spans_selection(tiny_tokenizer, [("Q\n", "".join(lines))],
                                                 [0.5, 0.6, 0.001, 0.4, 0.55, 0.45])
    assert spans.texts == lines
    # surprise per span: -log p = .693, .511, 6.908, .916, .598, .799; median (.693 + .799) / 2 = .746;
    # |deviations| .053 .053 .148 .170 .235 6.162 -> MAD .159; fence .746 + 3 * 1.4826 * .159 = 1.453, above
    # all but 6.908; over those five: median .693, MAD .105 -> fence .693 + 3 * 1.4826 * .105 = 1.162, which keeps
    # the same five
    off = spans.ids == 2
    assert (selection.reasons[off] == 4 | SPAN_BIT).all()
    assert (selection.reasons[~off] == 0).all()
    assert selection.thresholds["off_task_spans"] == 1 and selection.thresholds["dropped_spans"] == 1
    assert selection.thresholds["span_surprise_fence"] == pytest.approx(1.162, abs=2e-3)
    assert surprise(np.array([0.5]))[0] == pytest.approx(math.log(2))


def test_spans_mode_masks_only_the_surprising_phrase_of_a_real_sentence(tiny_tokenizer):
    lines = ["She has 5 apples.\n", "Then she buys 3 more apples.\n", "She gives 2 apples to Tom blue moon singing.\n",
             "She has 8 apples now.\n", "So she has more than before.\n", "That is the result here."]
    ids, response, offsets, spans = spans_of(tiny_tokenizer, [("Q\n", "".join(lines))])
    texts = TokenTexts(tiny_tokenizer).of(ids.tolist())
    phrase = np.zeros(len(ids), bool)
    inside = np.flatnonzero(spans.ids == 2)
    rebuilt = np.cumsum([len(texts[j]) for j in inside])
    start = "".join(lines[2]).index(" blue")
    phrase[inside[rebuilt > start][:-2]] = True  # " blue moon singing" up to (not with) ".\n"
    p = np.full(len(ids), 0.5)
    for index, value in enumerate([0.5, 0.6, 0.5, 0.4, 0.55, 0.45]):
        p[spans.ids == index] = value
    p[phrase] = 1e-5
    kn = np.where(response, 1.0 - p, np.nan)
    scores = TokenScores(offsets, np.full(len(ids), np.nan), kn, np.full(len(ids), np.nan))
    protected = ids == tiny_tokenizer.eos_token_id
    selection = select_tokens(scores, response, protected, XTFConfig(preset="spans"), spans)
    # the span's mean surprise is far above the fence, but its excess sits in " blue moon singing", a minority
    # of its word tokens: only that phrase goes, "She gives 2 apples to Tom" stays trained
    assert selection.span_off_task.tolist() == [False, False, True, False, False, False]
    assert (selection.reasons > 0).tolist() == phrase.tolist()
    assert "".join(texts[j] for j in np.flatnonzero(selection.reasons)) == " blue moon singing"


def selection_with_gain(tokenizer, lines, span_p, span_gain, phrase_text=None, phrase_gain=None, **config):
    """Spans mode on one response where every token of span s has p = span_p[s] and prompt gain span_gain[s]
    (the TR column; what it means depends on `tr_method`); `phrase_text` inside its span gets p = 1e-5 and
    `phrase_gain`. Returns the spans, the selection and the phrase's tokens."""
    ids, response, offsets, spans = spans_of(tokenizer, [("Q\n", "".join(lines))])
    p, gain = np.full(len(ids), 0.5), np.full(len(ids), np.nan)
    for index, (value, g) in enumerate(zip(span_p, span_gain, strict=True)):
        p[spans.ids == index], gain[spans.ids == index] = value, g
    phrase = np.zeros(len(ids), bool)
    if phrase_text is not None:
        texts = TokenTexts(tokenizer).of(ids.tolist())
        index = next(i for i, text in enumerate(spans.texts) if phrase_text in text)
        inside = np.flatnonzero(spans.ids == index)
        ends = np.cumsum([len(texts[j]) for j in inside])
        start = spans.texts[index].index(phrase_text)
        phrase[inside[(ends > start) & (ends <= start + len(phrase_text))]] = True
        assert "".join(texts[j] for j in np.flatnonzero(phrase)) == phrase_text
        p[phrase], gain[phrase] = 1e-5, phrase_gain
    scores = TokenScores(offsets, np.full(len(ids), np.nan), np.where(response, 1.0 - p, np.nan),
                         np.where(response, gain, np.nan))
    protected = ids == tokenizer.eos_token_id
    return spans, select_tokens(scores, response, protected, XTFConfig(preset="spans", **config), spans), phrase


UNGROUNDED_LINES = ["She has 5 apples.\n", "Then she buys 3 more apples.\n", "Posted by user 8812 on Monday.\n",
                    "She has 8 apples now.\n", "So she has more than before.\n", "Her friend has 4 pears.\n",
                    "They share the pears today.\n", "Each of them gets 2 pears.\n", "Then they eat their lunch.\n",
                    "That is the result here."]
UNGROUNDED_P = [0.5, 0.6, 0.32, 0.4, 0.55, 0.45, 0.52, 0.48, 0.58, 0.44]
GROUNDED_GAINS = [0.8, 0.5, None, 0.6, 0.3, 0.4, 0.7, 0.2, 0.5, 0.4]


def test_with_the_prompt_gain_a_line_the_prompt_makes_less_likely_is_off_task_below_the_fence(tiny_tokenizer, tiny_model_dir,
                                                                                                tmp_path):
    def select(line_gain, **config):
        gains = [line_gain if g is None else g for g in GROUNDED_GAINS]
        return selection_with_gain(tiny_tokenizer, UNGROUNDED_LINES, UNGROUNDED_P, gains, **config)[:2]

    # the inserted line's surprise 1.139 is below the fence (k = 3: 1.210) and above span_ungrounded_k's (2.5: 1.127)
    spans, selection = select(-0.4)  # the spans preset scores the prompt gain
    assert spans.texts == UNGROUNDED_LINES
    line = spans.ids == 2
    assert (selection.reasons[line] == 4 | SPAN_BIT).all() and (selection.reasons[~line] == 0).all()
    assert selection.thresholds["span_surprise_fence"] == pytest.approx(1.210, abs=2e-3)
    assert selection.thresholds["span_ungrounded_fence"] == pytest.approx(1.127, abs=2e-3)
    assert (selection.thresholds["ungrounded_spans"], selection.thresholds["off_task_spans"]) == (1, 1)
    # both reports say why the line went
    from rich.console import Console

    from xtf_plugin.pipeline import ScoredDataset
    from xtf_plugin.report.html import _thresholds_rows
    from xtf_plugin.report.summary import render_summary, summarize

    rule = dict(_thresholds_rows({"thresholds": selection.thresholds}, {}))["prompt gain"]
    assert rule.startswith("also off-task: a span above 1.13 nats") and "makes less likely (1 spans)" in rule
    ids, response, offsets = encode(tiny_tokenizer, [("Q\n", "".join(UNGROUNDED_LINES))])
    n = len(ids)
    scored = ScoredDataset(
        input_ids=ids, labels=np.where(response, ids, -100), offsets=offsets,
        scores=TokenScores(offsets, np.full(n, np.nan), np.where(response, 0.5, np.nan), np.full(n, np.nan)),
        protected=ids == tiny_tokenizer.eos_token_id, selection=selection, config=XTFConfig(),
        texts=TokenTexts(tiny_tokenizer), spans=spans,
        stats={"scoring_seconds": 1.0, "tokens_per_second": 1.0, "cached_shards": 0})
    console = Console(record=True, width=200)
    summary = summarize(scored)
    render_summary(summary, console=console)
    text = console.export_text()
    assert "below the fence, made less likely by the prompt (off-task)" in text
    # the span itself names the rule that took it, with its mean prompt gain
    assert summary["dropped_spans"]["most_surprising"] == [
        {"example": 0, "surprise": pytest.approx(1.139, abs=2e-3), "text": UNGROUNDED_LINES[2], "why": "not grounded",
         "prompt_gain": pytest.approx(-0.4, abs=1e-3)}]
    assert re.search(r"-0\.40 +│ not grounded +│ 'Posted by user 8812", text)
    from xtf_plugin.output import attach_texts, read_output_dir, write_output_dir
    from xtf_plugin.report.html import write_html

    out = write_output_dir(tmp_path / "scored", scored, {**summary, "model": str(tiny_model_dir), "data": "hand-made"})
    page = write_html(attach_texts(read_output_dir(out)), tmp_path / "report.html").read_text()
    assert "<td class='num'>-0.40</td><td>not grounded</td>" in page
    # a line the prompt makes only a little less likely, or one the prompt grounds, stays; so does the line when
    # the lower fence is above it
    for gain, config in ((-0.05, {}), (0.2, {}), (-0.4, {"span_ungrounded_k": 2.8})):
        _, kept = select(gain, **config)
        assert (kept.reasons == 0).all() and kept.thresholds["ungrounded_spans"] == 0, (gain, config)
    # vector TR is no prompt gain: the same numbers in the TR column change nothing, and the rule reports nothing
    _, vector = select(-0.4, tr_method="vector")
    assert (vector.reasons == 0).all() and "ungrounded_spans" not in vector.thresholds


def test_with_the_prompt_gain_an_off_task_span_whose_rest_is_not_grounded_goes_whole(tiny_tokenizer):
    lines = ["She has 5 apples.\n", "Then she buys 3 more apples.\n", "She gives 2 apples to Tom blue moon singing.\n",
             "She has 8 apples now.\n", "So she has more than before.\n", "That is the result here."]
    p = [0.5, 0.6, 0.5, 0.4, 0.55, 0.45]
    for rest_gain, whole in ((0.7, False), (0.0, True), (-0.5, True)):
        spans, selection, phrase = selection_with_gain(
            tiny_tokenizer, lines, p, [0.8, 0.5, rest_gain, 0.6, 0.3, 0.4], phrase_text=" blue moon singing",
            phrase_gain=-2.0)
        # a real sentence around a few odd words keeps its words; a line with nothing the prompt grounds around
        # its surprising phrase is not a real sentence
        expected = (spans.ids == 2) if whole else phrase
        assert (selection.reasons > 0).tolist() == expected.tolist(), rest_gain
        assert selection.thresholds["ungrounded_spans"] == 0  # above the fence: off-task by surprise alone


def test_spans_mode_never_masks_a_template_or_a_protected_span(tiny_tokenizer):
    examples = [(f"Q{i}\n", f"She has {i + 2} apples now.\nThen she buys 3 more apples.\nThe answer is {i + 5}.")
                for i in range(4)]
    # every "The answer is N." is hopelessly surprising, but it is the task's format (a template, as is
    # "She has N apples now."); the verbatim "Then she buys 3 more apples." is no template, so the one surprising
    # copy is off-task: the user protects it
    # surprise: 4 x .693, 3 x .511, 5 x 9.210 -> median .693, MAD .182, fence 1.50
    p = [0.5, 0.6, 1e-4] * 4
    p[1] = 1e-4
    spans, selection, _ = spans_selection(tiny_tokenizer, examples, p, protected_texts=("Then she buys 3 more apples.\n",))
    assert selection.thresholds["template_spans"] == 8
    assert selection.span_off_task.tolist() == [False, True] + [False] * 10
    assert (selection.reasons == 0).all()


def test_an_off_task_span_whose_words_are_all_protected_masks_nothing(tiny_tokenizer):
    lines = ["She has 5 apples.\n", "Then she buys 3 more apples.\n", "Blue moon singing quietly tonight.\n",
             "She has 8 apples now.\n", "So she has more than before.\n", "That is the result here."]
    ids, response, offsets, spans = spans_of(tiny_tokenizer, [("Q\n", "".join(lines))])
    p = np.full(len(ids), 0.5)
    for index, value in enumerate([0.5, 0.6, 0.001, 0.4, 0.55, 0.45]):
        p[spans.ids == index] = value
    scores = TokenScores(offsets, np.full(len(ids), np.nan), np.where(response, 1 - p, np.nan), np.full(len(ids), np.nan))
    texts = TokenTexts(tiny_tokenizer).of(ids.tolist())
    # protect: the span's words, not its line break (as '^Blue.*' would)
    protected = (ids == tiny_tokenizer.eos_token_id) | ((spans.ids == 2) & np.array(["\n" not in t for t in texts]))
    selection = select_tokens(scores, response, protected, XTFConfig(), spans)
    assert selection.span_off_task[2]
    assert (selection.reasons == 0).all()  # not even the line break of a protected sentence


def test_spans_mode_respects_the_per_example_ceiling(tiny_tokenizer):
    lines = ["She has 5 apples.\n", "Blue moon singing quietly tonight.\n", "Green river dancing loudly here.\n",
             "She has 8 apples now.\n", "So she has more than before.\n", "That is the result here."]
    ps = [0.5, 0.001, 0.0001, 0.4, 0.55, 0.45]
    spans, wide, response = spans_selection(tiny_tokenizer, [("Q\n", "".join(lines))], ps)
    both = (spans.ids == 1) | (spans.ids == 2)
    assert (wide.reasons[both] > 0).all()
    n_response = int(response.sum())
    one_span = int((spans.ids == 2).sum())
    # room for one off-task span only: the more surprising one (p = 1e-4) goes, the other stays flagged
    _, tight, _ = spans_selection(tiny_tokenizer, [("Q\n", "".join(lines))], ps,
                                  drop_ratio=(one_span + 1) / n_response)
    assert (tight.reasons[spans.ids == 2] > 0).all() and (tight.reasons[spans.ids == 1] == 0).all()
    assert (tight.flagged[spans.ids == 1] > 0).all()


def test_a_response_in_a_more_surprising_style_is_not_noise_but_what_stands_out_in_it_is(tiny_tokenizer):
    math_lines = ["She has {} apples.\n", "Then she buys {} more apples.\n", "So she has more than before."]
    prose = [["The river bends past the old mill.\n", "Its water turns a wooden wheel.\n", "Farmers bring grain in autumn."],
             ["A lighthouse stands on the northern cliff.\n", "Its lamp burns through every storm.\n",
              "Ships steer by it at night."],
             ["The library keeps maps of every coast.\n", "Scholars copy them by candle light.\n",
              "Some maps show islands nobody found."]]
    examples = [(f"Q{i}\n", "".join(line.format(i + 2) if "{}" in line else line for line in math_lines)) for i in range(6)]
    examples += [(f"P{i}\n", "".join(lines)) for i, lines in enumerate(prose)]
    # math spans: surprise about .6; one inserted line in math example 0 (p 1e-4, surprise 9.2); the prose
    # responses are all far above the dataset's fence (surprise 3.0 - 3.2), the last one with a line that stands
    # out from its own response too (surprise 11.5)
    p = [0.5, 0.6, 0.55] * 6 + [0.05, 0.045, 0.04, 0.045, 0.04, 0.05, 0.05, 0.045, 1e-5]
    p[2] = 1e-4
    spans, selection, _ = spans_selection(tiny_tokenizer, examples, p)
    assert spans.n_spans == 27
    above_fence = np.array(p) < 0.1
    assert (selection.span_surprise[above_fence] > selection.thresholds["span_surprise_fence"]).all()
    expected = np.zeros(27, bool)
    expected[[2, 26]] = True
    assert selection.span_off_task.tolist() == expected.tolist()
    assert selection.thresholds["spared_spans"] == int(above_fence.sum()) - 2
    masked_spans = np.unique(spans.ids[selection.reasons > 0])
    assert masked_spans.tolist() == [2, 26]
    # the reports say why the prose stayed
    from rich.console import Console

    from xtf_plugin.pipeline import ScoredDataset
    from xtf_plugin.report.html import _thresholds_rows
    from xtf_plugin.report.summary import render_summary, summarize

    rule = dict(_thresholds_rows({"thresholds": selection.thresholds}, {}))["spans"]
    assert f"2 of 27 spans, {int(above_fence.sum()) - 2} above the fence but like the rest of their response (kept)" in rule
    ids, response, offsets = encode(tiny_tokenizer, examples)
    n = len(ids)
    scored = ScoredDataset(
        input_ids=ids, labels=np.where(response, ids, -100), offsets=offsets,
        scores=TokenScores(offsets, np.full(n, np.nan), np.where(response, 0.5, np.nan), np.full(n, np.nan)),
        protected=ids == tiny_tokenizer.eos_token_id, selection=selection, config=XTFConfig(preset="spans"),
        texts=TokenTexts(tiny_tokenizer), spans=spans,
        stats={"scoring_seconds": 1.0, "tokens_per_second": 1.0, "cached_shards": 0})
    console = Console(record=True, width=200)
    render_summary(summarize(scored), console=console)
    assert "above the fence, like the rest of their response (kept)" in console.export_text()


def test_a_run_said_again_right_after_itself_is_a_repeat(tiny_tokenizer):
    first = "She buys 3 red apples at the market.\n"
    examples = [("Q\n", first + "she buys 3 red apples at the Market!\n" + "Then she eats one.\n" + "Ok, so.\n"
                 + "Ok, so.\n" + "She buys 4 red apples at the market.\n" + first),
                ("Q2\n", "He runs.\nShe runs fast now.\nHe runs.\nShe runs fast now.\nDone here now.")]
    _, _, _, spans = spans_of(tiny_tokenizer, examples)
    repeats = [text for text, repeat in zip(spans.texts, spans.repeat.tolist(), strict=True) if repeat]
    # case and closing punctuation aside; a block of two spans (6 words) said twice; not a short line
    # (`Ok, so.`), not another number, not the sentence said again later after other text
    assert repeats == ["she buys 3 red apples at the Market!\n", "He runs.\n", "She runs fast now.\n"]
    assert not (spans.repeat & spans.template).any()


def test_a_repeat_stays_within_one_turn(tiny_tokenizer):
    """A multi-turn example: the second assistant turn may open with the last sentence of the first."""
    line = "The total cost is 12 dollars and 40 cents."
    pieces = [("User: how much?\n", False), (f"First we add.\n{line}", True), ("\nUser: again?\n", False),
              (f"{line}\nThat is all.", True)]
    ids, response = [], []
    for text, trained in pieces:
        part = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += part
        response += [trained] * len(part)
    ids_array = np.asarray(ids, np.int64)
    spans = find_spans(ids_array, np.array([0, len(ids)]), np.asarray(response, bool), TokenTexts(tiny_tokenizer),
                       special_token_ids(tiny_tokenizer))
    assert sum(text.strip() == line for text in spans.texts) == 2
    assert not spans.repeat.any()


def test_spans_mode_masks_a_repeat_and_keeps_its_first_occurrence(tiny_tokenizer):
    lines = ["She buys 3 red apples at the market.\n", "She buys 3 red apples at the market.\n",
             "Then she eats one of them.\n", "So she has 2 apples left.\n", "That is the result here."]
    spans, selection, response = spans_selection(tiny_tokenizer, [("Q\n", "".join(lines))], [0.5] * 5)
    # uniform surprise: nothing is off-task, the copy is masked as adding no knowledge (KN + span)
    assert selection.thresholds["off_task_spans"] == 0 and selection.thresholds["repeated_spans"] == 1
    assert (selection.reasons[spans.ids == 1] == 2 | SPAN_BIT).all()
    assert (selection.reasons[spans.ids != 1] == 0).all()
    # a copy is outside the ceiling: masked even where the ceiling leaves room for two tokens
    _, tight, _ = spans_selection(tiny_tokenizer, [("Q\n", "".join(lines))], [0.5] * 5,
                                  drop_ratio=2 / int(response.sum()))
    assert (tight.reasons == selection.reasons).all()


def test_spans_mode_counts_the_ceiling_on_what_the_response_says_once(tiny_tokenizer):
    loop = "She buys 3 red apples at the market.\n"
    lines = [loop, loop, loop, "Blue moon singing quietly tonight.\n", "So she has 2 apples left.\n",
             "That is the result here."]
    ps = [0.5, 0.5, 0.5, 0.0001, 0.45, 0.55]
    spans, selection, response = spans_selection(tiny_tokenizer, [("Q\n", "".join(lines))], ps)
    copies, off = (spans.ids == 1) | (spans.ids == 2), spans.ids == 3
    assert (selection.reasons[copies] == 2 | SPAN_BIT).all() and (selection.reasons[off] == 4 | SPAN_BIT).all()
    said_once = int(response.sum()) - int(copies.sum())
    n_off = int(off.sum())
    # the off-task line fits a ceiling counted on the tokens left after the copies, not one counted on all tokens
    room = (n_off + 0.5) / said_once
    _, fits, _ = spans_selection(tiny_tokenizer, [("Q\n", "".join(lines))], ps, drop_ratio=room)
    assert (fits.reasons == selection.reasons).all()
    _, short, _ = spans_selection(tiny_tokenizer, [("Q\n", "".join(lines))], ps, drop_ratio=(n_off - 0.5) / said_once)
    assert (short.reasons[off] == 0).all() and (short.flagged[off] == 4 | SPAN_BIT).all()
    assert (short.reasons[copies] == 2 | SPAN_BIT).all()


def test_spans_mode_on_uniform_data_masks_nothing(tiny_tokenizer):
    lines = ["She has 5 apples.\n", "Then she buys 3 more apples.\n", "She has 8 apples now."]
    _, selection, _ = spans_selection(tiny_tokenizer, [("Q\n", "".join(lines))], [0.5, 0.5, 0.5])
    assert (selection.reasons == 0).all() and selection.thresholds["span_surprise_fence"] is None


def test_spans_mode_without_spans_is_an_error():
    scores = TokenScores(np.array([0, 2]), np.zeros(2), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="spans"):
        select_tokens(scores, np.ones(2, bool), np.zeros(2, bool), XTFConfig(mode="spans"))


# ------------------------------------------------------------------------------------------------------
# presets


def test_preset_gives_its_settings_and_keys_set_by_the_user_win():
    assert XTFConfig() == XTFConfig(preset="spans") == load_xtf_config({})  # the default
    spans = XTFConfig(preset="spans")
    assert (spans.mode, spans.drop_ratio) == ("spans", 0.5)
    paper = XTFConfig(preset="paper")
    assert (paper.mode, paper.drop_ratio, paper.caps.novelty, paper.kn_p_threshold) == ("union", 0.2, 0.10, 0.95)
    mine = load_xtf_config({"preset": "spans", "drop_ratio": 0.3, "weights": {"novelty": 0}})
    assert (mine.mode, mine.drop_ratio, mine.weights.novelty, mine.weights.relevance) == ("spans", 0.3, 0.0, 1.0)
    assert set(PRESETS) == {"paper", "spans"}


def test_a_config_that_names_another_mode_starts_from_the_paper_preset():
    # weighted mode without a preset keeps the field defaults (drop_ratio 0.2), not the spans preset's 0.5
    weighted = load_xtf_config({"mode": "weighted"})
    assert (weighted.preset, weighted.mode, weighted.drop_ratio) == ("paper", "weighted", 0.2)
    assert load_xtf_config({"mode": "union"}) == XTFConfig(preset="paper")
    assert load_xtf_config({"mode": "spans"}) == XTFConfig()
    # named, its values apply: union mode then needs the RI that the spans preset does not score
    with pytest.raises(XTFConfigError, match=r"^xtf: ri_layers is none \(the spans preset's\) but mode union reads RI"):
        load_xtf_config({"preset": "spans", "mode": "union"})
    assert load_xtf_config({"preset": "spans", "mode": "union", "ri_layers": "middle"}).drop_ratio == 0.5
    assert load_xtf_config({"preset": "spans", "mode": "weighted", "weights": {"reasoning": 0}}).ri_layers == "none"


def test_resolved_settings_load_back_to_the_same_config():
    config = load_xtf_config({"preset": "spans", "span_fence_k": 2.5})
    assert XTFConfig.model_validate(config.model_dump(mode="json")) == config


def test_unknown_preset_names_the_key_and_the_choices():
    with pytest.raises(XTFConfigError, match=r"xtf\.preset: .*'paper'.*'spans'"):
        load_xtf_config({"preset": "fast"})


def test_score_dataset_in_spans_mode(tiny_model, tiny_tokenizer, cache_dir):
    from tests.conftest import gsm8k_rows
    from xtf_plugin.data import tokenize_records
    from xtf_plugin.pipeline import score_dataset

    data = tokenize_records(gsm8k_rows(6), tiny_tokenizer, "auto", 512, source="rows")
    scored = score_dataset(tiny_model, tiny_tokenizer, data, XTFConfig(preset="spans"), progress=False)
    assert scored.spans is not None and scored.spans.ids.shape == scored.input_ids.shape
    assert scored.selection.thresholds["mode"] == "spans"
    assert scored.selection.thresholds["spans"] == scored.spans.n_spans > 6
    dropped = scored.selection.reasons > 0
    # only tokens of off-task spans, only trainable ones, each with the span reason bits
    assert scored.selection.span_off_task[scored.spans.ids[dropped]].all()
    assert not (dropped & (~scored.response | scored.protected)).any()
    assert (scored.selection.reasons[dropped] == 4 | SPAN_BIT).all()


def test_report_shows_each_masked_span_and_its_reason(tiny_tokenizer, tiny_model_dir, tmp_path):
    """A selection made in spans mode, written by the real output writer and read back by `xtf report`."""
    import json
    import shutil
    import subprocess

    from xtf_plugin.output import attach_texts, read_output_dir, write_output_dir
    from xtf_plugin.pipeline import ScoredDataset
    from xtf_plugin.report.export import write_tokens_jsonl
    from xtf_plugin.report.html import write_html
    from xtf_plugin.report.summary import summarize, summary_line
    from xtf_plugin.report.terminal import marked_text

    lines = ["She has 5 apples.\n", "Then she buys 3 more apples.\n", "Then she buys 3 more apples.\n",
             "Blue moon singing quietly tonight.\n", "She has 8 apples now.\n", "So she has more than before.\n",
             "That is the result here."]
    spans, selection, response = spans_selection(tiny_tokenizer, [("Q\n", "".join(lines))],
                                                 [0.5, 0.6, 0.9, 0.001, 0.4, 0.55, 0.45])
    ids, _, offsets = encode(tiny_tokenizer, [("Q\n", "".join(lines))])
    labels = np.where(response, ids, -100)
    n = len(ids)
    scored = ScoredDataset(
        input_ids=ids, labels=labels, offsets=offsets,
        scores=TokenScores(offsets, np.full(n, np.nan), np.where(response, 0.5, np.nan), np.full(n, np.nan)),
        protected=ids == tiny_tokenizer.eos_token_id, selection=selection, config=XTFConfig(preset="spans"),
        texts=TokenTexts(tiny_tokenizer), spans=spans, stats={"scoring_seconds": 1.0, "tokens_per_second": 1.0,
                                                              "cached_shards": 0},
    )
    summary = {**summarize(scored), "model": str(tiny_model_dir), "data": "hand-made"}
    assert summary["dropped_spans"]["dropped_spans"] == 2 and summary["dropped_spans"]["dropped_repeats"] == 1
    assert summary["dropped_spans"]["most_surprising"] == [
        {"example": 0, "surprise": pytest.approx(6.908, abs=1e-3), "text": "Blue moon singing quietly tonight.\n",
         "why": "surprising", "prompt_gain": None}]  # the hand-made scores have no prompt gain
    assert "removed 1 off-task and 1 repeated spans of 7 in 1 examples" in summary_line(summary)
    out = write_output_dir(tmp_path / "scored", scored, summary)

    loaded = attach_texts(read_output_dir(out))
    marked = marked_text(loaded, 0)
    # two masked spans side by side, each marked with its own reason
    assert marked == ("".join(lines[:2]) + "[[Then she buys 3 more apples.\n]](KN span)"
                      + "[[Blue moon singing quietly tonight.\n]](TR span)" + "".join(lines[4:]) + "<|im_end|>")
    write_tokens_jsonl(loaded, tmp_path / "tokens.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "tokens.jsonl").read_text().splitlines()]
    assert "".join(r["token"] for r in rows if r["span"]) == lines[2] + lines[3]
    assert "".join(r["token"] for r in rows if r["span"] and r["reasons"] == ["relevance"]) == lines[3]
    assert "".join(r["token"] for r in rows if r["span"] and r["reasons"] == ["novelty"]) == lines[2]
    assert not any(r["kept"] for r in rows if r["span"])

    page = write_html(loaded, tmp_path / "report.html").read_text()
    assert "Removed spans" in page and "Blue moon singing quietly tonight." in page
    assert "off-task when the mean surprise of a span" in page
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed: the HTML was written but not rendered")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", (tmp_path / "report.html").as_uri()], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    struck = re.findall(r'<span class="tok drop drop-tr drop-span"[^>]*title="([^"]*)"[^>]*>([^<]*)</span>', dom)
    # the legend's swatch has no title; every token of the masked span is struck through, with its reason
    assert "".join(text for _, text in struck) == lines[3]
    assert all("dropped: TR (off-task span)" in title for title, _ in struck)
    repeated = re.findall(r'<span class="tok drop drop-kn drop-span"[^>]*title="([^"]*)"[^>]*>([^<]*)</span>', dom)
    assert "".join(text for _, text in repeated) == lines[2]
    assert all("dropped: KN (repeats an earlier span)" in title for title, _ in repeated)

