"""The dark offset from the slide's darkest region (qdquant.dark_offset)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from qdquant.dark_offset import DarkOffset, estimate_dark_offset, library_explains
from qdquant.errors import InputError
from qdquant.unmixing import unmix

C = 16
WL = np.linspace(450, 750, C)


def _gauss(peak, width):
    return np.exp(-0.5 * ((WL - peak) / width) ** 2)


def _slide(offset, *, glass=True, seed=0, shape=(256, 256), read_noise=4.0):
    """Tissue (two broad emitters with texture) on the left, glass on the right, plus the offset and noise."""
    rng = np.random.default_rng(seed)
    spectra = np.column_stack([_gauss(520, 40), _gauss(655, 12)])
    abundance = np.zeros((2,) + shape)
    tissue = np.ones(shape, bool)
    if glass:
        tissue[:, shape[1] * 3 // 4 :] = False
    abundance[0][tissue] = rng.gamma(4, 10, tissue.sum())
    abundance[1][tissue] = rng.gamma(2, 20, tissue.sum())
    light = np.einsum("ck,kyx->cyx", spectra, abundance)
    counts = rng.poisson(light) + np.asarray(offset, float).reshape(-1, 1, 1) + rng.normal(0, read_noise, (C,) + shape)
    return np.clip(np.round(counts), 0, 65535).astype(np.uint16), spectra, abundance


def test_offset_different_in_each_band_is_found_on_the_glass():
    true = 100 + 12 * np.sin(np.arange(C))  # 88..112 counts, different per band
    cube, _, _ = _slide(true)
    found = estimate_dark_offset(cube)
    assert isinstance(found, DarkOffset)
    assert np.abs(found.counts - true).max() < 1.0  # the median of ~650 glass pixels: ~0.2 count noise
    assert not found.is_flat
    assert np.all(found.spread < 6)  # read noise only: the dark region is glass


def test_the_median_of_a_dark_region_is_not_biased_low_as_a_low_percentile_is():
    cube, _, _ = _slide(np.full(C, 100.0), read_noise=8.0)
    found = estimate_dark_offset(cube).counts
    percentile = np.percentile(cube.reshape(C, -1), 1, axis=1)
    assert np.abs(found - 100).max() < 1.5
    assert (100 - percentile).mean() > 10  # 2.3 sigma low
    assert estimate_dark_offset(cube).is_flat


def test_dask_cube_reads_chunks_and_gives_the_numpy_answer_to_within_noise():
    true = np.linspace(95, 110, C)
    cube, _, _ = _slide(true, shape=(512, 512))
    lazy = da.from_array(cube, chunks=(C, 128, 128))
    got = estimate_dark_offset(lazy, max_blocks=64).counts
    assert np.abs(got - true).max() < 1.0


def test_zero_padding_outside_the_scan_is_not_taken_for_glass():
    true = np.full(C, 100.0)
    cube, _, _ = _slide(true)
    cube[:, :40, :] = 0  # a scanner's padding
    assert np.abs(estimate_dark_offset(cube).counts - 100).max() < 1.0
    assert np.array_equal(estimate_dark_offset(np.zeros((C, 8, 8), np.uint16)).counts, np.zeros(C))


def test_bad_input_is_a_clear_error():
    with pytest.raises(InputError, match=r"\(C, Y, X\)"):
        estimate_dark_offset(np.zeros((8, 8)))
    with pytest.raises(InputError, match="NaN or inf"):
        cube = np.ones((3, 8, 8), np.float32)
        cube[1, 2, 3] = np.nan
        estimate_dark_offset(cube)
    with pytest.raises(InputError, match="dark_fraction"):
        estimate_dark_offset(np.ones((3, 8, 8)), dark_fraction=0)


def test_library_explains_the_glass_only_with_a_flat_column_and_a_constant_offset():
    spectra = np.column_stack([_gauss(520, 40), _gauss(655, 12)])
    flat_lib = np.column_stack([spectra, np.ones(C)])
    constant = DarkOffset(np.full(C, 100.0), 1000, 0.01, np.full(C, 4.0))
    per_band = DarkOffset(100 + 12 * np.sin(np.arange(C)), 1000, 0.01, np.full(C, 4.0))
    assert library_explains(flat_lib, constant)
    assert not library_explains(spectra, constant)
    assert not library_explains(flat_lib, per_band)


@pytest.mark.parametrize("with_flat_column", [False, True])
def test_subtracting_the_estimate_unmixes_glass_to_zero_and_tissue_to_its_truth(with_flat_column):
    """Raw counts with a dark offset, unmixed after the estimate is subtracted.

    Without a flat column (the contract's example library) a constant offset
    is read as dyes; with one, an offset that differs between bands is.
    """
    true = 100 + 15 * _gauss(650, 20) if with_flat_column else np.full(C, 100.0)
    cube, spectra, abundance = _slide(true, read_noise=2.0)
    library = np.column_stack([spectra, np.ones(C)]) if with_flat_column else spectra
    found = estimate_dark_offset(cube)
    fitted, _ = unmix(cube, library, offset=found.counts)
    glass = abundance[0] == 0
    assert np.abs(fitted[1][glass].mean()) < 1.0  # the narrow (HER2-like) emitter reads 0 on glass
    tissue = ~glass
    assert abs(fitted[1][tissue].mean() - abundance[1][tissue].mean()) < 1.0
    naive, _ = unmix(cube, library)
    assert naive[1][glass].mean() > 5  # the failure this guards against
