"""Tests of qdquant.simulate: the synthetic QD-stained breast tissue and its truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import SHARED_DATA
from qdquant import simulate as sim  # not `from ... import test_cohort`: pytest would collect it
from qdquant.quantification import measure_cells
from qdquant.scoring import intensity_bins

MIBI_DIR = SHARED_DATA / "ark_mibi_tnbc_fov8"
EXPECTED = {  # sample id -> (her2_score, her2_category)
    "her2_null": ("0", "HER2-null"),
    "her2_ultralow": ("0", "HER2-ultralow"),
    "her2_1plus": ("1+", "HER2-low"),
    "her2_2plus": ("2+", "HER2-equivocal"),
    "her2_3plus": ("3+", "HER2-positive"),
    "her2_2plus_hard": ("2+", "HER2-equivocal"),
}


@pytest.fixture(scope="module")
def small():
    return sim.simulate_slide(her2_score="3+", shape=(200, 232), seed=7)


@pytest.fixture(scope="module")
def cohort():
    return {name: sim.simulate_slide(**kw) for name, kw in sim.test_cohort().items()}


def _nuclear_bins(slide, endmember, thresholds=(30.0, 80.0, 160.0)):
    """The core's compartment means and bins (-1: no pixel in the compartment) on the truth."""
    compartment = "cytoplasm" if endmember == "QD525" else "nucleus"
    table = measure_cells(slide.cells, slide.nuclei, slide.abundance(endmember)[None], [endmember], 2)
    np.testing.assert_array_equal(table["CellID"], slide.cells_truth["CellID"])
    means = table[f"{endmember}_{compartment}_mean"].to_numpy()
    t1, t2, t3 = (*thresholds, None, None)[:3]
    return means, intensity_bins(means, t1=t1, t2=t2, t3=t3)


# ----------------------------------------------------------------------------
# panel, spectra, bundled data


def test_default_panel():
    panel = sim.default_panel()
    assert list(panel.columns) == ["endmember", "marker", "role", "compartment", "score", "t1", "t2", "t3"]
    assert tuple(panel["endmember"]) == sim.ENDMEMBERS
    assert (panel["role"] == "nuclear_stain").sum() == 1
    assert (panel["role"] == "membrane_stain").sum() == 1
    her2 = panel[panel["score"] == "her2"]
    assert list(her2["marker"]) == ["HER2"] and list(her2["endmember"]) == ["QD655"]
    er = panel.set_index("marker").loc["ER"]
    assert (er["score"], er["t1"], er["t2"], er["t3"]) == ("hscore", 30, 80, 160)
    assert panel.set_index("marker").loc["PR", "score"] == "allred"
    assert panel.set_index("endmember").loc["Offset", "role"] == "background"


def test_library_format_and_perturbation():
    lib = sim.band_spectra()
    assert list(lib.columns) == ["wavelength_nm", *sim.ENDMEMBERS]
    np.testing.assert_array_equal(lib["wavelength_nm"], np.arange(420, 721, 10))
    assert (lib["Offset"] == 1).all()
    peaks = lib.drop(columns=["wavelength_nm", "Offset"]).max()
    np.testing.assert_allclose(peaks, 1.0)
    # quantum-dot peaks land in the right bands
    wl = lib.set_index("wavelength_nm")
    for name, peak in (("QD525", 520), ("QD605", 600), ("QD655", 650), ("QD705", 700)):
        assert abs(wl[name].idxmax() - peak) <= 10, name
    shifted = sim.band_spectra({"QD605": 3.0})
    assert shifted.set_index("wavelength_nm")["QD605"].idxmax() >= wl["QD605"].idxmax()
    assert not np.allclose(shifted["QD605"], lib["QD605"])
    np.testing.assert_allclose(shifted["QD655"], lib["QD655"])


