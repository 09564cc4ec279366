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
