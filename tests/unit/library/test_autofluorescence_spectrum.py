"""The autofluorescence spectrum of an unstained control slide (qdquant.library.autofluorescence_spectrum)."""

import numpy as np
import pytest

from qdquant import simulate
from qdquant.errors import InputError
from qdquant.library import autofluorescence_spectrum

#: a tissue whose autofluorescence is mostly flavin, where the library's AF is mostly NADH
FLAVIN_RICH = {"NADH": 0.15, "Riboflavin": 0.85}


def test_spectrum_of_an_unstained_slide_with_red_cells_and_few_photons():
    slide = simulate.simulate_slide(her2_score="null", shape=(512, 512), seed=7, af_mix=FLAVIN_RICH,
                                    unstained=True, off_library_af=True, photons_per_count=2.0)
    assert slide.abundance("QD655").max() == 0 and slide.abundance("DAPI").max() == 0
    true = slide.true_spectra["AF"].to_numpy()
    assert np.abs(slide.library["AF"].to_numpy() - true).max() > 0.4  # the library is far off
    estimate = autofluorescence_spectrum(slide.cube)
    assert estimate.max() == 1.0
    assert np.abs(estimate - true).max() < 0.03


def test_spectrum_errors():
    with pytest.raises(InputError, match="3-D"):
        autofluorescence_spectrum(np.zeros((8, 8)))
    with pytest.raises(InputError, match="NaN"):
        autofluorescence_spectrum(np.full((4, 16, 16), np.nan))
    with pytest.raises(InputError, match="unsaturated"):
        autofluorescence_spectrum(np.full((4, 16, 16), 65535, np.uint16))
    with pytest.raises(InputError, match="no signal"):
        autofluorescence_spectrum(np.full((4, 16, 16), 100, np.uint16))