def test_bundled_spectra_and_source():
    data = Path(sim.__file__).parent.parent / "data"
    table = pd.read_csv(data / "reference_emission_spectra.csv")
    assert table.columns[0] == "wavelength_nm"
    assert np.all(np.diff(table["wavelength_nm"]) == 1)
    assert {"Qdot 655", "DAPI", "NADH", "Riboflavin"} <= set(table.columns)
    source = (data / "SOURCE.md").read_text()
    assert "FPbase" in source and "2d223b53e1a8f89c92d3aa96d1f849f244c6218a" in source


# ----------------------------------------------------------------------------
# one small slide


def test_shapes_and_dtypes(small):
    y, x = 200, 232
    assert small.cube.shape == (31, y, x) and small.cube.dtype == np.uint16
    assert small.wavelengths_nm.shape == (31,)
    assert small.abundances.shape == (9, y, x) and small.abundances.dtype == np.float32
    assert small.nuclei.dtype == np.int32 and small.cells.dtype == np.int32
    assert small.pixel_size_um == 0.5
    assert list(small.library.columns) == ["wavelength_nm", *sim.ENDMEMBERS]
    assert list(small.true_spectra.columns) == list(small.library.columns)
    lib = small.library[list(sim.ENDMEMBERS)].to_numpy()
    gen = small.true_spectra[list(sim.ENDMEMBERS)].to_numpy()
    assert 0 < np.abs(lib - gen).max() < 0.2  # close, but not the same
    np.testing.assert_allclose(small.abundance("Offset"), 100.0)


def test_labels_and_cell_table(small):
    ct = small.cells_truth
    ids = np.unique(small.cells[small.cells > 0])
    np.testing.assert_array_equal(ct["CellID"], ids)
    np.testing.assert_array_equal(np.unique(small.nuclei[small.nuclei > 0]), ids)
    inside = small.nuclei > 0
    assert np.all(small.cells[inside] == small.nuclei[inside])  # a cell holds its own nucleus
    assert not np.any(small.cells[[0, -1], :]) and not np.any(small.cells[:, [0, -1]])
    for col in ("X_centroid", "Y_centroid", "cell_type", "her2_class", "her2_intensity",
                "her2_completeness", "er_bin", "pr_bin", "ki67_positive", "mtor_positive", "ecad"):
        assert col in ct, col
    assert set(ct["cell_type"]) <= {"tumour", "stroma", "immune"}
    assert set(ct["her2_class"]) <= {"0", "1+", "2+", "3+"}
    non_tumour = ct[ct["cell_type"] != "tumour"]
    assert (non_tumour["her2_class"] == "0").all() and (non_tumour["er_bin"] == 0).all()
    frac = len(non_tumour) / len(ct)
    assert 0.07 < frac < 0.2
    assert ct.loc[ct["cell_type"] == "tumour", "ecad"].min() >= 60


def test_determinism():
    a = sim.simulate_slide(shape=(96, 128), seed=3)
    b = sim.simulate_slide(shape=(96, 128), seed=3)
    c = sim.simulate_slide(shape=(96, 128), seed=4)
    np.testing.assert_array_equal(a.cube, b.cube)
    np.testing.assert_array_equal(a.cells, b.cells)
    pd.testing.assert_frame_equal(a.cells_truth, b.cells_truth)
    assert a.truth == b.truth
    assert not np.array_equal(a.cube, c.cube)


def test_counts_follow_the_model(small):
    """Mean counts = offset + generating spectra x abundances (abundance units = counts at peak)."""
    k = [i for i, e in enumerate(sim.ENDMEMBERS) if e != "Offset"]
    spectra = small.true_spectra[[sim.ENDMEMBERS[i] for i in k]].to_numpy()
    expected = 100.0 + np.einsum("ck,kyx->cyx", spectra, small.abundances[k])
    diff = small.cube.astype(float) - expected
    assert np.abs(diff.mean(axis=(1, 2))).max() < 0.3
    # shot + read noise: variance ~ signal / photons_per_count + read_noise^2
    var_expected = (expected - 100.0) / 4.0 + 2.5**2 + 1 / 12
    ratio = diff.var(axis=(1, 2)) / var_expected.mean(axis=(1, 2))
    assert np.all((ratio > 0.85) & (ratio < 1.15))


