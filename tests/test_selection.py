"""Selection (`xtf_plugin.selection`): hand-computed cases for each rule, plus a property test.

Every expected array is written out and derived by hand in the comment next to it; nothing is computed
with the code under test. Scores are float32 in `TokenScores`, so values are chosen away from decision
boundaries.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.filters import threshold_multiotsu

from xtf_plugin.config import XTFConfig
from xtf_plugin.selection import (
    Selection,
    apply_selection,
    combined_scores,
    multiotsu_thresholds,
    select_tokens,
    tukey_fence,
)
from xtf_plugin.token_scores import TokenScores

NAN = math.nan
WIDE = {"reasoning": 1.0, "novelty": 1.0, "relevance": 1.0}  # caps that never bind


def make_scores(ri: list[list[float]], kn: list[list[float]] | None = None, tr: list[list[float]] | None = None):
    """TokenScores from per-example lists; a missing attribute is all NaN."""
    lengths = [len(x) for x in ri]
    offsets = np.concatenate([[0], np.cumsum(lengths)])

    def flat(values):
        if values is None:
            return np.full(int(offsets[-1]), np.nan)
        assert [len(x) for x in values] == lengths
        return np.concatenate([np.asarray(x, dtype=np.float64) for x in values])

    return TokenScores(offsets, flat(ri), flat(kn), flat(tr))


def all_response(scores: TokenScores) -> tuple[np.ndarray, np.ndarray]:
    return np.ones(scores.n_tokens, bool), np.zeros(scores.n_tokens, bool)


def union(**kwargs) -> XTFConfig:
    """Union config with caps that never bind and a loose ceiling, unless overridden."""
    kwargs.setdefault("caps", WIDE)
    kwargs.setdefault("drop_ratio", 0.9)
    kwargs.setdefault("ri_scale", "linear")  # the hand-computed fences below are on the raw scores
    kwargs.setdefault("tr_mask_classes", [1])  # ... and the TR cases use the paper's class rule
    return XTFConfig(mode="union", **kwargs)


def run(scores: TokenScores, config: XTFConfig, response=None, protected=None) -> Selection:
    default_response, default_protected = all_response(scores)
    response = default_response if response is None else np.asarray(response, bool)
    protected = default_protected if protected is None else np.asarray(protected, bool)
    return select_tokens(scores, response, protected, config)


# ------------------------------------------------------------------------------------------------------
# 1. RI: Tukey fence per example


def test_tukey_fence_linear_quantiles():
    # sorted [-10, 1, 2, 3, 4, 5], n = 6: Q1 at position 0.25 * 5 = 1.25 -> 1 + 0.25 * (2 - 1) = 1.25,
    # Q3 at position 3.75 -> 3 + 0.75 * (4 - 3) = 3.75; IQR = 2.5
    values = np.array([-10.0, 1, 2, 3, 4, 5])
    assert tukey_fence(values, 1.5) == pytest.approx(1.25 - 1.5 * 2.5)  # -2.5
    assert tukey_fence(values, 0.0) == pytest.approx(1.25)
    assert tukey_fence(values, 5.0) == pytest.approx(1.25 - 12.5)  # -11.25
    # the fence is of the finite values: a NaN is ignored, not propagated
    assert tukey_fence(np.array([NAN, -10.0, 1, 2, 3, 4, 5]), 1.5) == pytest.approx(-2.5)


def test_ri_fence_is_per_example():
    # example A: sorted [0, 10..17] (n = 9): Q1 = value at position 2 = 11, Q3 = position 6 = 15, IQR = 4,
    #   fence = 11 - 1.5 * 4 = 5 -> only the 0 (last token) is below it.
    # example B (A times 100, with 400 instead of 0): Q1 = 1100, Q3 = 1500, fence = 1100 - 600 = 500 ->
    #   only the 400 is below it.
    # A single dataset-wide fence (Q1 = 13.25, Q3 = 1275 over all 18 values) would be negative and flag
    # nothing, so flagging both proves the fence is per example.
    a = [10, 11, 12, 13, 14, 15, 16, 17, 0]
    b = [1000, 1100, 1200, 1300, 1400, 1500, 1600, 1700, 400]
    scores = make_scores([a, b])
    selection = run(scores, union())
    expected = np.array([0] * 8 + [1] + [0] * 8 + [1], np.uint8)
    np.testing.assert_array_equal(selection.flagged, expected)
    # ceiling floor(0.9 * 9) = 8 and cap floor(1.0 * 9) = 9 do not bind
    np.testing.assert_array_equal(selection.reasons, expected)
    fence = selection.thresholds["ri_fence"]
    assert fence["examples"] == 2
    assert fence["min"] == pytest.approx(5.0)
    assert fence["max"] == pytest.approx(500.0)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        # fences from test_tukey_fence_linear_quantiles: k=1.5 -> -2.5 (only -10 below);
        # k=0 -> 1.25 (-10 and 1 below); k=5 -> -11.25 (nothing below)
        (1.5, [1, 0, 0, 0, 0, 0]),
        (0.0, [1, 1, 0, 0, 0, 0]),
        (5.0, [0, 0, 0, 0, 0, 0]),
    ],
)
def test_ri_fence_k(k, expected):
    scores = make_scores([[-10, 1, 2, 3, 4, 5]])
    selection = run(scores, union(ri_fence_k=k))  # ceiling floor(0.9 * 6) = 5
    np.testing.assert_array_equal(selection.reasons, np.array(expected, np.uint8))
    np.testing.assert_array_equal(selection.flagged, np.array(expected, np.uint8))


def test_ri_fence_on_log_scale():
    # RI = e^[-10, 0, 1, 2, 3, 4]. Log scale: sorted logs, Q1 = 0 + 0.25 * 1 = 0.25, Q3 = 2 + 0.75 * 1 = 2.75,
    # fence = 0.25 - 1.5 * 2.5 = -3.5 -> e^-10 is flagged.
    # Linear scale: Q1 = 1 + 0.25 * (e - 1) = 1.43, Q3 = e^2 + 0.75 * (e^3 - e^2) = 16.91, fence = 1.43 -
    # 1.5 * 15.48 < 0 -> nothing is flagged: the heavy upper tail hides the low outlier.
    scores = make_scores([list(np.exp([-10.0, 0, 1, 2, 3, 4]))])
    log_selection = run(scores, union(ri_scale="log"))
    np.testing.assert_array_equal(log_selection.reasons, np.array([1, 0, 0, 0, 0, 0], np.uint8))
    assert log_selection.thresholds["ri_fence"]["min"] == pytest.approx(-3.5)
    linear_selection = run(scores, union(ri_scale="linear"))
    np.testing.assert_array_equal(linear_selection.reasons, np.zeros(6, np.uint8))


def test_ri_ignores_nan_and_non_response_in_fence():
    # response tokens [-10, 1, 2, 3, 4, 5] as above (fence -2.5); a NaN response token and a prompt token
    # scored -1000 must not move the fence or be flagged themselves.
    scores = make_scores([[-1000, -10, 1, NAN, 2, 3, 4, 5]])
    response = [False, True, True, True, True, True, True, True]
    selection = run(scores, union(), response=response)
    np.testing.assert_array_equal(selection.reasons, np.array([0, 1, 0, 0, 0, 0, 0, 0], np.uint8))
    assert selection.thresholds["ri_fence"]["min"] == pytest.approx(-2.5)


# ------------------------------------------------------------------------------------------------------
# 2. KN: p(token) > kn_p_threshold, i.e. kn < 1 - kn_p_threshold


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        # kn < 0.05: 0.01, 0.04, 0.0 (0.07, 0.2, 0.5 are not; NaN never lacks)
        (0.95, [2, 0, 2, 0, 0, 2, 0]),
        # kn < 0.1: also 0.07
        (0.9, [2, 0, 2, 0, 0, 2, 2]),
        # kn < 0.6: everything finite
        (0.4, [2, 2, 2, 2, 0, 2, 2]),
    ],
)
def test_kn_threshold(threshold, expected):
    scores = make_scores([[NAN] * 7], kn=[[0.01, 0.2, 0.04, 0.5, NAN, 0.0, 0.07]])
    # ceiling floor(0.9 * 7) = 6 does not bind (at most 6 flagged)
    selection = run(scores, union(kn_p_threshold=threshold))
    np.testing.assert_array_equal(selection.reasons, np.array(expected, np.uint8))
    assert selection.thresholds["kn_p_threshold"] == threshold


# ------------------------------------------------------------------------------------------------------
# 3. TR: dataset-wide Multi-Otsu


# five clusters 0, 1, 2, 3, 4 (repeated values); example 1 holds only clusters 0 and 1, example 2 the rest
# plus one 1 and one 0 -- a per-example fit would put different cuts in each example.
TR_EXAMPLES = [[0.0, 0.0, 1.0, 1.0, 3.0], [2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 1.0, 0.0]]


def test_multiotsu_thresholds_match_skimage():
    values = np.concatenate([np.asarray(x) for x in TR_EXAMPLES])
    ours = multiotsu_thresholds(values, 5)
    theirs = threshold_multiotsu(values.astype(np.float64), classes=5)
    np.testing.assert_allclose(ours, theirs)
    # five separated clusters: each cut lies between two neighbouring clusters
    assert ours.shape == (4,)
    for c, cut in enumerate(ours):
        assert c < cut < c + 1
    # NaN is ignored
    np.testing.assert_allclose(multiotsu_thresholds(np.concatenate([values, [NAN, NAN]]), 5), theirs)
    # too few distinct values for 5 classes -> None
    assert multiotsu_thresholds(np.array([0.0, 1, 2, 3, 3, 3]), 5) is None
    assert multiotsu_thresholds(np.array([0.0, 1]), 5) is None


def test_tr_masks_second_lowest_class_only():
    scores = make_scores([[NAN] * 5, [NAN] * 8], tr=TR_EXAMPLES)
    selection = run(scores, union(tr_mask_classes=[1]))
    # class = cluster value (cuts between clusters); tr_mask_classes [1] (the paper) -> the 1.0 tokens only,
    # class-0 tokens (0.0) are kept. Ceilings floor(0.9*5) = 4, floor(0.9*8) = 7 do not bind.
    expected = np.array([0, 0, 4, 4, 0] + [0, 0, 0, 0, 0, 0, 4, 0], np.uint8)
    np.testing.assert_array_equal(selection.reasons, expected)
    np.testing.assert_array_equal(selection.flagged, expected)
    values = np.concatenate([np.asarray(x) for x in TR_EXAMPLES])
    np.testing.assert_allclose(selection.thresholds["tr_otsu_thresholds"], threshold_multiotsu(values, classes=5))


def test_tr_mask_classes_zero_and_one():
    scores = make_scores([[NAN] * 5, [NAN] * 8], tr=TR_EXAMPLES)
    selection = run(scores, union(tr_mask_classes=[0, 1]))
    # clusters 0 and 1 -> example 1: 4 of 5 (ceiling floor(0.9*5) = 4, cap 5: both fit), example 2: the
    # trailing 1.0 and 0.0
    expected = np.array([4, 4, 4, 4, 0] + [0, 0, 0, 0, 0, 0, 4, 4], np.uint8)
    np.testing.assert_array_equal(selection.reasons, expected)


def test_tr_fit_uses_response_tokens_only():
    # prompt tokens with extreme TR (-100, 100) would change the cuts if they took part in the fit; they
    # must not, so the result equals the response-only case above.
    tr = [[-100.0, *TR_EXAMPLES[0]], [100.0, *TR_EXAMPLES[1]]]
    scores = make_scores([[NAN] * 6, [NAN] * 9], tr=tr)
    response = [False] + [True] * 5 + [False] + [True] * 8
    selection = run(scores, union(), response=response)
    expected = np.array([0, 0, 0, 4, 4, 0] + [0, 0, 0, 0, 0, 0, 0, 4, 0], np.uint8)
    np.testing.assert_array_equal(selection.reasons, expected)


# ------------------------------------------------------------------------------------------------------
# 4. Per-attribute caps


KN_CAP = [0.03, 0.01, 0.02, 0.01, 0.5, 0.6, 0.7, 0.8, 0.9, 0.4]  # kn < 0.05 at positions 0, 1, 2, 3


@pytest.mark.parametrize(
    ("cap", "expected_dropped"),
    [
        # floor(0.1 * 10) = 1: lowest kn is 0.01 at positions 1 and 3 -> tie -> earlier position 1
        (0.1, [1]),
        # floor(0.25 * 10) = 2: both 0.01s
        (0.25, [1, 3]),
        # floor(0.3 * 10) = 3: then 0.02 at position 2
        (0.3, [1, 2, 3]),
        # floor(0.5 * 10) = 5 >= 4 flagged: all of them
        (0.5, [0, 1, 2, 3]),
        # floor(0.05 * 10) = 0
        (0.05, []),
    ],
)
def test_caps_keep_most_lacking(cap, expected_dropped):
    scores = make_scores([[NAN] * 10], kn=[KN_CAP])
    selection = run(scores, union(caps={"reasoning": 1.0, "novelty": cap, "relevance": 1.0}))
    expected = np.zeros(10, np.uint8)
    expected[expected_dropped] = 2
    np.testing.assert_array_equal(selection.reasons, expected)
    # flagged is before the caps
    np.testing.assert_array_equal(selection.flagged, np.array([2, 2, 2, 2, 0, 0, 0, 0, 0, 0], np.uint8))


def test_caps_are_per_example_and_per_attribute():
    # Example 1 = KN_CAP (n = 10, cap floor(0.1 * 10) = 1 -> position 1).
    # Example 2 has 20 tokens, kn < 0.05 at positions 0..3 (values 0.04, 0.03, 0.02, 0.01):
    #   cap floor(0.1 * 20) = 2 -> the two lowest, positions 3 (0.01) and 2 (0.02).
    # RI in example 2: values 10..29 except -50 at position 2 and -60 at position 5; sorted:
    #   -60, -50, 10, 11, 13, 14, 16, 17, ..., 29: Q1 at position 4.75 = 13 + 0.75 * 1 = 13.75, Q3 at
    #   position 14.25 = 24.25, fence 13.75 - 1.5 * 10.5 = -2 -> only the two negatives fail RI.
    #   RI cap floor(0.1 * 20) = 2 -> both.
    # Position 2 fails both tests and is kept by both caps -> bits 1 | 2 = 3.
    ri2 = [float(10 + i) for i in range(20)]
    ri2[2], ri2[5] = -50.0, -60.0
    kn2 = [0.04, 0.03, 0.02, 0.01] + [0.5] * 16
    scores = make_scores([[NAN] * 10, ri2], kn=[KN_CAP, kn2])
    caps = {"reasoning": 0.1, "novelty": 0.1, "relevance": 0.1}
    selection = run(scores, union(caps=caps))
    expected = np.zeros(30, np.uint8)
    expected[1] = 2
    expected[10 + 3] = 2
    expected[10 + 2] = 3
    expected[10 + 5] = 1
    np.testing.assert_array_equal(selection.reasons, expected)


# ------------------------------------------------------------------------------------------------------
# 5. Union ceiling (drop_ratio)


# n = 10. RI: sorted -100, -90, 10, 11, 12, ..., 17: Q1 at 2.25 = 10.25, Q3 at 6.75 = 14.75, fence
# 10.25 - 1.5 * 4.5 = 3.5 -> positions 0 (-90) and 3 (-100) fail.
# KN (< 0.05): positions 0 (0.02), 1 (0.01), 2 (0.03) fail.
# So position 0 has two reasons (bits 3); 1 and 2 have bit 2; 3 has bit 1.
# Lack ranks (normalised rank over the 10 tokens, min over the enabled attributes RI and KN):
#   position 1: kn rank 0 -> 0; position 3: ri rank 0 -> 0; position 2: kn rank 2/9; position 0: 1/9.
CEIL_RI = [-90, 10, 11, -100, 12, 13, 14, 15, 16, 17]
CEIL_KN = [0.02, 0.01, 0.03, 0.5, 0.6, 0.7, 0.8, 0.9, 0.55, 0.65]


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [
        # floor(0.1 * 10) = 1: the two-reason token wins although 1 and 3 are more lacking
        (0.1, [3, 0, 0, 0]),
        # floor(0.2 * 10) = 2: then 1 or 3 (both lack rank 0) -> earlier position 1
        (0.2, [3, 2, 0, 0]),
        # floor(0.3 * 10) = 3: then 3 (lack 0) before 2 (lack 2/9)
        (0.3, [3, 2, 0, 1]),
        # floor(0.5 * 10) = 5 >= 4: everything flagged
        (0.5, [3, 2, 2, 1]),
        # floor(0.05 * 10) = 0: nothing
        (0.05, [0, 0, 0, 0]),
    ],
)
def test_union_ceiling(ratio, expected):
    scores = make_scores([CEIL_RI], kn=[CEIL_KN])
    selection = run(scores, union(drop_ratio=ratio))
    np.testing.assert_array_equal(selection.reasons, np.array(expected + [0] * 6, np.uint8))
    np.testing.assert_array_equal(selection.flagged, np.array([3, 2, 2, 1] + [0] * 6, np.uint8))


def test_union_ceiling_ignores_switched_off_attribute():
    # RI only (novelty weight 0): positions 0 (-90) and 3 (-100) fail RI; ceiling floor(0.1 * 10) = 1 ->
    # the lower RI, position 3. KN is switched off, so its scores (position 0 has the lowest kn) must not
    # make position 0 "more lacking".
    kn = [0.0, 0.5, 0.5, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    scores = make_scores([CEIL_RI], kn=[kn])
    config = union(drop_ratio=0.1, weights={"reasoning": 1.0, "novelty": 0.0, "relevance": 1.0})
    selection = run(scores, config)
    np.testing.assert_array_equal(selection.reasons, np.array([0, 0, 0, 1] + [0] * 6, np.uint8))


# ------------------------------------------------------------------------------------------------------
# 6. A zero weight switches an attribute off in union mode


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"reasoning": 0.0, "novelty": 1.0, "relevance": 1.0}, [2, 2, 2, 0]),  # no bit 1
        ({"reasoning": 1.0, "novelty": 0.0, "relevance": 1.0}, [1, 0, 0, 1]),  # no bit 2
        ({"reasoning": 1.0, "novelty": 1.0, "relevance": 1.0}, [3, 2, 2, 1]),
    ],
)
def test_zero_weight_switches_attribute_off(weights, expected):
    scores = make_scores([CEIL_RI], kn=[CEIL_KN])
    selection = run(scores, union(weights=weights))  # ceiling floor(0.9 * 10) = 9
    np.testing.assert_array_equal(selection.flagged, np.array(expected + [0] * 6, np.uint8))
    np.testing.assert_array_equal(selection.reasons, np.array(expected + [0] * 6, np.uint8))
    assert ("ri_fence" in selection.thresholds) == (weights["reasoning"] > 0)


def test_zero_relevance_weight_skips_otsu():
    scores = make_scores([[NAN] * 5, [NAN] * 8], tr=TR_EXAMPLES)
    selection = run(scores, union(weights={"reasoning": 1.0, "novelty": 1.0, "relevance": 0.0}))
    assert not selection.flagged.any()
    assert "tr_otsu_thresholds" not in selection.thresholds


# ------------------------------------------------------------------------------------------------------
# 7. Protected and non-response tokens


def test_protected_and_prompt_never_dropped_union():
    # positions 0, 1: prompt (response False) with the lowest kn; position 7: EOS, protected, kn 0.
    # Response tokens 2..7 (n = 6, ceiling floor(0.9 * 6) = 5): kn < 0.05 at 2 (0.01), 4 (0.02), 7 (EOS).
    kn = [0.0, 0.0, 0.01, 0.5, 0.02, 0.6, 0.7, 0.0]
    scores = make_scores([[NAN] * 8], kn=[kn])
    response = [False, False, True, True, True, True, True, True]
    protected = [False, False, False, False, False, False, False, True]
    selection = run(scores, union(), response=response, protected=protected)
    np.testing.assert_array_equal(selection.reasons, np.array([0, 0, 2, 0, 2, 0, 0, 0], np.uint8))
    # protected/prompt tokens are not even flagged (no test failed on a candidate)
    np.testing.assert_array_equal(selection.flagged, np.array([0, 0, 2, 0, 2, 0, 0, 0], np.uint8))
    # the combined score is NaN everywhere in union mode
    assert np.isnan(selection.combined).all()


def test_protected_never_dropped_weighted():
    # KN only; example scope; response = positions 1..5 (n = 5), position 1 protected.
    # kn ranks over the 5 response tokens: [0, .25, .5, .75, 1]; drop floor(0.4 * 5) = 2 lowest candidates
    # -> positions 2 and 3 (the protected position 1 is skipped). Reason bits: position 2 has kn rank
    # .25 <= .4 -> flagged bit 2; position 3 has rank .5 > .4 -> unexplained -> weakest (only) attribute KN.
    kn = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    scores = make_scores([[NAN] * 6], kn=[kn])
    response = [False, True, True, True, True, True]
    protected = [True, True, False, False, False, False]  # protected prompt token is just not a response
    config = XTFConfig(mode="weighted", drop_ratio=0.4, weights={"reasoning": 0, "novelty": 1, "relevance": 0})
    selection = run(scores, config, response=response, protected=protected)
    np.testing.assert_array_equal(selection.reasons, np.array([0, 0, 2, 2, 0, 0], np.uint8))
    np.testing.assert_array_equal(selection.flagged, np.array([0, 0, 2, 0, 0, 0], np.uint8))
    np.testing.assert_allclose(selection.combined, [NAN, 0.0, 0.25, 0.5, 0.75, 1.0])


def test_bad_mask_shape_raises():
    scores = make_scores([[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError):
        select_tokens(scores, np.ones(2, bool), np.zeros(3, bool), union())


# ------------------------------------------------------------------------------------------------------
# 8. Never empty


def test_never_empty_weighted_dataset_scope():
    # Example A (2 tokens, scores 0.1, 0.2 in all three attributes) and B (6 tokens, 1..6).
    # Dataset ranks over 8 tokens: A = 0, 1/7; B = 2/7 .. 7/7; combined = same.
    # Drop floor(0.5 * 8) = 4 lowest: A0, A1, B0, B1 -> A would be empty; rescue its highest combined, A1.
    # Bits: ranks 0, 1/7, 2/7, 3/7 are all <= 0.5 in every attribute -> 7.
    a = [0.1, 0.2]
    b = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    scores = make_scores([a, b], kn=[a, b], tr=[a, b])
    config = XTFConfig(mode="weighted", scope="dataset", drop_ratio=0.5)
    selection = run(scores, config)
    np.testing.assert_array_equal(selection.reasons, np.array([7, 0, 7, 7, 0, 0, 0, 0], np.uint8))


def test_never_empty_rescue_uses_combined_score_only():
    # KN is the only weighted attribute; RI (weight 0) ranks A the other way round and must not matter.
    # Dataset kn ranks: A = 0, 1/7 (kn 0.1, 0.2) -> both dropped with B0, B1 as above; the rescued token is
    # A1 (higher combined score), not A0.
    scores = make_scores([[5.0, 0.0], [1.0] * 6], kn=[[0.1, 0.2], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    config = XTFConfig(
        mode="weighted", scope="dataset", drop_ratio=0.5, weights={"reasoning": 0, "novelty": 1, "relevance": 0}
    )
    selection = run(scores, config)
    np.testing.assert_array_equal(selection.reasons, np.array([2, 0, 2, 2, 0, 0, 0, 0], np.uint8))


def test_never_empty_single_response_token():
    # one response token per example; dataset scope floor(0.9 * 3) = 2 -> both lower examples would be
    # emptied; each is rescued, so nothing is dropped at all.
    scores = make_scores([[1.0], [2.0], [3.0]], kn=[[1.0], [2.0], [3.0]], tr=[[1.0], [2.0], [3.0]])
    selection = run(scores, XTFConfig(mode="weighted", scope="dataset", drop_ratio=0.9))
    np.testing.assert_array_equal(selection.reasons, np.zeros(3, np.uint8))


# ------------------------------------------------------------------------------------------------------
# 9. Weighted mode


# Example 1 (n = 5): ri ranks [0, .25, .5, .75, 1]; kn the same; tr = [3, 1, 2, 5, 4] -> [.5, 0, .25, 1, .75]
#   combined = mean: [1/6, 1/6, 5/12, 5/6, 11/12]
# Example 2 (n = 4): ri = kn ranks [0, 1, 1/3, 2/3]; tr all tied -> average rank 1.5 / 3 = .5
#   combined: [1/6, 5/6, 7/18, 11/18]
W_RI = [[1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 40.0, 20.0, 30.0]]
W_KN = [[0.1, 0.2, 0.3, 0.4, 0.5], [0.6, 0.9, 0.7, 0.8]]
W_TR = [[3.0, 1.0, 2.0, 5.0, 4.0], [0.0, 0.0, 0.0, 0.0]]


def test_weighted_example_scope():
    scores = make_scores(W_RI, kn=W_KN, tr=W_TR)
    selection = run(scores, XTFConfig(mode="weighted", scope="example", drop_ratio=0.4))
    np.testing.assert_allclose(
        selection.combined, [1 / 6, 1 / 6, 5 / 12, 5 / 6, 11 / 12, 1 / 6, 5 / 6, 7 / 18, 11 / 18], rtol=1e-6
    )
    # example 1: floor(0.4 * 5) = 2 -> positions 0, 1. Bits (rank <= 0.4): position 0 ri 0, kn 0, tr .5
    #   -> 1|2 = 3; position 1 ri .25, kn .25, tr 0 -> 7.
    # example 2: floor(0.4 * 4) = 1 -> position 0: ri 0, kn 0, tr .5 -> 3.
    np.testing.assert_array_equal(selection.reasons, np.array([3, 7, 0, 0, 0, 3, 0, 0, 0], np.uint8))


def test_weighted_dataset_scope():
    # dataset ranks over 9 tokens (/8). ri: ex1 [0, 1, 2, 3, 4], ex2 [5, 8, 6, 7]; kn the same.
    # tr: four tied zeros -> rank 1.5 each; 1 -> 4, 2 -> 5, 3 -> 6, 4 -> 7, 5 -> 8: ex1 [6, 4, 5, 8, 7].
    # combined * 24: ex1 [6, 6, 9, 14, 15], ex2 [11.5, 17.5, 13.5, 15.5].
    # drop floor(0.4 * 9) = 3 globally: ex1 positions 0, 1, 2; nothing from ex2.
    # Bits (rank <= 0.4): ex1 ri/kn ranks 0, 1/8, 2/8 pass, tr ranks 6/8, 4/8, 5/8 do not -> 3 each.
    # flagged: ex1 also position 3 (ri/kn 3/8); ex2 all tr ranks 1.5/8 pass -> 4 for every token there.
    scores = make_scores(W_RI, kn=W_KN, tr=W_TR)
    selection = run(scores, XTFConfig(mode="weighted", scope="dataset", drop_ratio=0.4))
    np.testing.assert_allclose(selection.combined, np.array([6, 6, 9, 14, 15, 11.5, 17.5, 13.5, 15.5]) / 24, rtol=1e-6)
    np.testing.assert_array_equal(selection.reasons, np.array([3, 3, 3, 0, 0, 0, 0, 0, 0], np.uint8))
    np.testing.assert_array_equal(selection.flagged, np.array([3, 3, 3, 3, 0, 4, 4, 4, 4], np.uint8))


def test_weighted_unexplained_drop_blamed_on_weakest_attribute():
    # RI and KN only. ri = [2, 1, 5, 3, 4] -> ranks [.25, 0, 1, .5, .75];
    # kn = [.2, .5, .1, .4, .3] -> ranks [.25, 1, 0, .75, .5]; combined [.25, .5, .5, .625, .625].
    # drop floor(0.2 * 5) = 1 -> position 0, whose ranks .25 are both above 0.2 (not flagged); blamed on
    # the weakest attribute, a tie .25/.25 -> the first, RI -> bit 1.
    scores = make_scores([[2.0, 1.0, 5.0, 3.0, 4.0]], kn=[[0.2, 0.5, 0.1, 0.4, 0.3]])
    config = XTFConfig(mode="weighted", drop_ratio=0.2, weights={"reasoning": 1, "novelty": 1, "relevance": 0})
    selection = run(scores, config)
    np.testing.assert_allclose(selection.combined, [0.25, 0.5, 0.5, 0.625, 0.625])
    np.testing.assert_array_equal(selection.reasons, np.array([1, 0, 0, 0, 0], np.uint8))
    # flagged: position 1 ri rank 0 -> 1; position 2 kn rank 0 -> 2
    np.testing.assert_array_equal(selection.flagged, np.array([0, 1, 2, 0, 0], np.uint8))


def test_weighted_weights_scale_the_mix():
    # ri ranks [0, .5, 1], kn ranks [1, .5, 0] (n = 3). Weights ri 3, kn 1:
    # combined = (3 * ri + kn) / 4 = [.25, .5, .75]; floor(0.5 * 3) = 1 -> position 0.
    scores = make_scores([[1.0, 2.0, 3.0]], kn=[[0.9, 0.5, 0.1]])
    config = XTFConfig(mode="weighted", drop_ratio=0.5, weights={"reasoning": 3, "novelty": 1, "relevance": 0})
    combined, ranks = combined_scores(scores, np.ones(3, bool), config)
    np.testing.assert_allclose(combined, [0.25, 0.5, 0.75])
    assert set(ranks) == {"reasoning", "novelty"}
    np.testing.assert_allclose(ranks["reasoning"], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(ranks["novelty"], [1.0, 0.5, 0.0])
    selection = run(scores, config)
    # position 0: ri rank 0 <= .5 -> 1 (kn rank 1 is not)
    np.testing.assert_array_equal(selection.reasons, np.array([1, 0, 0], np.uint8))


def test_combined_nan_outside_response():
    scores = make_scores([[1.0, 2.0, 3.0, 4.0]], kn=[[0.4, 0.3, 0.2, 0.1]], tr=[[1.0, 1.0, 2.0, 2.0]])
    response = np.array([False, True, True, True])
    combined, _ = combined_scores(scores, response, XTFConfig(mode="weighted"))
    # ranks over positions 1..3: ri [0, .5, 1]; kn [1, .5, 0]; tr [1, 2, 2] -> [0, .75, .75]
    # combined = [1/3, 1.75/3, 1.75/3]
    np.testing.assert_allclose(combined, [NAN, 1 / 3, 1.75 / 3, 1.75 / 3])


# ------------------------------------------------------------------------------------------------------
# 10. apply_selection


def test_apply_selection_direct():
    labels = np.array([-100, 5, 6, 7, 8, 9])
    selection = Selection(
        reasons=np.array([0, 0, 1, 0, 6, 4], np.uint8),
        flagged=np.array([0, 0, 1, 2, 6, 4], np.uint8),
        combined=np.full(6, np.nan, np.float32),
    )
    out = apply_selection(labels, selection)
    np.testing.assert_array_equal(out, [-100, 5, -100, 7, -100, -100])
    assert out.dtype == np.int64
    np.testing.assert_array_equal(selection.keep, [True, True, False, True, False, False])
    np.testing.assert_array_equal(labels, [-100, 5, 6, 7, 8, 9])  # input untouched


def test_apply_selection_after_select_tokens():
    # from test_union_ceiling with drop_ratio 0.3: drop [3, 2, 0, 1, 0...]
    scores = make_scores([CEIL_RI], kn=[CEIL_KN])
    selection = run(scores, union(drop_ratio=0.3))
    labels = np.arange(100, 110)
    expected = np.array([-100, -100, 102, -100, 104, 105, 106, 107, 108, 109])
    np.testing.assert_array_equal(apply_selection(labels, selection), expected)


# ------------------------------------------------------------------------------------------------------
# NaN handling in union mode


def test_nan_scores_never_lack_in_union():
    # every attribute NaN at position 5; the rest are made to fail every test.
    # RI: -100 at 0..1 in a population of 10..17 -> below the fence; KN 0.0 -> fails; TR: classes.
    ri = [-100, -100, 10, 11, 12, NAN, 13, 14, 15, 16]
    kn = [0.0, 0.0, 0.5, 0.5, 0.5, NAN, 0.5, 0.5, 0.5, 0.5]
    scores = make_scores([ri], kn=[kn], tr=[[0, 1, 2, 3, 4, NAN, 0, 1, 2, 3]])
    selection = run(scores, union())
    assert selection.flagged[5] == 0
    assert selection.reasons[5] == 0
    # TR with cuts between the clusters: class 1 = value 1 at positions 1 and 7
    np.testing.assert_array_equal(selection.flagged, np.array([3, 7, 0, 0, 0, 0, 0, 4, 0, 0], np.uint8))


# ------------------------------------------------------------------------------------------------------
# 11. Property test


@st.composite
def selection_problem(draw):
    n_examples = draw(st.integers(1, 5))
    lengths = draw(st.lists(st.integers(0, 15), min_size=n_examples, max_size=n_examples))
    n = sum(lengths)
    score = st.one_of(st.floats(-5, 5, allow_nan=False, width=32), st.just(NAN), st.sampled_from([0.0, 1.0]))
    arrays = [draw(st.lists(score, min_size=n, max_size=n)) for _ in range(3)]
    response = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    protected = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    scores = TokenScores(offsets, *(np.asarray(a, np.float64) for a in arrays))
    weights = draw(
        st.fixed_dictionaries(
            {name: st.sampled_from([0.0, 0.5, 1.0]) for name in ("reasoning", "novelty", "relevance")}
        )
    )
    if not any(weights.values()):
        weights["novelty"] = 1.0
    caps = draw(st.fixed_dictionaries({name: st.floats(0, 1) for name in ("reasoning", "novelty", "relevance")}))
    config = XTFConfig(
        mode=draw(st.sampled_from(["union", "weighted"])),
        scope=draw(st.sampled_from(["example", "dataset"])),
        drop_ratio=draw(st.floats(0, 0.99)),
        weights=weights,
        caps=caps,
        kn_p_threshold=draw(st.floats(0.05, 1.0)),
        ri_fence_k=draw(st.floats(0, 3)),
        # skimage's Multi-Otsu costs ~3 s per fit at 5 classes on spread-out values; 2..4 keeps this fast
        tr_otsu_classes=draw(st.integers(2, 4)),
        tr_mask_classes=draw(st.sampled_from([[1], [0, 1], [0]])),
    )
    return scores, np.array(response, bool), np.array(protected, bool), config


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(selection_problem())
def test_selection_invariants(problem):
    scores, response, protected, config = problem
    selection = select_tokens(scores, response, protected, config)
    drop, flagged = selection.reasons, selection.flagged
    assert drop.dtype == np.uint8 and drop.shape == (scores.n_tokens,)
    # never outside the response, never protected
    assert not drop[~response].any()
    assert not drop[protected].any()
    # only the three reason bits
    assert not (drop & ~np.uint8(7)).any()
    assert not (flagged & ~np.uint8(7)).any()
    for part in scores.example_slices():
        resp = response[part]
        n_resp = int(resp.sum())
        dropped = drop[part] > 0
        if n_resp:
            # at least one trainable token survives
            assert (resp & ~dropped).any()
        if config.mode == "union":
            assert dropped.sum() <= math.floor(config.drop_ratio * n_resp)
    if config.mode == "union":
        # dropped reasons come from failed tests, NaN never fails, switched-off attributes never fail
        assert not (drop & ~flagged).any()
        for bit, field, name in ((1, "ri", "reasoning"), (2, "kn", "novelty"), (4, "tr", "relevance")):
            has_bit = (flagged & bit) > 0
            assert not (has_bit & np.isnan(getattr(scores, field))).any()
            if getattr(config.weights, name) == 0:
                assert not has_bit.any()
        assert np.isnan(selection.combined).all()
    else:
        # every dropped token is blamed on at least one weighted (non-zero weight) attribute
        enabled_bits = sum(
            bit
            for bit, name in ((1, "reasoning"), (2, "novelty"), (4, "relevance"))
            if getattr(config.weights, name) > 0
        )
        assert not (drop & ~np.uint8(enabled_bits)).any()
        assert not (flagged & ~np.uint8(enabled_bits)).any()
        combined = selection.combined
        assert np.isnan(combined[~response]).all()
        assert np.isfinite(combined[response]).all()
        assert ((combined[response] >= 0) & (combined[response] <= 1)).all()
        candidate = response & ~protected
        if config.scope == "example":
            # exactly floor(drop_ratio * n) per example, fewer only when protected tokens leave too few
            for part in scores.example_slices():
                count = math.floor(config.drop_ratio * int(response[part].sum()))
                assert (drop[part] > 0).sum() == min(count, int(candidate[part].sum()))
        else:
            # floor(drop_ratio * N) overall, minus at most one rescued token per example
            count = min(math.floor(config.drop_ratio * int(response.sum())), int(candidate.sum()))
            assert count - scores.n_examples <= (drop > 0).sum() <= count
