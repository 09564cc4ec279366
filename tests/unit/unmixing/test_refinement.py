"""Library refinement on a simulated slide whose spectra drifted from the library."""

import numpy as np
import pytest

from qdquant import simulate
from qdquant.unmixing import refine_library


@pytest.mark.parametrize("drift_nm, seed", [(4.0, 21), (0.0, 22)])
def test_refinement_recovers_the_generating_peaks(drift_nm, seed):
    slide = simulate.simulate_slide(her2_score="3+", shape=(384, 384), seed=seed, drift_nm=drift_nm)
    true_shift = slide.truth["spectral_shift_nm"]  # generating spectrum vs library, per endmember
    refined, report = refine_library(
        slide.cube, slide.library, slide.wavelengths_nm, max_shift_nm=6, n_pixels=100_000, min_share=0.25
    )
    report = report.set_index("endmember")
    # endmembers that dominate enough pixels to be fitted (the broad AF is poorly determined)
    fitted = [k for k in true_shift if k != "AF" and report.loc[k, "n_pixels"] >= 300]
    assert {"DAPI", "QD655", "QD705"} <= set(fitted)
    errors = {k: abs(report.loc[k, "shift_nm"] - true_shift[k]) for k in fitted}
    # the narrow QD peaks (what leaks between markers) within 0.5 nm; the broad DAPI,
    # whose width also changed, within 1 nm (a width change looks partly like a shift)
    assert max(v for k, v in errors.items() if k.startswith("QD")) <= 0.5, errors
    assert errors["DAPI"] <= 1.0, errors
    assert report.attrs["residual_after"] < report.attrs["residual_before"]
    assert list(refined.columns) == list(slide.library.columns)


def test_refinement_leaves_an_undrifted_library_unchanged():
    """A cube made with exactly the library's spectra: refinement finds nothing to move."""
    slide = simulate.simulate_slide(her2_score="3+", shape=(384, 384), seed=23, exact_library=True)
    assert np.allclose(slide.true_spectra.to_numpy(), slide.library.to_numpy())
    refined, report = refine_library(
        slide.cube, slide.library, slide.wavelengths_nm, max_shift_nm=6, n_pixels=100_000, min_share=0.25
    )
    report = report.set_index("endmember")
    stains = [k for k in report.index if k not in ("AF", "Offset") and report.loc[k, "n_pixels"] >= 300]
    assert {"DAPI", "QD655", "QD705"} <= set(stains)
    assert report.loc[stains, "shift_nm"].abs().max() <= 0.25, report["shift_nm"]
    change = (refined.drop(columns="wavelength_nm") - slide.library.drop(columns="wavelength_nm")).abs().max()
    assert change[stains].max() <= 0.015, change
    # the broad AF trades a little with the stains; its spectrum barely moves
    assert change["AF"] <= 0.05, change
    # the fit gains nothing beyond noise
    assert report.attrs["residual_after"] >= 0.99 * report.attrs["residual_before"]


def test_an_endmember_with_too_few_pixels_keeps_its_library_spectrum():
    """On a HER2-null slide the few HER2-dominated pixels are noise: QD655 is not moved."""
    slide = simulate.simulate_slide(her2_score="null", shape=(384, 384), seed=24, drift_nm=4.0,
                                    off_library_af=True, photons_per_count=1.5)
    refined, report = refine_library(
        slide.cube, slide.library, slide.wavelengths_nm, max_shift_nm=6, n_pixels=100_000, min_share=0.25
    )
    report = report.set_index("endmember")
    assert report.loc["QD655", "n_pixels"] < 200
    assert report.loc["QD655", "shift_nm"] == 0.0
    np.testing.assert_array_equal(refined["QD655"], slide.library["QD655"])
    assert report.loc["DAPI", "n_pixels"] >= 200 and report.loc["DAPI", "shift_nm"] != 0.0