def test_switches_change_the_cube():
    base = sim.simulate_slide(shape=(256, 256), seed=5)
    shaded = sim.simulate_slide(shape=(256, 256), seed=5, shading=0.25)
    np.testing.assert_array_equal(shaded.abundances, base.abundances)
    assert shaded.shading.min() == pytest.approx(0.75, abs=0.01) and shaded.shading.max() <= 1
    corner = shaded.shading < 0.85
    sig_base = base.cube[:, corner].astype(float).mean() - 100
    sig_shaded = shaded.cube[:, corner].astype(float).mean() - 100
    assert sig_shaded < 0.9 * sig_base
    assert shaded.truth["shading"] == 0.25

    drift = sim.simulate_slide(shape=(256, 256), seed=5, drift_nm=4.0)
    assert not np.array_equal(drift.cube, base.cube)
    shifts = np.abs(list(drift.truth["spectral_shift_nm"].values()))
    assert np.all((shifts >= 2.0) & (shifts <= 4.0))
    base_shifts = np.abs(list(base.truth["spectral_shift_nm"].values()))
    assert np.all((base_shifts >= 0.5) & (base_shifts <= 1.0))
    pd.testing.assert_frame_equal(drift.library, base.library)

    off = sim.simulate_slide(shape=(256, 256), seed=5, off_library_af=True)
    assert off.off_library.max() > 100 and not np.any(base.off_library)
    discs = off.off_library.sum(axis=0) > 50
    assert discs.any() and not np.any(off.cells[discs])  # in stroma, outside cells
    assert (off.cube[:, discs].astype(float).mean() - 100) > 50
    assert off.truth["n_rbc"] + off.truth["n_lipofuscin"] > 0

    inside = sim.simulate_slide(shape=(256, 256), seed=5, off_library_af=True, lipofuscin_in_cells=True)
    lipofuscin = inside.off_library[1] > 50
    tumour_ids = inside.cells_truth.loc[inside.cells_truth.is_tumour, "CellID"].to_numpy()
    assert inside.truth["n_lipofuscin"] > 0 and lipofuscin.any()
    # granules in tumour cells' cytoplasm; red blood cells still in stroma
    assert np.isin(inside.cells[lipofuscin], tumour_ids).mean() > 0.9
    assert not np.any(inside.cells[inside.off_library[0] > 50])


def test_low_photon_counts_and_crowding():
    noisy = sim.simulate_slide(shape=(160, 160), seed=2, photons_per_count=1.5, crowded=True)
    assert noisy.cube.dtype == np.uint16 and noisy.truth["params"]["photons_per_count"] == 1.5
    loose = sim.simulate_slide(shape=(160, 160), seed=2)
    tum = lambda s: s.cells_truth[s.cells_truth["cell_type"] == "tumour"]  # noqa: E731
    assert len(tum(noisy)) > 1.3 * len(tum(loose))  # packed nests
    assert tum(noisy)["Area"].median() < tum(loose)["Area"].median()


def test_bad_arguments():
    with pytest.raises(ValueError, match="her2_score"):
        sim.simulate_slide(her2_score="4+")
    with pytest.raises(ValueError, match="shading"):
        sim.simulate_slide(shading=1.5)
    with pytest.raises(ValueError, match="her2_levels"):
        sim.simulate_slide(her2_levels="flat")


def test_continuous_her2_levels_fill_each_bin_and_read_back():
    """her2_levels="continuous" spreads each class across its bin, near the thresholds too."""
    slide = sim.simulate_slide(her2_mix=(0.1, 0.3, 0.3, 0.3), her2_levels="continuous", seed=7,
                               her2_incomplete_fraction=0.0)
    ct = slide.cells_truth
    measured = sim.her2_ring_scores(slide.abundance("QD655"), slide.cells)
    assert np.mean(measured["her2_class"].to_numpy() == ct["her2_class"].to_numpy()) >= 0.98
    for cls, (low, high), (t_low, t_high) in (("1+", (23, 55), (20, 60)), ("2+", (66, 140), (60, 150)),
                                              ("3+", (165, 300), (150, np.inf))):
        got = ct.loc[ct.her2_class == cls, "her2_intensity"]
        assert len(got) > 20 and low <= got.min() and got.max() <= high
        # within 25 % of the bin's lower threshold: a quarter of the light lost moves it down
        assert (got < t_low / 0.75).mean() > 0.1, cls


