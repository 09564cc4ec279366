"""Tests of qdquant.scoring: the contract's scoring rules on hand-made cells."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from skimage.filters import threshold_otsu

from qdquant.errors import InputError
from qdquant.scoring import (
    HER2_CLASSES,
    allred_score,
    calibrate_her2_thresholds,
    her2_cell_scores,
    her2_sample_score,
    intensity_bins,
    is_tumour,
    marker_sample_scores,
    receptor_status,
    surrogate_subtype,
    tumour_threshold_auto,
)

T = dict(t_faint=20.0, t_weak=60.0, t_strong=150.0, complete_fraction=0.9)


def cells(*rows):
    """Sector arrays from rows of (mean, npx) pairs: sum = mean * npx."""
    means = np.array([[m for m, _ in r] for r in rows], dtype=float)
    npx = np.array([[p for _, p in r] for r in rows], dtype=np.int64)
    return means * npx, npx


def score(*rows, **kw):
    return her2_cell_scores(*cells(*rows), **{**T, **kw})


# --------------------------------------------------------------------------
# HER2 per cell
# --------------------------------------------------------------------------


def test_sector_stained_exactly_at_t_faint():
    # 4 sectors, complete_fraction 0.75 so that completeness is visible
    i, c, k = score([(20, 2)] * 4, [(19.999, 2)] * 4, complete_fraction=0.75)
    np.testing.assert_array_equal(c, [1.0, 0.0])
    np.testing.assert_array_equal(i, [20.0, 0.0])
    assert list(k) == ["1+", "0"]


def test_sector_without_pixels_is_unstained_but_counts():
    s, p = cells([(100, 3), (100, 3), (100, 3), (0, 0)])
    s[0, 3] = 1e6  # a stray sum in a sector with no pixel is ignored
    i, c, k = her2_cell_scores(s, p, **T)
    assert c[0] == 0.75
    assert i[0] == 100.0
    assert k[0] == "2+"


def test_intensity_is_pixel_weighted_over_stained_sectors_only():
    # stained: (sum 100, 1 px) and (sum 90, 3 px) -> 190 / 4 = 47.5 (not 65);
    # the unstained sector (mean 10, 5 px) is left out
    s = np.array([[100.0, 90.0, 50.0]])
    p = np.array([[1, 3, 5]])
    i, c, k = her2_cell_scores(s, p, **T)
    assert i[0] == 47.5
    assert c[0] == pytest.approx(2 / 3)
    assert k[0] == "1+"


def test_no_stained_sector_gives_zero_intensity_and_class_0():
    i, c, k = score([(5, 4)] * 10, [(0, 0)] * 10)
    np.testing.assert_array_equal(i, [0.0, 0.0])
    np.testing.assert_array_equal(c, [0.0, 0.0])
    assert list(k) == ["0", "0"]


@pytest.mark.parametrize(
    "mean, expected",
    [(59.999, "1+"), (60.0, "2+"), (149.999, "2+"), (150.0, "3+"), (1000.0, "3+")],
)
def test_intensity_bands_of_a_complete_membrane(mean, expected):
    i, c, k = score([(mean, 3)] * 10)
    assert c[0] == 1.0 and i[0] == pytest.approx(mean)
    assert k[0] == expected


def test_complete_fraction_boundary():
    # 10 sectors, complete_fraction 0.9: 9 stained is complete, 8 is not
    strong, empty = (200, 2), (0, 0)
    i, c, k = score([strong] * 9 + [empty], [strong] * 8 + [empty] * 2)
    np.testing.assert_array_equal(c, [0.9, 0.8])
    assert list(k) == ["3+", "2+"]  # strong but incomplete is 2+


def test_incomplete_weak_and_faint_membranes():
    unstained = (1, 2)
    i, c, k = score([(30, 2)] * 2 + [unstained] * 8, [(80, 2)] * 2 + [unstained] * 8)
    np.testing.assert_array_equal(c, [0.2, 0.2])
    assert list(k) == ["1+", "2+"]


def test_her2_cell_scores_zero_cells_and_types():
    i, c, k = her2_cell_scores(np.zeros((0, 36)), np.zeros((0, 36), int), **T)
    assert i.shape == c.shape == k.shape == (0,)
    assert i.dtype == c.dtype == np.float64


def test_her2_cell_scores_types_and_no_mutation():
    s, p = cells([(30, 2)] * 4, [(200, 1)] * 4)
    s0, p0 = s.copy(), p.copy()
    i, c, k = her2_cell_scores(s.astype(np.float32), p.astype(np.uint16), **T)
    assert i.dtype == c.dtype == np.float64
    assert all(isinstance(x, str) for x in k)
    her2_cell_scores(s, p, **T)
    np.testing.assert_array_equal(s, s0)
    np.testing.assert_array_equal(p, p0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(t_faint=-1.0),
        dict(t_faint=60.0),  # t_faint == t_weak
        dict(t_weak=200.0),  # t_weak > t_strong
        dict(t_strong=float("nan")),
        dict(complete_fraction=0.0),
        dict(complete_fraction=1.5),
    ],
)
def test_her2_cell_scores_bad_thresholds(kw):
    with pytest.raises(InputError):
        score([(30, 2)] * 4, **kw)


def test_her2_cell_scores_bad_arrays():
    with pytest.raises(InputError, match="shapes"):
        her2_cell_scores(np.zeros((3, 4)), np.zeros((3, 5), int), **T)
    with pytest.raises(InputError):
        her2_cell_scores(np.zeros(4), np.zeros(4, int), **T)
    with pytest.raises(InputError):
        her2_cell_scores(np.zeros((1, 4)), -np.ones((1, 4), int), **T)
    with pytest.raises(InputError):
        her2_cell_scores(np.zeros((1, 4)), np.full((1, 4), 1.5), **T)
    with pytest.raises(InputError):
        her2_cell_scores(np.full((1, 4), np.nan), np.ones((1, 4), int), **T)


def _reference_cell(sums, npx, t_faint, t_weak, t_strong, cf):
    """Per-cell Python statement of the contract, for the property test."""
    stained = [n > 0 and s / n >= t_faint for s, n in zip(sums, npx)]
    completeness = sum(stained) / len(stained)
    pix = sum(n for n, st_ in zip(npx, stained) if st_)
    intensity = sum(s for s, st_ in zip(sums, stained) if st_) / pix if pix else 0.0
    if not any(stained):
        cls = "0"
    elif intensity < t_weak:
        cls = "1+"
    elif intensity < t_strong or completeness < cf:
        cls = "2+"
    else:
        cls = "3+"
    return intensity, completeness, cls


@settings(max_examples=60, deadline=None)
@given(
    means=hnp.arrays(np.float64, (5, 6), elements=st.sampled_from([0.0, 10.0, 20.0, 59.0, 60.0, 149.0, 150.0, 400.0])),
    npx=hnp.arrays(np.int64, (5, 6), elements=st.integers(0, 4)),
)
def test_her2_cell_scores_matches_per_cell_reference(means, npx):
    sums = means * npx
    i, c, k = her2_cell_scores(sums, npx, t_faint=20, t_weak=60, t_strong=150, complete_fraction=0.8)
    for row in range(5):
        ri, rc, rk = _reference_cell(sums[row], npx[row], 20, 60, 150, 0.8)
        assert i[row] == pytest.approx(ri)
        assert c[row] == rc
        assert k[row] == rk


# --------------------------------------------------------------------------
# HER2 per sample
# --------------------------------------------------------------------------


def classes(**counts):
    names = {"c0": "0", "c1": "1+", "c2": "2+", "c3": "3+"}
    return np.array([names[k] for k, n in counts.items() for _ in range(n)], dtype=object)


def test_exactly_10_percent_is_not_more_than_10():
    r = her2_sample_score(classes(c0=9, c3=1))
    assert r["her2_pct_3plus"] == 10.0
    assert r["her2_score"] == "0"
    assert r["her2_category"] == "HER2-ultralow"  # 10 % stained: at most 10 %


def test_11_of_100_three_plus_is_positive():
    r = her2_sample_score(classes(c0=89, c3=11))
    assert r["her2_score"] == "3+" and r["her2_category"] == "HER2-positive"
    assert r["her2_pct_0"] == 89.0 and r["her2_pct_3plus"] == 11.0


def test_sample_cascade():
    r = her2_sample_score(classes(c0=89, c2=6, c3=5))
    assert (r["her2_score"], r["her2_category"]) == ("2+", "HER2-equivocal")
    r = her2_sample_score(classes(c0=89, c1=1, c2=5, c3=5))  # exactly 10 % at 2+ or above
    assert (r["her2_score"], r["her2_category"]) == ("1+", "HER2-low")
    r = her2_sample_score(classes(c0=90, c2=5, c3=5))  # and exactly 10 % at 1+ or above
    assert (r["her2_score"], r["her2_category"]) == ("0", "HER2-ultralow")
    r = her2_sample_score(classes(c0=89, c1=6, c2=5))
    assert (r["her2_score"], r["her2_category"]) == ("1+", "HER2-low")
    r = her2_sample_score(classes(c0=90, c1=10))
    assert (r["her2_score"], r["her2_category"]) == ("0", "HER2-ultralow")
    assert r["her2_pct_1plus"] == 10.0
    total = sum(r[k] for k in ("her2_pct_0", "her2_pct_1plus", "her2_pct_2plus", "her2_pct_3plus"))
    assert total == pytest.approx(100.0)


def test_ultralow_versus_null():
    assert her2_sample_score(classes(c0=99, c1=1))["her2_category"] == "HER2-ultralow"  # 1 %
    assert her2_sample_score(classes(c0=100, c1=1))["her2_category"] == "HER2-null"  # 0.99 %
    assert her2_sample_score(classes(c0=100))["her2_category"] == "HER2-null"
    r = her2_sample_score(classes(c0=99, c1=1), ultralow_min_pct=2.0)
    assert (r["her2_score"], r["her2_category"]) == ("0", "HER2-null")
    r = her2_sample_score(classes(c0=98, c3=2), ultralow_min_pct=2.0)
    assert (r["her2_score"], r["her2_category"]) == ("0", "HER2-ultralow")


def test_sample_score_zero_cells():
    r = her2_sample_score(np.array([], dtype=object))
    assert r["her2_score"] is None and r["her2_category"] == "not assessable"
    for k in ("her2_pct_0", "her2_pct_1plus", "her2_pct_2plus", "her2_pct_3plus"):
        assert math.isnan(r[k])


def test_sample_score_accepts_cell_output_and_lists():
    _, _, k = score([(200, 2)] * 10, [(5, 2)] * 10)
    assert her2_sample_score(k)["her2_score"] == "3+"
    assert her2_sample_score(["0", "1+", "1+"])["her2_score"] == "1+"


@pytest.mark.parametrize("bad", [["0", "4+"], ["0", "1"], ["0", None], [0, 1]])
def test_sample_score_unknown_class(bad):
    with pytest.raises(InputError, match="unknown HER2 class"):
        her2_sample_score(bad)


@pytest.mark.parametrize("bad", [-1.0, 10.5, float("nan")])
def test_sample_score_bad_ultralow_min_pct(bad):
    with pytest.raises(InputError):
        her2_sample_score(["0"], ultralow_min_pct=bad)


# --------------------------------------------------------------------------
# Other markers
# --------------------------------------------------------------------------


def test_intensity_bins_at_thresholds_and_nan():
    v = np.array([0.0, 9.99, 10.0, 19.99, 20.0, 29.99, 30.0, 1e6, np.nan])
    np.testing.assert_array_equal(
        intensity_bins(v, t1=10, t2=20, t3=30), [0, 0, 1, 1, 2, 2, 3, 3, -1]
    )
    np.testing.assert_array_equal(intensity_bins(v, t1=10), [0, 0, 1, 1, 1, 1, 1, 1, -1])
    assert intensity_bins(np.array([]), t1=1).shape == (0,)
    # equal thresholds (allowed by the panel) leave the bin between them empty
    np.testing.assert_array_equal(intensity_bins([5.0, 10.0, 30.0], t1=10, t2=10, t3=30), [0, 2, 3])


@pytest.mark.parametrize(
    "kw",
    [
        dict(t1=20, t2=10, t3=30),
        dict(t1=10, t2=30, t3=20),
        dict(t1=-1),
        dict(t1=10, t3=30),
        dict(t1=float("inf")),
        dict(t1="10"),
    ],
)
def test_intensity_bins_bad_thresholds(kw):
    with pytest.raises(InputError):
        intensity_bins([1.0, 2.0], **kw)


def test_hscore_hand_example_and_nan_cells_left_out():
    # bins 0, 1, 2, 3, 3 and one cell without pixels (NaN, not evaluable)
    v = [1.0, 15.0, 25.0, 35.0, 99.0, np.nan]
    r = marker_sample_scores(v, score="hscore", t1=10, t2=20, t3=30, marker="ER")
    assert r == {"ER_pct_positive": 80.0, "ER_hscore": 20 + 2 * 20 + 3 * 40}


def test_hscore_range():
    th = dict(t1=10, t2=20, t3=30, marker="PR", score="hscore")
    assert marker_sample_scores([50.0] * 7, **th)["PR_hscore"] == 300.0
    assert marker_sample_scores([0.0] * 7, **th) == {"PR_pct_positive": 0.0, "PR_hscore": 0.0}


def test_percent_positive_keys():
    r = marker_sample_scores([5.0, 10.0, 11.0, np.nan], score="percent_positive", t1=10, marker="Ki67")
    assert r.keys() == {"Ki67_pct_positive"}
    assert r["Ki67_pct_positive"] == pytest.approx(200 / 3)


def test_zero_evaluable_cells_give_nan():
    for kind, extra in [("hscore", "ER_hscore"), ("allred", "ER_allred"), ("percent_positive", None)]:
        for v in ([], [np.nan, np.nan]):
            r = marker_sample_scores(v, score=kind, t1=1, t2=2, t3=3, marker="ER")
            assert math.isnan(r["ER_pct_positive"])
            if extra:
                assert math.isnan(r[extra])
            assert len(r) == (2 if extra else 1)


@pytest.mark.parametrize(
    "pct, proportion",
    [
        (0.01, 1), (0.99, 1), (1.0, 2), (5.0, 2), (10.0, 2), (10.01, 3), (33.0, 3),
        (33.01, 4), (66.0, 4), (66.01, 5), (100.0, 5),
    ],
)
def test_allred_proportion_boundaries(pct, proportion):
    assert allred_score(pct, 1.0) == proportion + 1


@pytest.mark.parametrize(
    "m, intensity",
    [(1.0, 1), (5 / 3, 1), (5 / 3 + 1e-9, 2), (2.0, 2), (7 / 3, 2), (7 / 3 + 1e-9, 3), (3.0, 3)],
)
def test_allred_intensity_boundaries(m, intensity):
    assert allred_score(50.0, m) == 4 + intensity


def test_allred_no_positive_cell_is_zero():
    assert allred_score(0.0, float("nan")) == 0
    with pytest.raises(InputError):
        allred_score(101.0, 1.0)
    with pytest.raises(InputError):
        allred_score(50.0, 0.5)
    with pytest.raises(InputError):
        allred_score(float("nan"), 1.0)


def _allred(bins_of_positive, n_cells):
    """marker_sample_scores Allred of n_cells with given positive bins (others negative)."""
    level = {1: 15.0, 2: 25.0, 3: 35.0}
    v = [level[b] for b in bins_of_positive] + [0.0] * (n_cells - len(bins_of_positive))
    return marker_sample_scores(v, score="allred", t1=10, t2=20, t3=30, marker="ER")


@pytest.mark.parametrize(
    "n_pos, n_cells, proportion",
    [
        (0, 100, 0), (1, 101, 1), (1, 100, 2), (10, 100, 2), (11, 100, 3), (33, 100, 3),
        (34, 100, 4), (1, 3, 4), (66, 100, 4), (67, 100, 5), (2, 3, 5), (5, 5, 5),
    ],
)
def test_allred_from_cells_every_proportion_boundary(n_pos, n_cells, proportion):
    r = _allred([1] * n_pos, n_cells)
    assert r["ER_allred"] == (proportion + 1 if n_pos else 0)
    assert isinstance(r["ER_allred"], int)
    assert r.keys() == {"ER_pct_positive", "ER_allred"}


def test_allred_from_cells_mean_bin():
    # m = 7/3 exactly (3, 3, 1): intensity 2; (3, 3, 2) m = 8/3: 3
    assert _allred([3, 3, 1], 3)["ER_allred"] == 5 + 2
    assert _allred([3, 3, 2], 3)["ER_allred"] == 5 + 3
    # m = 5/3 exactly (2, 2, 1): intensity 1; (2, 2, 2): 2
    assert _allred([2, 2, 1], 30)["ER_allred"] == 2 + 1
    assert _allred([2, 2, 2], 30)["ER_allred"] == 2 + 2


def test_marker_scores_bad_input():
    with pytest.raises(InputError, match="unknown score kind"):
        marker_sample_scores([1.0], score="her2", t1=1, marker="ER")
    with pytest.raises(InputError, match="t1, t2 and t3"):
        marker_sample_scores([1.0], score="hscore", t1=1, marker="ER")
    with pytest.raises(InputError):
        marker_sample_scores([1.0], score="allred", t1=3, t2=2, t3=4, marker="ER")
    with pytest.raises(InputError):
        marker_sample_scores([[1.0]], score="percent_positive", t1=1, marker="ER")
    with pytest.raises(InputError):
        marker_sample_scores([1.0], score="percent_positive", t1=1, marker="")


# --------------------------------------------------------------------------
# Receptor status and surrogate subtype
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pct, status",
    [
        (0.0, "negative"), (0.99, "negative"), (1.0, "low_positive"), (10.0, "low_positive"),
        (10.01, "positive"), (100.0, "positive"), (float("nan"), "not assessable"),
        (None, "not assessable"),
    ],
)
def test_receptor_status(pct, status):
    assert receptor_status(pct) == status


@pytest.mark.parametrize("bad", [-0.1, 100.1, "5"])
def test_receptor_status_bad(bad):
    with pytest.raises(InputError):
        receptor_status(bad)


@pytest.mark.parametrize(
    "args, kw, expected",
    [
        # row 1: equivocal wins whatever the receptors (even unknown)
        (("2+", 90, 90, 50), {}, "HER2-equivocal"),
        (("2+", 0, 0), {}, "HER2-equivocal"),
        (("2+", float("nan"), float("nan")), {}, "HER2-equivocal"),
        # rows 2-3: HER2-positive, HR by ER or PR >= 1 %
        (("3+", 50, 0), {}, "Luminal B-like (HER2-positive)"),
        (("3+", 0, 1), {}, "Luminal B-like (HER2-positive)"),
        (("3+", 1, 0, 5), {}, "Luminal B-like (HER2-positive)"),
        (("3+", 0.99, 0.99), {}, "HER2-positive (non-luminal)"),
        # row 4
        (("0", 0.5, 0.5, 90), {}, "Triple-negative"),
        (("1+", 0, 0), {}, "Triple-negative"),
        # row 5 before rows 6-7: ER < 1 % or PR < cut-off
        (("1+", 0.5, 30, 5), {}, "Luminal B-like (HER2-negative)"),
        (("0", 80, 19.99, 5), {}, "Luminal B-like (HER2-negative)"),
        (("0", 80, 19.99), {}, "Luminal B-like (HER2-negative)"),
        (("0", 80, 25, 5), dict(pr_cutoff_pct=30), "Luminal B-like (HER2-negative)"),
        # row 6: Ki67 not in the panel
        (("0", 80, 20), {}, "Luminal (HER2-negative)"),
        (("1+", 1, 50, None), {}, "Luminal (HER2-negative)"),
        # rows 7-8: Ki67 cut-off
        (("0", 80, 20, 19.99), {}, "Luminal A-like"),
        (("1+", 80, 50, 20), {}, "Luminal B-like (HER2-negative)"),
        (("1+", 80, 50, 25), dict(ki67_cutoff_pct=30), "Luminal A-like"),
        (("1+", 80, 50, 14), dict(ki67_cutoff_pct=14), "Luminal B-like (HER2-negative)"),
    ],
)
def test_surrogate_subtype_table(args, kw, expected):
    assert surrogate_subtype(*args, **kw) == expected


def test_surrogate_subtype_not_assessable():
    nan = float("nan")
    assert surrogate_subtype(None, 50, 50, 10) == "not assessable"
    assert surrogate_subtype(nan, 50, 50, 10) == "not assessable"
    # HR unknown: ER NaN and PR negative
    assert surrogate_subtype("3+", nan, 0.5) == "not assessable"
    # HR known positive through PR although ER is NaN
    assert surrogate_subtype("3+", nan, 5) == "Luminal B-like (HER2-positive)"
    # HER2-negative, HR positive but ER NaN: row 5 (ER < 1 % ?) cannot be decided
    assert surrogate_subtype("0", nan, 50, 10) == "not assessable"
    # HR negative is decided on both; Ki67 not needed
    assert surrogate_subtype("0", 0, 0, nan) == "Triple-negative"
    # Ki67 in the panel but not evaluable
    assert surrogate_subtype("0", 80, 50, nan) == "not assessable"


@pytest.mark.parametrize(
    "args, kw",
    [(("4+", 1, 1), {}), (("3", 1, 1), {}), (("0", 101, 1), {}), (("0", 1, -1), {}),
     (("0", 50, 50, 10), dict(pr_cutoff_pct=-5)), (("0", 50, 50, 10), dict(ki67_cutoff_pct=float("nan")))],
)
def test_surrogate_subtype_bad_input(args, kw):
    with pytest.raises(InputError):
        surrogate_subtype(*args, **kw)


# --------------------------------------------------------------------------
# Tumour cells
# --------------------------------------------------------------------------


def test_tumour_threshold_on_bimodal_sample():
    rng = np.random.default_rng(1)
    stroma = rng.lognormal(np.log(5), 0.4, 300)
    tumour = rng.lognormal(np.log(200), 0.3, 200)
    v = np.concatenate([stroma, tumour, [np.nan]])
    v_before = v.copy()
    t = tumour_threshold_auto(v)
    calls = is_tumour(v, t)
    # exactly Otsu's high class on log1p, ...
    logv = np.log1p(v[:-1])
    np.testing.assert_array_equal(calls[:-1], logv > threshold_otsu(logv))
    assert not calls[-1]
    # ... which here is every tumour cell and at most one stroma outlier
    assert calls[300:500].all() and calls[:300].sum() <= 1
    assert 10 < t < tumour.min()
    np.testing.assert_array_equal(v, v_before)


def test_tumour_threshold_splits_two_values_and_equals_boundary():
    t = tumour_threshold_auto([0.0, 0.0, 10.0, 10.0])
    assert 0 < t < 10
    assert t == pytest.approx(np.expm1(np.log1p(10) / 2))
    np.testing.assert_array_equal(is_tumour([0.0, 10.0, t, np.nan], t), [False, True, True, False])


def test_tumour_threshold_degenerate_samples():
    t = tumour_threshold_auto([7.0, 7.0, 7.0, np.nan])
    assert t == pytest.approx(7.0)
    assert is_tumour([7.0, 7.0, 7.0], t).all()  # cannot split: every cell kept
    assert tumour_threshold_auto([-3.0, -1.0]) == 0.0  # negatives count as 0
    assert math.isnan(tumour_threshold_auto([]))
    assert math.isnan(tumour_threshold_auto([np.nan]))
    assert not is_tumour([1.0, 2.0], float("nan")).any()
    assert is_tumour(np.array([]), 5.0).shape == (0,)


def test_tumour_bad_input():
    with pytest.raises(InputError):
        is_tumour([1.0], -1.0)
    with pytest.raises(InputError):
        is_tumour([1.0], "auto")
    with pytest.raises(InputError):
        tumour_threshold_auto(np.zeros((2, 2)))


# --------------------------------------------------------------------------
# Calibration on control slides
# --------------------------------------------------------------------------

TRUE = dict(t_faint=20.0, t_weak=60.0, t_strong=150.0)
CF = 0.9
S = 36

# per kind of cell: sector mean range of its stained part, fraction of its
# sectors stained; under TRUE thresholds "0" -> 0, "1" -> 1+, "2" -> 2+,
# "3" -> 3+, "3i" (strong, incomplete) -> 2+
_KINDS = {
    "0": ((2, 12), (1.0, 1.0)),
    "1": ((26, 48), (0.3, 1.0)),
    "2": ((75, 125), (0.3, 1.0)),
    "3": ((190, 400), (1.0, 1.0)),
    "3i": ((190, 400), (0.3, 0.7)),
}
_TRUE_CLASS = {"0": "0", "1": "1+", "2": "2+", "3": "3+", "3i": "2+"}


def simulate_slide(rng, mix, n=150):
    """Cells of a slide: mix = {kind: fraction}; returns sector_sum, sector_npx."""
    kinds = list(mix)
    counts = rng.multinomial(n, [mix[k] for k in kinds])
    sums, npxs = [], []
    for kind, c in zip(kinds, counts):
        (lo, hi), (flo, fhi) = _KINDS[kind]
        npx = rng.integers(1, 7, size=(c, S))
        npx[rng.random((c, S)) < 0.03] = 0  # a few sectors without ring pixels
        level = rng.uniform(lo, hi, size=(c, 1)) * rng.uniform(0.9, 1.1, size=(c, S))
        on = rng.random((c, S)) < rng.uniform(flo, fhi, size=(c, 1))
        if kind == "3":
            on[:] = True
        mean = np.where(on, level, rng.uniform(0, 12, size=(c, S)))
        sums.append(mean * npx)
        npxs.append(npx)
    return np.concatenate(sums), np.concatenate(npxs)


def sample_score(sums, npx, th):
    _, _, k = her2_cell_scores(sums, npx, complete_fraction=CF, **th)
    return her2_sample_score(k)["her2_score"]


CONTROL_MIX = {
    "0": {"0": 0.96, "1": 0.04},
    "1+": {"0": 0.5, "1": 0.45, "2": 0.05},
    "2+": {"0": 0.3, "1": 0.35, "2": 0.25, "3": 0.04, "3i": 0.06},
    "3+": {"0": 0.1, "1": 0.2, "2": 0.2, "3": 0.4, "3i": 0.1},
}


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(2024)
    controls = []
    for known, mix in CONTROL_MIX.items():
        s, p = simulate_slide(rng, mix)
        assert sample_score(s, p, TRUE) == known  # the simulation is right
        controls.append((s, p, known))
    snapshot = [(s.copy(), p.copy()) for s, p, _ in controls]
    th = calibrate_her2_thresholds(controls, complete_fraction=CF)
    for (s, p, _), (s0, p0) in zip(controls, snapshot):
        np.testing.assert_array_equal(s, s0)
        np.testing.assert_array_equal(p, p0)
    return controls, th


def test_calibration_scores_controls_as_known(fitted):
    controls, th = fitted
    assert set(th) == {"t_faint", "t_weak", "t_strong"}
    assert 0 < th["t_faint"] < th["t_weak"] < th["t_strong"]
    for s, p, known in controls:
        assert sample_score(s, p, th) == known


def test_calibrated_thresholds_score_fresh_slides_like_the_truth(fitted):
    _, th = fitted
    # within a factor 1.5 of the thresholds the controls were made with
    for name, true in TRUE.items():
        assert true / 1.5 < th[name] < true * 1.5, (name, th)
    rng = np.random.default_rng(7)
    mixes = [
        {"0": 0.99, "1": 0.01},
        {"0": 0.95, "1": 0.05},
        {"0": 0.7, "1": 0.3},
        {"0": 0.6, "1": 0.3, "2": 0.1 * 0.3},
        {"0": 0.4, "1": 0.3, "2": 0.3},
        {"0": 0.4, "1": 0.2, "3i": 0.4},
        {"0": 0.5, "2": 0.3, "3": 0.03},
        {"0": 0.5, "2": 0.2, "3": 0.3},
        {"3": 0.8, "0": 0.2},
        {"1": 0.5, "3": 0.5},
    ]
    seen = set()
    for mix in mixes:
        s, p = simulate_slide(rng, mix, n=200)
        truth = sample_score(s, p, TRUE)
        seen.add(truth)
        assert sample_score(s, p, th) == truth
    assert seen == set(HER2_CLASSES)


def test_calibration_impossible_controls():
    rng = np.random.default_rng(3)
    s, p = simulate_slide(rng, CONTROL_MIX["2+"], n=60)
    controls = [(s, p, "0"), (s, p, "1+"), (s, p, "2+"), (s, p, "3+")]
    with pytest.raises(InputError, match="no thresholds"):
        calibrate_her2_thresholds(controls, complete_fraction=CF, grid_size=16)


def test_calibration_bad_input():
    rng = np.random.default_rng(4)
    s, p = simulate_slide(rng, CONTROL_MIX["1+"], n=20)
    with pytest.raises(InputError, match="missing 2\\+, 3\\+"):
        calibrate_her2_thresholds([(s, p, "0"), (s, p, "1+")], complete_fraction=CF)
    with pytest.raises(InputError, match="unknown HER2 score"):
        calibrate_her2_thresholds([(s, p, "4+")], complete_fraction=CF)
    with pytest.raises(InputError):
        calibrate_her2_thresholds([], complete_fraction=CF)
    with pytest.raises(InputError, match="shapes"):
        calibrate_her2_thresholds([(s, p[:, :-1], "0")], complete_fraction=CF)
    with pytest.raises(InputError):
        calibrate_her2_thresholds([(s, p)], complete_fraction=CF)
    with pytest.raises(InputError):
        calibrate_her2_thresholds([(s, p, "0")], complete_fraction=0)
    with pytest.raises(InputError, match="no cells"):
        calibrate_her2_thresholds([(s[:0], p[:0], "0")], complete_fraction=CF)
