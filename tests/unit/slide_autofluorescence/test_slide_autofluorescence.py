"""Autofluorescence spectra from the slide's stain-free pixels (qdquant.slide_autofluorescence)."""

from __future__ import annotations

import numpy as np
import pytest

from qdquant.errors import InputError
from qdquant.slide_autofluorescence import autofluorescence_from_slide
from qdquant.unmixing import unmix

WL = np.arange(440, 741, 12.0)


def _gauss(peak, width):
    return np.exp(-0.5 * ((WL - peak) / width) ** 2)


def _lognormal_af(peak, width, shoulder_nm, shoulder):
    v = np.exp(-0.5 * (np.log(WL / peak) / width) ** 2) + shoulder * _gauss(shoulder_nm, 25)
    return v / v.max()


STROMA = _lognormal_af(512, 0.13, 590, 0.25)
EPITHELIUM = _lognormal_af(552, 0.10, 610, 0.45)
LIBRARY_AF = _lognormal_af(547, 0.095, 605, 0.3)  # between the two and narrower: a little off
DAPI, QD605, QD655, QD705 = _gauss(460, 20), _gauss(605, 9), _gauss(655, 9), _gauss(705, 10)


def _pixels(n=20_000, seed=0):
    """Stroma (AF only), epithelium (AF + membrane stain on a third), nuclei (DAPI + AF); no HER2 anywhere."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, n, p=[0.4, 0.4, 0.2])
    af_level = rng.gamma(8, 8, n)
    light = np.where(kind == 0, STROMA[:, None], EPITHELIUM[:, None]) * af_level
    membrane = (kind == 1) & (rng.random(n) < 0.3)
    light += QD705[:, None] * np.where(membrane, rng.uniform(100, 200, n), 0)
    light += DAPI[:, None] * np.where(kind == 2, rng.uniform(200, 400, n), 0)
    light += QD605[:, None] * np.where(kind == 2, rng.uniform(0, 80, n), 0)
    return rng.poisson(light).astype(np.float64) + rng.normal(0, 2, light.shape), kind


def _library(af):
    return np.column_stack([DAPI, QD605, QD655, QD705, af])


def _cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_the_two_tissue_autofluorescences_are_found_from_a_library_that_is_a_little_off():
    pixels, _ = _pixels()
    afs, n = autofluorescence_from_slide(pixels, _library(LIBRARY_AF), autofluorescence=4, stains=[0, 3], n_types=2)
    assert afs.shape == (len(WL), 2) and n > 3000
    assert np.allclose(afs.max(axis=0), 1)
    found = {max(("stroma", "epithelium"), key=lambda t: _cosine(afs[:, j], STROMA if t == "stroma" else EPITHELIUM))
             for j in range(2)}
    assert found == {"stroma", "epithelium"}
    for j in range(2):
        assert max(_cosine(afs[:, j], STROMA), _cosine(afs[:, j], EPITHELIUM)) > 0.995
    assert _cosine(LIBRARY_AF, EPITHELIUM) < 0.995 and _cosine(LIBRARY_AF, STROMA) < 0.95  # the library is off


def test_her2_read_on_a_her2_free_tissue_drops_with_the_slides_autofluorescence():
    pixels, kind = _pixels(seed=1)
    library = _library(LIBRARY_AF)
    afs, _ = autofluorescence_from_slide(pixels, library, autofluorescence=4, stains=[0, 3], n_types=2)
    slide = np.column_stack([library[:, :4], afs])
    cube = pixels[:, None, :]
    her2_library = unmix(cube, library)[0][2].mean()
    her2_slide = unmix(cube, slide)[0][2].mean()
    assert her2_library > 2.0  # the bias this corrects (true HER2 is 0 everywhere)
    assert her2_slide < 0.4 * her2_library


def test_too_few_stain_free_pixels_returns_no_spectrum_and_bad_shapes_are_errors():
    pixels, _ = _pixels(n=300)
    afs, n = autofluorescence_from_slide(pixels, _library(LIBRARY_AF), autofluorescence=4, stains=[0, 3], min_pixels=500)
    assert afs.shape == (len(WL), 0) and n < 500
    with pytest.raises(InputError, match="share C"):
        autofluorescence_from_slide(pixels[:-1], _library(LIBRARY_AF), autofluorescence=4, stains=[0, 3])


def test_a_right_library_is_kept_and_an_off_library_emitter_is_not_taken_for_autofluorescence():
    rng = np.random.default_rng(3)
    n = 20_000
    af_level = rng.gamma(8, 8, n)
    light = EPITHELIUM[:, None] * af_level
    lipofuscin = rng.random(n) < 0.25  # broad and red (porphyrin-like): not tissue autofluorescence
    light[:, lipofuscin] = _gauss(640, 40)[:, None] * af_level[lipofuscin] * 1.2
    pixels = rng.poisson(light).astype(np.float64)
    afs, _ = autofluorescence_from_slide(pixels, _library(EPITHELIUM), autofluorescence=4, stains=[0, 3], n_types=2)
    assert afs.shape[1] == 0  # the library's autofluorescence is the slide's: nothing to replace
    afs, _ = autofluorescence_from_slide(pixels, _library(LIBRARY_AF), autofluorescence=4, stains=[0, 3], n_types=2)
    assert afs.shape[1] == 1 and _cosine(afs[:, 0], EPITHELIUM) > 0.995