# ----------------------------------------------------------------------------
# the contract's rules


def test_her2_ring_scores_rule():
    yy, xx = np.indices((60, 60))
    cells = np.where((yy - 30) ** 2 + (xx - 30) ** 2 <= 15**2, 1, 0).astype(np.int32)
    ring = sim.membrane_ring(cells, 2)
    half = xx >= 30
    for value, where, want, completeness in (
        (10.0, ring, "0", 0.0),
        (40.0, ring, "1+", 1.0),
        (100.0, ring, "2+", 1.0),
        (250.0, ring, "3+", 1.0),
        (250.0, ring & half, "2+", 0.5),
    ):
        her2 = np.where(where, value, 0.0)
        row = sim.her2_ring_scores(her2, cells).iloc[0]
        assert row["her2_class"] == want, (value, want)
        assert row["her2_completeness"] == pytest.approx(completeness, abs=0.03)
        if want != "0":  # boundary sectors of the half ring are partly empty
            assert 0.9 * value <= row["her2_membrane_intensity"] <= value


def test_sample_truth_rules():
    def table(her2, er, pr, ki67, types=None):
        n = len(her2)
        return pd.DataFrame({
            "cell_type": types or ["tumour"] * n, "her2_class": her2, "er_bin": er,
            "pr_bin": pr, "ki67_bin": ki67, "mtor_bin": [0] * n,
        })

    n = 100
    t = sim.sample_truth(table(["3+"] * 11 + ["0"] * 89, [3] * 50 + [0] * 50, [0] * n, [0] * n))
    assert t["her2_score_all"] == "3+" and t["surrogate_subtype_all"] == "Luminal B-like (HER2-positive)"
    assert t["ER_hscore_all"] == pytest.approx(150) and t["ER_status_all"] == "positive"
    t = sim.sample_truth(table(["1+"] * 5 + ["0"] * 95, [0] * n, [0] * n, [0] * n))
    assert (t["her2_score_all"], t["her2_category_all"]) == ("0", "HER2-ultralow")
    assert t["surrogate_subtype_all"] == "Triple-negative"
    t = sim.sample_truth(table(["0"] * n, [1] * 80 + [0] * 20, [2] * 30 + [3] * 10 + [0] * 60,
                               [1] * 10 + [0] * 90))
    assert t["her2_category_all"] == "HER2-null"
    # PR 40 % positive: proportion 4; mean bin 2.25 (> 5/3): intensity 2
    assert t["PR_allred_all"] == 6
    assert t["surrogate_subtype_all"] == "Luminal A-like"
    t = sim.sample_truth(table(["2+"] * 20 + ["0"] * 80, [0] * n, [0] * n, [0] * n,
                               types=["tumour"] * 50 + ["stroma"] * 50))
    assert t["her2_pct_2plus_all"] == 20 and t["her2_pct_2plus_tumour"] == 40
    assert t["n_tumour_cells"] == 50
    # a negative designed bin is not evaluable (out of the denominator), as a NaN mean in the core
    t = sim.sample_truth(table(["0"] * 4, [-1, 1, 0, 0], [0] * 4, [0] * 4))
    assert t["ER_pct_positive_all"] == pytest.approx(100 / 3)
    # no tumour cell: the tumour scope is not assessable
    t = sim.sample_truth(table(["0"] * 4, [1] * 4, [0] * 4, [0] * 4, types=["stroma"] * 4))
    assert t["n_cells_tumour"] == 0 and t["her2_score_tumour"] is None
    assert t["her2_category_tumour"] == t["surrogate_subtype_tumour"] == "not assessable"
    assert np.isnan(t["ER_pct_positive_tumour"]) and t["ER_status_tumour"] == "not assessable"


