"""Self-checks of the independent slide generator (tests/independent); no qdquant needed."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml

from conftest import SHARED_DATA, need_independent_generator

try:
    need_independent_generator()
except pytest.skip.Exception as skipped:
    pytest.skip(str(skipped), allow_module_level=True)
import slides  # noqa: E402
import spectra as sp  # noqa: E402

SIZE = 320
CONTRACT = SHARED_DATA.parent / "spec" / "contract.md"


@pytest.fixture(scope="module")
def messy_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("ind_messy")
    return slides.make_cohort(out, offset_column=True, messy=True, size=SIZE, seed=3,
                              only=["ind_null_a", "ind_2plus", "ind_3plus"])


@pytest.fixture(scope="module")
def clean_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("ind_clean")
    return slides.make_cohort(out, offset_column=False, messy=False, size=SIZE, seed=3,
                              only=["ind_ultralow", "ind_1plus"])


def test_files_are_written_and_readable(messy_cohort):
    names = pd.read_csv(messy_cohort / "samples.tsv", sep="\t")["sample_id"].tolist()
    assert names == ["ind_null_a", "ind_2plus", "ind_3plus"]
    lib = pd.read_csv(messy_cohort / "spectra.csv")
    assert list(lib.columns) == ["wavelength_nm", "DAPI", "QD525", "QD565", "QD605", "QD655", "QD705", "AF", "Offset"]
    panel = pd.read_csv(messy_cohort / "panel.tsv", sep="\t", keep_default_na=False)
    assert set(panel.endmember) == set(lib.columns[1:])
    assert panel.set_index("marker").loc["HER2", "score"] == "her2"
    for name in names:
        with tifffile.TiffFile(messy_cohort / f"{name}.ome.tif") as tif:
            assert tif.is_ome
            assert tif.series[0].axes == "CYX"
            cube = tif.series[0].asarray()
            ome = tif.ome_metadata
        assert cube.shape == (len(lib), SIZE, SIZE) and cube.dtype == np.uint16
        assert re.search(r'PhysicalSizeX="0.5"', ome) and re.search(r'PhysicalSizeY="0.5"', ome)
        # the dark offset is there: glass / dim bands sit near ~100 counts, not 0
        assert 80 < np.median(cube[0]) < 400


def test_labels_share_ids_and_match_the_cell_table(messy_cohort):
    for name in ["ind_null_a", "ind_2plus"]:
        nuc = tifffile.imread(messy_cohort / f"{name}_truth_nuclei.tif")
        cells = tifffile.imread(messy_cohort / f"{name}_truth_cells.tif")
        assert nuc.dtype == np.int32 and cells.dtype == np.int32
        inside = nuc > 0
        assert np.array_equal(nuc[inside], cells[inside])  # a nucleus lies in its own cell
        table = pd.read_csv(messy_cohort / f"{name}_truth_cells.csv", dtype={"her2_class": str})
        assert set(np.unique(cells)) - {0} == set(table.cell_id)
        assert set(np.unique(nuc)) - {0} <= set(table.cell_id)
        assert (table.loc[~table.is_tumour, "her2_class"] == "0").all()
        assert (table.loc[~table.is_tumour, "her2_level"] == 0).all()


@pytest.mark.parametrize("cohort", ["messy_cohort", "clean_cohort"])
def test_slide_truth_follows_from_the_cells(cohort, request):
    folder = request.getfixturevalue(cohort)
    truth = pd.read_csv(folder / "truth_samples.csv", dtype={"her2_score": str}, keep_default_na=False)
    for row in truth.itertuples():
        table = pd.read_csv(folder / f"{row.sample_id}_truth_cells.csv", dtype={"her2_class": str})
        score, category, pct = slides.slide_score(table.her2_class)
        assert (score, category) == (row.her2_score, row.her2_category)
        assert pct["3+"] == pytest.approx(row.her2_pct_3plus)
        assert row.n_cells == len(table)


def test_slide_rule():
    assert slides.slide_score(["3+"] * 11 + ["0"] * 89)[:2] == ("3+", "HER2-positive")
    assert slides.slide_score(["3+"] * 10 + ["2+"] * 2 + ["0"] * 88)[:2] == ("2+", "HER2-equivocal")
    assert slides.slide_score(["3+"] * 10 + ["0"] * 90)[:2] == ("0", "HER2-ultralow")  # > 10 %, not >=
    assert slides.slide_score(["1+"] * 11 + ["0"] * 89)[:2] == ("1+", "HER2-low")
    assert slides.slide_score(["1+"] * 5 + ["0"] * 95)[:2] == ("0", "HER2-ultralow")
    assert slides.slide_score(["2+"] * 1 + ["0"] * 199)[:2] == ("0", "HER2-null")


def test_case_compositions_are_unambiguous():
    # at cohort size the class fractions keep >= 3 points from the 10 % cut
    for case, comp in slides.CASES.items():
        f3 = comp.get("3+", 0)
        f23 = f3 + comp.get("2+", 0) + comp.get("2+s", 0)
        f123 = f23 + comp.get("1+", 0)
        for f in (f3, f23, f123):
            assert f == 0 or abs(f - 0.10) >= 0.03, case
        if case == "ultralow":
            assert 0.02 <= f123 <= 0.07


def test_noise_free_pixel_is_spectra_times_abundances():
    edges = sp.band_edges()
    lib = sp.library(edges)
    specs = sp.true_spectra(edges, lib, qd_shift_nm={"QD655": 3.0})
    rng = np.random.default_rng(0)
    maps = {k: rng.uniform(0, 200, (6, 5)).astype(np.float32) for k in specs}
    offset = rng.uniform(90, 115, len(edges) - 1)
    cube = slides.render(maps, specs, edges, offset=offset, noise=False)
    y, x = 3, 2
    expect = offset + sum(specs[k] * maps[k][y, x] for k in specs)
    np.testing.assert_allclose(cube[:, y, x], expect, rtol=1e-5)
    # on a clean slide the QD655 spectrum is the library column: 100 units = column * 100
    clean = sp.true_spectra(edges, lib)
    one = {k: np.zeros((1, 1), np.float32) for k in clean}
    one["QD655"][:] = 100
    np.testing.assert_allclose(slides.render(one, clean, edges, noise=False)[:, 0, 0], 100 * lib["QD655"], rtol=1e-6)


def test_library_differs_from_truth_only_on_messy_slides():
    edges = sp.band_edges()
    rng = np.random.default_rng(1)
    for messy in (False, True):
        p = slides.slide_params(rng, 0, messy=messy, size=SIZE)
        lib = sp.library(edges, af=slides.library_af(messy))
        specs = sp.true_spectra(edges, lib, qd_shift_nm=p["qd_shift_nm"], af_stroma=p["af_stroma"],
                                af_epithelium=p["af_epithelium"])
        for name in ["DAPI", *sp.QDOTS]:
            same = np.allclose(specs[name], lib[name])
            assert same == (not messy or name == "DAPI"), (messy, name)
            assert specs[name].sum() == pytest.approx(lib[name].sum())
        for af in ("AF_stroma", "AF_epithelium"):
            assert np.allclose(specs[af], lib["AF"]) == (not messy)
        if messy:
            # the two tissue AFs differ from each other and peak on either side of the library's
            peaks = [sp.band_centres(edges)[np.argmax(specs[k])] for k in ("AF_stroma", "AF_epithelium")]
            assert peaks[0] < peaks[1]


def test_unblurred_oracle_recovers_the_designed_classes():
    edges = sp.band_edges()
    lib = sp.library(edges)
    rng = np.random.default_rng(5)
    p = slides.slide_params(rng, 4, messy=False, size=384)
    p["psf_sigma_px"] = 0.0
    _, _, cells, summary, _, _ = slides.make_slide(rng, "x", "3+", p, 384, lib, edges)
    tum = cells[cells.is_tumour]
    assert (tum.her2_class == tum.her2_class_oracle).mean() > 0.9
    assert summary["her2_score_oracle"] == summary["her2_score"] == "3+"


def test_config_is_the_contracts_example(messy_cohort):
    got = yaml.safe_load((messy_cohort / "config.yaml").read_text())
    for key in ("samples", "spectra", "panel"):
        assert Path(got[key]).exists()
    if CONTRACT.exists():
        block = re.search(r"```yaml\n(samples:.*?)```", CONTRACT.read_text(), re.S).group(1)
        want = yaml.safe_load(block)
        for key in ("samples", "spectra", "panel", "results"):
            want.pop(key), got.pop(key)
        assert got == want


def test_deterministic(tmp_path):
    a = slides.make_cohort(tmp_path / "a", offset_column=False, messy=True, size=256, seed=9, only=["ind_1plus"])
    b = slides.make_cohort(tmp_path / "b", offset_column=False, messy=True, size=256, seed=9, only=["ind_1plus"])
    assert np.array_equal(tifffile.imread(a / "ind_1plus.ome.tif"), tifffile.imread(b / "ind_1plus.ome.tif"))
    assert np.array_equal(tifffile.imread(a / "ind_1plus_truth_cells.tif"),
                          tifffile.imread(b / "ind_1plus_truth_cells.tif"))
