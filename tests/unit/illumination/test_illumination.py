"""Field-of-view shading: the estimator, the correction and the gain on small arrays and slides
(a whole messy slide, and the unmix step applying it: tests/integration/test_illumination.py)."""

import dask.array as da
import numpy as np
import pytest

from qdquant import illumination, simulate, unmixing
from qdquant.errors import InputError


def _vignetting(shape, fov, amount):
    """1 at each FOV centre, 1 - amount at its corners (FOVs of fov = (height, width) pixels)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = (fov[0] - 1) / 2, (fov[1] - 1) / 2
    r2 = ((yy % fov[0] - cy) / cy) ** 2 / 2 + ((xx % fov[1] - cx) / cx) ** 2 / 2
    return 1.0 - amount * r2


def _max_error(shading, truth):
    est = illumination.shading_field(shading, 0, truth.shape[0], 0, truth.shape[1])
    return float(np.abs(est / truth - 1).max())


def test_recovers_a_non_square_fov_from_textured_brightness():
    """Block brightness = shading x log-normal tissue texture: FOV size and profile come back."""
    shape, fov = (1920, 2048), (120, 160)
    truth = _vignetting(shape, fov, 0.25)
    rng = np.random.default_rng(0)
    b = 16
    blocks = truth.reshape(shape[0] // b, b, shape[1] // b, b).mean(axis=(1, 3))
    brightness = blocks * np.exp(rng.normal(0, 0.3, blocks.shape))
    brightness[rng.random(blocks.shape) < 0.3] = np.nan  # blocks without a nucleus
    # the FOV size, when given: the profile to within 5 % (it spans 25 %)
    shading = illumination.estimate_shading(brightness, bin_px=b, fov_px=fov)
    assert _max_error(shading, truth) < 0.05
    assert shading.profile.max() == pytest.approx(1.0)
    # found from the data: to within a few pixels
    found = illumination.estimate_shading(brightness, bin_px=b)
    assert found.fov_px == fov
    assert not found.is_flat


def test_no_shading_no_correction():
    slide = simulate.simulate_slide(her2_score="2+", shape=(512, 512), seed=11, crowded=True)
    a = slide.library.drop(columns="wavelength_nm").to_numpy()
    shading, _, _ = illumination.estimate_slide_shading(slide.cube, a, list(slide.library.columns[1:]).index("DAPI"))
    assert shading.is_flat


def test_correct_shading_is_lazy_and_exact():
    rng = np.random.default_rng(1)
    signal = rng.uniform(50, 500, (3, 200, 300)).astype(np.float32)
    offset = np.array([100.0, 90.0, 110.0])
    truth = _vignetting((200, 300), (64, 96), 0.2).astype(np.float32)
    cube = da.from_array(offset[:, None, None] + signal * truth, chunks=(3, 70, 110))
    profile = truth[:64, :96] / truth[:64, :96].max()
    corrected = illumination.correct_shading(cube, illumination.Shading((64, 96), profile), offset)
    assert isinstance(corrected, da.Array) and corrected.chunks == cube.chunks
    np.testing.assert_allclose(corrected.compute(), offset[:, None, None] + signal * truth.max(), rtol=1e-4)


def _held_out_r2(terms, values, tile, train):
    """Reference: R² on the tiles not in ``train`` of a within-tile least-squares fit on those in it."""
    coef = illumination._fit(terms[train], values[train], tile[train])
    test = ~train
    y = illumination._demean(values[test], tile[test])
    pred = illumination._demean(terms[test] @ coef, tile[test])
    return 1.0 - float(((y - pred) ** 2).sum()) / float((y * y).sum())


def _cross_r2(terms, values, tile, half):
    return 0.5 * (_held_out_r2(terms, values, tile, half) + _held_out_r2(terms, values, tile, ~half))


def test_period_and_fov_scores_equal_the_per_block_held_out_fits():
    """The summed-normal-equation scores (all periods, all FOV sizes at once) are the
    held-out R² of the plain per-block fits they stand for."""
    rng = np.random.default_rng(5)
    shape, fov = (1024, 1280), (112, 144)
    truth = _vignetting(shape, fov, 0.2)
    b = illumination.BIN_PX
    blocks = truth.reshape(shape[0] // b, b, shape[1] // b, b).mean(axis=(1, 3))
    yc, xc = np.nonzero(rng.random(blocks.shape) > 0.3)
    values = np.log(blocks[yc, xc]) + rng.normal(0, 0.2, yc.size)
    ys, xs = (yc + 0.5) * b - 0.5, (xc + 0.5) * b - 0.5
    region = 256
    periods = np.array([64, 100, 112, 113, 150])
    scores = illumination._period_scores(ys, values, periods, region)
    strip = (ys // region).astype(np.intp)
    for p, score in zip(periods, scores):
        terms = illumination._poly_terms((ys % p) / p - 0.5, None)
        assert score == pytest.approx(_cross_r2(terms, values, strip, strip % 2 == 0), abs=1e-9)
    assert periods[np.argmax(scores)] == fov[0]
    sizes = [(112, 144), (110, 146), (64, 64)]
    fov_scores = illumination._fov_scores(ys, xs, values, sizes, region)
    ry, rx = (ys // region).astype(np.intp), (xs // region).astype(np.intp)
    squares, checker = ry * (rx.max() + 1) + rx, (ry + rx) % 2 == 0
    for (py, px), score in zip(sizes, fov_scores):
        terms = illumination._poly_terms((ys % py) / py - 0.5, (xs % px) / px - 0.5)
        assert score == pytest.approx(_cross_r2(terms, values, squares, checker), abs=1e-9)
        assert illumination._fov_fit(ys, xs, values, (py, px), b, region)[1] == pytest.approx(score, abs=1e-12)
    assert np.argmax(fov_scores) == 0


def test_fused_kernels_equal_the_numpy_path():
    """Block brightness and the correction: numba's one pass equals numpy's several."""
    slide = simulate.simulate_slide(her2_score="2+", shape=(384, 320), seed=12, crowded=True, photons_per_count=2.0)
    a = slide.library.drop(columns="wavelength_nm").to_numpy()
    nuclear = list(slide.library.columns[1:]).index("DAPI")
    cube = da.from_array(slide.cube, chunks=(-1, 200, 150))  # chunk edges cut blocks
    weights, offset = np.linalg.pinv(a)[nuclear], np.full(a.shape[0], 100.0)
    shading = illumination.Shading((96, 80), (0.7 + 0.3 * _vignetting((96, 80), (96, 80), 1.0)).astype(np.float32))
    fused = (illumination.nuclear_brightness(cube, weights, a[:, nuclear], offset, engine="numba"),
             illumination.correct_shading(cube, shading, offset, engine="numba").compute())
    assert np.isfinite(fused[0]).sum() > 50
    plain = (illumination.nuclear_brightness(cube, weights, a[:, nuclear], offset, engine="numpy"),
             illumination.correct_shading(cube, shading, offset, engine="numpy").compute())
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-5)
    np.testing.assert_allclose(fused[1], plain[1], rtol=1e-6)
    field = illumination.shading_field(shading, 0, 384, 0, 320)
    np.testing.assert_allclose(plain[1], offset[:, None, None] + (slide.cube - offset[:, None, None]) / field,
                               rtol=1e-5)


def test_block_brightness_does_not_depend_on_the_chunks():
    """The blocks lie on the slide's 16-px grid whatever the chunks (edges that cut blocks, or
    not), so every chunking gives numpy's brightness exactly, and the same evenly spaced regions
    when only some are read."""
    slide = simulate.simulate_slide(her2_score="2+", shape=(384, 320), seed=12, crowded=True, photons_per_count=2.0)
    a = slide.library.drop(columns="wavelength_nm").to_numpy()
    nuclear = list(slide.library.columns[1:]).index("DAPI")
    weights, offset = np.linalg.pinv(a)[nuclear], np.full(a.shape[0], 100.0)

    def brightness(cube, **kw):
        return illumination.nuclear_brightness(cube, weights, a[:, nuclear], offset, engine="numpy", **kw)

    plain = brightness(slide.cube)
    assert np.isfinite(plain).sum() > 50
    for chunks in ((-1, 200, 150), (-1, 100, 37), (-1, 384, 320)):
        np.testing.assert_array_equal(brightness(da.from_array(slide.cube, chunks=chunks)), plain)
    grid = illumination.GRID_PX
    try:  # regions of 96 px: 4 x 4 of them, of which about 5 are read
        illumination.GRID_PX = 96
        parts = [brightness(da.from_array(slide.cube, chunks=chunks), max_pixels=40_000)
                 for chunks in ((-1, 200, 150), (-1, 100, 37))]
    finally:
        illumination.GRID_PX = grid
    np.testing.assert_array_equal(parts[0], parts[1])
    assert 0 < np.isfinite(parts[0]).sum() < np.isfinite(plain).sum()


def test_unmix_with_a_gain_fits_the_corrected_cube():
    """unmix(cube, gain=1/profile) is the fit of the cube correct_shading gives, numpy and
    dask alike (the shipped panel's 9 endmembers: the 16-lane kernel applies the gain)."""
    slide = simulate.simulate_slide(her2_score="2+", shape=(300, 260), seed=13, photons_per_count=2.0)
    a = slide.library.drop(columns="wavelength_nm").to_numpy()
    offset = np.linspace(95.0, 105.0, a.shape[0])
    shading = illumination.Shading((100, 130), (0.75 + 0.25 * _vignetting((100, 130), (100, 130), 1.0))
                                   .astype(np.float32))
    cube = da.from_array(slide.cube, chunks=(-1, 128, 200))
    corrected = illumination.correct_shading(cube, shading, offset).compute()
    expected = unmixing.unmix(corrected, a)
    gain = illumination.inverse_field(shading, cube.chunks[1:])
    lazy = da.compute(*unmixing.unmix(cube, a, gain=gain, gain_offset=offset))
    eager = unmixing.unmix(slide.cube, a, gain=gain.compute(), gain_offset=offset)
    for got in (lazy, eager):
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(got[1], expected[1], rtol=1e-5, atol=1e-3)
    with pytest.raises(InputError, match="gain must have"):
        unmixing.unmix(slide.cube, a, gain=np.ones((10, 10)))