def test_truth_rules_are_the_core_ones(small):
    """The simulator scores with qdquant.scoring, not a copy of its rules."""
    from qdquant.scoring import her2_sample_score, marker_sample_scores, surrogate_subtype

    ct = small.cells_truth
    t = small.truth
    her2 = her2_sample_score(ct["her2_class"].to_numpy(object))
    for k, v in her2.items():
        assert t[f"{k}_all"] == v, k
    er = marker_sample_scores(ct["er_intensity"], score="hscore", t1=30, t2=80, t3=160, marker="ER")
    pr = marker_sample_scores(ct["pr_intensity"], score="allred", t1=30, t2=80, t3=160, marker="PR")
    ki = marker_sample_scores(ct["ki67_intensity"], score="percent_positive", t1=30, marker="Ki67")
    assert t["ER_hscore_all"] == er["ER_hscore"] and t["PR_allred_all"] == pr["PR_allred"]
    assert t["Ki67_pct_positive_all"] == ki["Ki67_pct_positive"]
    assert t["surrogate_subtype_all"] == surrogate_subtype(
        t["her2_score_all"], er["ER_pct_positive"], pr["PR_pct_positive"], ki["Ki67_pct_positive"]
    )


# ----------------------------------------------------------------------------
# the bundled test cohort


def test_cohort_definition():
    cohort = sim.test_cohort()
    assert set(EXPECTED) <= set(cohort)
    for kw in cohort.values():
        assert "seed" in kw and kw.get("shape", (512, 512)) == (512, 512)


def test_cohort_truths(cohort):
    for name, slide in cohort.items():
        truth = slide.truth
        score, category = EXPECTED[name]
        for scope in ("all", "tumour"):
            assert truth[f"her2_score_{scope}"] == score, (name, scope)
            assert truth[f"her2_category_{scope}"] == category, (name, scope)
            p0, p1, p2, p3 = (truth[f"her2_pct_{c}_{scope}"] for c in ("0", "1plus", "2plus", "3plus"))
            assert p0 + p1 + p2 + p3 == pytest.approx(100)
            for pct in (p3, p2 + p3, p1 + p2 + p3):
                assert abs(pct - 10) > 2, (name, scope, pct)
            if category == "HER2-ultralow":
                assert p1 + p2 + p3 > 3
            assert truth[f"n_cells_{scope}"] > 150
        assert json.dumps(truth)  # JSON-ready


def test_cohort_designed_classes_read_back_on_true_masks(cohort):
    """Each cell's designed HER2 class is what the contract's rule measures on the truth."""
    for name, slide in cohort.items():
        measured = sim.her2_ring_scores(slide.abundance("QD655"), slide.cells)
        ct = slide.cells_truth
        np.testing.assert_array_equal(measured["CellID"], ct["CellID"])
        agree = np.mean(measured["her2_class"].to_numpy() == ct["her2_class"].to_numpy())
        assert agree >= 0.98, (name, agree)
        designed = ct["her2_intensity"] > 0
        if designed.any():
            got = measured["her2_membrane_intensity"][designed]
            rel = np.abs(got - ct["her2_intensity"][designed]) / ct["her2_intensity"][designed]
            assert np.median(rel) < 0.1, name
        strong_incomplete = (ct["her2_class"] == "2+") & (ct["her2_pattern"] == "incomplete")
        if strong_incomplete.any():
            assert measured["her2_membrane_intensity"][strong_incomplete].min() >= 150


def test_cohort_nuclear_and_cytoplasmic_bins(cohort):
    for name, slide in cohort.items():
        ct = slide.cells_truth
        for em, col in (("QD565", "er_bin"), ("QD605", "pr_bin")):
            _, bins = _nuclear_bins(slide, em)
            assert np.mean(bins == ct[col]) >= 0.98, (name, col)
        _, ki = _nuclear_bins(slide, "QD585", (30.0,))
        assert np.mean(ki == ct["ki67_bin"]) >= 0.98, name
        means, mt = _nuclear_bins(slide, "QD525", (30.0,))
        has_cyto = np.isfinite(means)
        assert has_cyto.mean() > 0.8
        assert np.mean(mt[has_cyto] == ct["mtor_bin"][has_cyto]) >= 0.98, name
        assert (ct["mtor_bin"][~has_cyto] == 0).all()  # no cytoplasm: cannot read positive