@pytest.mark.parametrize("endmember", ["DAPI", "QD705", "AF"])
@pytest.mark.parametrize("shift", [-4.0, 4.0])
def test_shift_model_reproduces_band_integrated_drift_at_the_grid_edges(endmember, shift):
    """A shift brings light in from beyond the first or last band: the moved
    band spectrum must match the band integral of the moved emission
    spectrum there too (holding the edge value made DAPI's 420-nm band 5 %
    too bright at +4 nm, QD705's 720-nm band at -4 nm)."""
    from qdquant import simulate
    from qdquant.unmixing.refine import _shifted

    library = simulate.band_spectra()
    wl = library["wavelength_nm"].to_numpy(float)
    truth = simulate.band_spectra({endmember: shift}, {endmember: 1.02})[endmember].to_numpy(float)
    model = _shifted(library[endmember].to_numpy(float), wl, shift, 1.02)
    edges = np.r_[0:2, -2:0]
    assert np.abs(model - truth)[edges].max() < 0.01
    assert np.abs(model - truth).max() < 0.02


def test_a_shift_pressed_against_the_bound_keeps_the_library_spectrum():
    """QDs drifted by more than the bound allows: their best shift lies on the
    bound, which is not a drift within it, so they keep the library's
    spectrum (and say so) while those drifted less are refined."""
    slide = simulate.simulate_slide(her2_score="3+", shape=(256, 256), seed=21, drift_nm=4.0)
    bound = 3.0
    refined, report = refine_library(
        slide.cube, slide.library, slide.wavelengths_nm, max_shift_nm=bound, n_pixels=50_000, min_share=0.25
    )
    report = report.set_index("endmember")
    true = {k: abs(v) for k, v in slide.truth["spectral_shift_nm"].items()
            if k.startswith("QD") and report.loc[k, "n_pixels"] >= 250}
    beyond = [k for k, v in true.items() if v > bound + 0.3]
    within = [k for k, v in true.items() if v < bound - 0.5]
    assert beyond and within
    # (a later round, the others refined, may find a drifted QD a shift inside the bound)
    assert report.loc[beyond, "at_bound"].sum() >= 2
    pressed = report.index[report["at_bound"]]
    assert (report.loc[pressed, "shift_nm"] == 0).all()
    for k in pressed:
        np.testing.assert_array_equal(refined[k], slide.library[k])
    assert not report.loc[within, "at_bound"].any() and (report.loc[within, "shift_nm"] != 0).all()


def test_one_column_residual_is_the_least_squares_residual_on_each_pixels_passive_set():
    """The trial residual from scatter matrices equals, up to one constant, the sum of
    per-pixel least squares on each pixel's passive set with the trial column."""
    from qdquant.unmixing import unmix
    from qdquant.unmixing.refine import _OneColumnResidual, _shifted_many

    slide = simulate.simulate_slide(her2_score="3+", shape=(96, 96), seed=31, drift_nm=3.0)
    wl = slide.wavelengths_nm
    a = slide.library.drop(columns="wavelength_nm").to_numpy()
    b = slide.cube.reshape(a.shape[0], -1).astype(np.float64)[:, ::3]
    x = unmix(b[:, None, :], a)[0][:, 0, :].astype(np.float64)
    j = list(slide.library.columns[1:]).index("QD655")
    keep = x[j] > 0
    b, x = b[:, keep], x[:, keep]
    trials = _shifted_many(a[:, j], wl, np.array([-2.0, 0.0, 1.5, 3.0]))
    fast = _OneColumnResidual(b.T, x, a, j)(trials)

    def brute(column):
        trial = a.copy()
        trial[:, j] = column
        total = 0.0
        for i in range(b.shape[1]):
            p = x[:, i] > 0
            coef, *_ = np.linalg.lstsq(trial[:, p], b[:, i], rcond=None)
            total += float(((b[:, i] - trial[:, p] @ coef) ** 2).sum())
        return total

    slow = np.array([brute(t) for t in trials])
    np.testing.assert_allclose(fast - fast[1], slow - slow[1], rtol=1e-6, atol=1e-6 * slow[1])
    assert np.argmin(slow) != 1  # the drifted QD655 is better fitted moved
