"""The simulator's reference implementation of the contract, on literal arrays.

The simulator's truth comes from :mod:`qdquant.simulate.reference`, which
shares no code with the pipeline; these tests pin it to the contract's text,
and the last one checks that the pipeline's own implementation agrees with it.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from qdquant.config import schema
from qdquant.simulate import reference as ref

RULE = dict(t_faint=20.0, t_weak=60.0, t_strong=150.0, complete_fraction=0.9)


def test_simulator_imports_no_pipeline_code(tmp_path):
    code = (
        "import sys\n"
        "from qdquant import simulate\n"
        "slide = simulate.simulate_slide(shape=(96, 96), seed=1)\n"
        f"simulate.write_slide(slide, {str(tmp_path)!r}, 'x')\n"
        "simulate.her2_ring_scores(slide.abundance('QD655'), slide.cells)\n"
        "simulate.sample_truth(slide.cells_truth)\n"
        "bad = [m for m in ('qdquant.scoring', 'qdquant.quantification', 'qdquant.segmentation')\n"
        "       if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_contract_defaults_come_from_the_schema():
    d = ref.contract_defaults()
    assert (d["t_faint"], d["t_weak"], d["t_strong"]) == (20.0, 60.0, 150.0)
    assert (d["complete_fraction"], d["sectors"], d["ultralow_min_pct"]) == (0.9, 36, 1.0)
    assert d["membrane_width_px"] == schema()["properties"]["segmentation"]["properties"][
        "membrane_width_px"]["default"]
    from qdquant import simulate

    assert simulate.HER2_DEFAULTS == {k: d[k] for k in simulate.HER2_DEFAULTS}


CELLS = np.array(
    [
        [1, 1, 2, 2, 2],
        [1, 1, 2, 2, 2],
        [1, 1, 0, 2, 2],
        [1, 1, 1, 0, 0],
    ]
)


RING_1 = np.array(  # 4-neighbours only; the image edge is not outside
    [
        [0, 1, 1, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 1, 0, 1, 1],
        [0, 0, 1, 0, 0],
    ],
    dtype=bool,
)
RING_1_5 = RING_1.copy()
RING_1_5[1, 3] = RING_1_5[3, 1] = True  # diagonal neighbour (2, 2) is background


@pytest.mark.parametrize("width, want", [(1, RING_1), (1.5, RING_1_5)])
def test_membrane_ring_on_literal_labels(width, want):
    np.testing.assert_array_equal(ref.membrane_ring(CELLS, width), want)


def test_membrane_ring_is_empty_below_one_pixel_or_with_nothing_outside():
    assert not ref.membrane_ring(CELLS, 0.5).any()
    assert not ref.membrane_ring(np.ones((3, 3), int), 1).any()  # one cell, nothing outside


def test_ring_sectors_and_sums_on_a_square_cell():
    cells = np.zeros((5, 5), int)
    cells[1:4, 1:4] = 1
    geometry = ref.ring_sectors(cells, [1], [[2.0, 2.0]], 1, 4)
    sums, npx = ref.sector_sums(np.arange(25.0).reshape(5, 5), geometry, 4)
    # sector 0: (2,3) (3,3); 1: (3,2) (3,1); 2: (2,1) (1,1); 3: (1,2) (1,3)  [value 5y + x]
    np.testing.assert_array_equal(npx, [[2, 2, 2, 2]])
    np.testing.assert_array_equal(sums, [[31.0, 33.0, 17.0, 15.0]])


@pytest.mark.parametrize(
    "sums, npx, want",
    [
        ([100, 40, 0, 30], [2, 2, 0, 3], (35.0, 0.5, "1+")),  # means 50, 20 (stained), -, 10
        ([5, 5, 5, 5], [1, 1, 1, 1], (0.0, 0.0, "0")),
        ([99, 19.9, 19.9, 19.9], [0, 1, 1, 1], (0.0, 0.0, "0")),  # no pixel: sum ignored
        ([60, 60, 60, 60], [1, 1, 1, 1], (60.0, 1.0, "2+")),  # exactly t_weak
        ([150, 150, 150, 150], [1, 1, 1, 1], (150.0, 1.0, "3+")),  # exactly t_strong, complete
        ([200, 200, 200, 0], [1, 1, 1, 1], (200.0, 0.75, "2+")),  # strong but incomplete
        ([400, 20, 0, 0], [2, 1, 0, 0], (140.0, 0.5, "2+")),  # pixel-weighted: 420 / 3
    ],
)
def test_her2_cell_table(sums, npx, want):
    got = ref.her2_cell(np.array(sums, float), np.array(npx), **RULE)
    assert got[2] == want[2] and got[0] == pytest.approx(want[0]) and got[1] == want[1]


def test_her2_sample_ten_percent_rule_is_strict():
    nine_zero = ["0"] * 9
    assert ref.her2_sample(nine_zero + ["3+"], ultralow_min_pct=1.0)["her2_score"] == "0"  # 10 %: no
    r = ref.her2_sample(["0"] * 8 + ["3+", "3+"], ultralow_min_pct=1.0)
    assert (r["her2_score"], r["her2_category"], r["her2_pct_3plus"]) == ("3+", "HER2-positive", 20.0)
    r = ref.her2_sample(["0"] * 8 + ["2+", "3+"], ultralow_min_pct=1.0)
    assert (r["her2_score"], r["her2_category"]) == ("2+", "HER2-equivocal")
    r = ref.her2_sample(["0"] * 8 + ["1+", "3+"], ultralow_min_pct=1.0)
    assert (r["her2_score"], r["her2_category"]) == ("1+", "HER2-low")
    r = ref.her2_sample(["0"] * 99 + ["1+"], ultralow_min_pct=1.0)  # exactly 1 %
    assert (r["her2_score"], r["her2_category"]) == ("0", "HER2-ultralow")
    r = ref.her2_sample(["0"] * 199 + ["1+"], ultralow_min_pct=1.0)
    assert (r["her2_score"], r["her2_category"]) == ("0", "HER2-null")
    r = ref.her2_sample([], ultralow_min_pct=1.0)
    assert r["her2_score"] is None and r["her2_category"] == "not assessable"
    assert math.isnan(r["her2_pct_0"])


def test_marker_sample_scores():
    bins = [0, 1, 2, 3, 3, -1, float("nan")]  # the last two are not evaluable
    r = ref.marker_sample(bins, score="hscore", marker="ER")
    assert r == {"ER_pct_positive": 80.0, "ER_hscore": 180.0}  # (1 + 2 + 6) / 5 cells * 100
    r = ref.marker_sample(bins, score="allred", marker="PR")
    assert r == {"PR_pct_positive": 80.0, "PR_allred": 5 + 2}  # > 66 %; mean bin 9/4 in (5/3, 7/3]
    r = ref.marker_sample([0] * 95 + [1] * 5, score="allred", marker="PR")
    assert r["PR_allred"] == 2 + 1
    assert ref.marker_sample([0, 0], score="allred", marker="PR")["PR_allred"] == 0
    r = ref.marker_sample([-1], score="percent_positive", marker="Ki67")
    assert list(r) == ["Ki67_pct_positive"] and math.isnan(r["Ki67_pct_positive"])


def test_receptor_status_boundaries():
    assert [ref.receptor_status(p) for p in (0.99, 1.0, 10.0, 10.01)] == [
        "negative", "low_positive", "low_positive", "positive"]
    assert ref.receptor_status(float("nan")) == "not assessable"


@pytest.mark.parametrize(
    "her2, er, pr, ki67, want",
    [
        ("2+", 0, 0, 50, "HER2-equivocal"),
        ("3+", 5, 0, 50, "Luminal B-like (HER2-positive)"),
        ("3+", 0, 0.5, 50, "HER2-positive (non-luminal)"),
        ("1+", 0, 0, 50, "Triple-negative"),
        ("0", 0.5, 50, 5, "Luminal B-like (HER2-negative)"),  # HR+ by PR, ER < 1 %
        ("0", 50, 10, 5, "Luminal B-like (HER2-negative)"),  # PR < 20 %
        ("0", 50, 50, None, "Luminal (HER2-negative)"),
        ("0", 50, 50, 19.9, "Luminal A-like"),
        ("1+", 50, 50, 20, "Luminal B-like (HER2-negative)"),
        (None, 50, 50, 20, "not assessable"),
    ],
)
def test_surrogate_subtype_rows(her2, er, pr, ki67, want):
    assert ref.surrogate_subtype(her2, er, pr, ki67, pr_cutoff_pct=20, ki67_cutoff_pct=20) == want


def test_pipeline_agrees_with_the_reference_on_a_simulated_slide():
    """Two independent implementations of the HER2 rule give the same cells."""
    from qdquant import simulate
    from qdquant.quantification import membrane_sectors
    from qdquant.scoring import her2_cell_scores
    from qdquant.segmentation import membrane_ring

    slide = simulate.simulate_slide(her2_score="2+", shape=(160, 160), seed=3)
    np.testing.assert_array_equal(membrane_ring(slide.cells, 2), ref.membrane_ring(slide.cells, 2))
    truth = simulate.her2_ring_scores(slide.abundance("QD655"), slide.cells)
    ids = truth["CellID"].to_numpy()
    ct = slide.cells_truth.set_index("CellID").loc[ids]
    sums, npx = membrane_sectors(
        slide.cells, slide.abundance("QD655"), ids,
        ct[["Y_centroid", "X_centroid"]].to_numpy(), 2, sectors=36,
    )
    inten, comp, cls = her2_cell_scores(sums, npx, **RULE)
    np.testing.assert_array_equal(cls, truth["her2_class"].to_numpy())
    np.testing.assert_array_equal(comp, truth["her2_completeness"].to_numpy())
    # the pipeline sums in fixed point (each value to 2**-20, quantification.FIXED_POINT): ~1e-11 relative
    np.testing.assert_allclose(inten, truth["her2_membrane_intensity"].to_numpy(), rtol=1e-9)