# ----------------------------------------------------------------------------
# writing


def test_write_slide_round_trip(small, tmp_path):
    from qdquant.io import open_cube

    paths = sim.write_slide(small, tmp_path / "out", "s1")
    assert paths["image"].name == "s1.ome.tif"
    cube = open_cube(paths["image"])
    assert cube.pixel_size_um == pytest.approx(0.5)
    assert cube.data.shape == small.cube.shape
    np.testing.assert_array_equal(np.asarray(cube.data), small.cube)
    with tifffile.TiffFile(paths["image"]) as tif:
        assert "420nm" in tif.ome_metadata and "720nm" in tif.ome_metadata
    labels = tifffile.imread(paths["labels"])
    assert labels.shape == (2,) + small.cells.shape and labels.dtype == np.int32
    np.testing.assert_array_equal(labels[0], small.nuclei)
    np.testing.assert_array_equal(labels[1], small.cells)
    cells = pd.read_csv(paths["cells"])
    assert len(cells) == len(small.cells_truth)
    assert list(cells["her2_class"].astype(str)) == list(small.cells_truth["her2_class"])
    assert json.loads(paths["truth"].read_text()) == small.truth
    lib = pd.read_csv(paths["library"])
    assert list(lib.columns) == ["wavelength_nm", *sim.ENDMEMBERS]
    np.testing.assert_allclose(lib.to_numpy(), small.library.to_numpy())


# ----------------------------------------------------------------------------
# semi-synthetic MIBI slide


def test_mibi_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        sim.simulate_mibi(tmp_path / "nope")


@pytest.mark.skipif(not MIBI_DIR.is_dir(), reason="shared MIBI data not available")
def test_mibi_semisynthetic():
    slide = sim.simulate_mibi(MIBI_DIR, crop=(0, 512, 0, 512), seed=1)
    y, x = slide.cells.shape
    assert slide.cube.shape == (31, y, x) and slide.cube.dtype == np.uint16
    assert abs(y - 400) <= 1 and abs(x - 400) <= 1  # 0.39 µm MIBI pixels resampled to 0.5 µm
    ct = slide.cells_truth
    assert len(ct) > 50 and (ct["cell_type"] == "tumour").sum() > 30
    measured = sim.her2_ring_scores(slide.abundance("QD655"), slide.cells)
    np.testing.assert_array_equal(measured["her2_class"], ct["her2_class"])
    assert ct["her2_class"].nunique() >= 3  # the classes span the thresholds
    inside = slide.nuclei > 0
    assert np.all(slide.cells[inside] == slide.nuclei[inside])
    assert slide.truth["her2_score_all"] in {"0", "1+", "2+", "3+"}


def test_write_cohort(tmp_path):
    out = sim.write_cohort(tmp_path, {"tiny": dict(shape=(96, 112), seed=1, her2_score="1+")})
    assert out["tiny"]["image"].is_file() and out["tiny"]["labels"].is_file()
    table = pd.read_csv(out["_cohort"]["truth"])
    assert list(table["sample_id"]) == ["tiny"]
    assert "her2_score_all" in table and "her2_score_tumour" in table


def test_messy_cohort_has_every_phenomenon_on_every_reading():
    cohort = sim.messy_cohort()
    assert [kw["her2_score"] for kw in cohort.values()] == ["null", "ultralow", "1+", "2+", "3+"]
    for kwargs in cohort.values():
        assert kwargs["crowded"] and kwargs["off_library_af"]
        assert kwargs["drift_nm"] >= 4 and kwargs["shading"] >= 0.25 and kwargs["photons_per_count"] <= 1.5
        assert kwargs["lipofuscin_in_cells"] and kwargs["her2_levels"] == "continuous"
    assert len({kw["seed"] for kw in cohort.values()} | {kw["seed"] for kw in sim.test_cohort().values()}) == 11
