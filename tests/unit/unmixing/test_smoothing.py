"""Smoothing along the local structure (qdquant.unmixing.smoothing).

Truth is analytic: a straight Gaussian line (a membrane) at any angle keeps its
profile across itself, and independent noise along it falls by the Gaussian's
sum of squared weights.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from qdquant.errors import InputError
from qdquant.unmixing import kernels, smooth_along_structures, smooth_along_structures_dask
from qdquant.unmixing import smoothing


def _line(shape, angle_deg, width_px=1.2, centre=None):
    """A Gaussian line of peak 1 through ``centre`` at ``angle_deg`` from the X axis, and the
    distance of every pixel from it."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    cy, cx = centre or (shape[0] // 2, shape[1] // 2)
    t = np.deg2rad(angle_deg)
    dist = -(yy - cy) * np.cos(t) + (xx - cx) * np.sin(t)
    return np.exp(-0.5 * (dist / width_px) ** 2), dist


@pytest.mark.parametrize("angle", [0, 17, 45, 71, 90, 133])
def test_a_straight_membrane_keeps_its_profile_across_itself(angle):
    line, dist = _line((96, 96), angle)
    cube = np.stack([100 * line + 5, 40 * line + 3])
    out = smooth_along_structures(cube, 2.0)
    yy, xx = np.mgrid[0:96, 0:96]
    inner = (np.hypot(yy - 47.5, xx - 47.5) < 25)  # away from the image edge
    on = inner & (np.abs(dist) < 0.5)
    # the peak stays within a few per cent (the taps sit at the nearest pixel: up to 0.5 px off the line)
    assert out[0][on].mean() >= 0.93 * cube[0][on].mean()
    # an isotropic blur of the same sigma halves it
    from scipy import ndimage as ndi

    assert ndi.gaussian_filter(cube[0], 2.0)[on].mean() < 0.8 * cube[0][on].mean()
    # light moves along the line, not across it: the off-line flanks stay near the offset
    off = inner & (np.abs(dist) > 5)
    assert np.abs(out[0][off] - 5).max() < 1.0


def test_noise_along_a_membrane_falls_as_the_gaussian_pools_it():
    rng = np.random.default_rng(1)
    line, dist = _line((128, 128), 30, width_px=1.5)
    clean = 200 * line
    cube = (clean + rng.normal(0, 10, (8, 128, 128))).astype(np.float32)
    out = smooth_along_structures(cube, 2.0)
    yy, xx = np.mgrid[0:128, 0:128]
    on = (np.hypot(yy - 63.5, xx - 63.5) < 40) & (np.abs(dist) < 0.5)
    # on an exact line the taps are 13 distinct pixels: variance x sum(w^2) (0.14); nearest-pixel
    # taps repeat a few pixels at this angle, so allow up to twice that
    w = np.exp(-0.5 * (np.arange(-6, 7) / 2.0) ** 2)
    expected = (w / w.sum()) ** 2
    ratio = (out - clean)[:, on].var() / (cube - clean)[:, on].var()
    assert ratio < 2 * expected.sum()
    # the peak's loss to taps at the nearest pixel (up to 0.5 px off the line): under 2 %
    assert abs((out - clean)[:, on].mean()) < 0.02 * clean[on].mean()


def test_the_same_values_whatever_the_chunks():
    rng = np.random.default_rng(2)
    line, _ = _line((150, 170), 62)
    cube = (rng.poisson(5, (5, 150, 170)) + 80 * line).astype(np.float32)
    whole = smooth_along_structures(cube, 1.5, rho_px=2.5, guide_sigma_px=0.8)
    for chunks in [(5, 150, 170), (5, 40, 40), (5, 33, 71), (2, 64, 50)]:
        got = smooth_along_structures_dask(da.from_array(cube, chunks=chunks), 1.5, rho_px=2.5,
                                           guide_sigma_px=0.8).compute()
        np.testing.assert_array_equal(got, whole)


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba does not import")
def test_the_numpy_path_equals_the_kernel():
    from qdquant.unmixing.kernels.lines import smooth_lines

    rng = np.random.default_rng(3)
    cube = rng.poisson(20, (4, 60, 70)).astype(np.float32)
    dy, dx = smoothing._directions(cube.sum(axis=0, dtype=np.float64), 2.0, 1.0)
    steps = np.arange(-5, 6, dtype=np.float32)
    weights = np.full(11, 1 / 11, np.float32)
    a, b = np.empty_like(cube), np.empty_like(cube)
    smooth_lines(cube, dy, dx, steps, weights, a)
    smoothing._smooth_lines_numpy(cube, dy, dx, steps, weights, b)
    np.testing.assert_array_equal(a, b)


def _membrane_across_a_bright_edge():
    """Band 1: a faint horizontal membrane (peak 50 at row 48); band 0: a bright vertical edge
    (a nucleus' side, 1000 counts left of column 48) that crosses it."""
    line, dist = _line((96, 96), 0)
    edge = np.where(np.arange(96) < 48, 1000.0, 0.0)[None, :].repeat(96, axis=0)
    return np.stack([edge + 5, 50 * line + 5]).astype(np.float32), dist


def test_the_guide_bands_set_the_direction():
    cube, dist = _membrane_across_a_bright_edge()
    yy, xx = np.mgrid[0:96, 0:96]
    on = (np.abs(dist) < 0.5) & (np.abs(xx - 47.5) < 4)  # the membrane where it crosses the edge
    peak = cube[1][on].mean()
    # by the total light, the bright edge sets the direction there: the membrane is smoothed across
    by_total = smooth_along_structures(cube, 2.0)
    assert by_total[1][on].mean() < 0.7 * peak
    # by the membrane band's light, it is smoothed along itself and keeps its peak
    by_membrane = smooth_along_structures(cube, 2.0, guide_weights=[0.0, 1.0])
    assert by_membrane[1][on].mean() >= 0.95 * peak
    # the guide's weights need not sum to one: only the direction of their sum's structure counts
    np.testing.assert_array_equal(smooth_along_structures(cube, 2.0, guide_weights=[0.0, 7.0]), by_membrane)


def test_the_same_values_whatever_the_chunks_with_guide_weights():
    cube, _ = _membrane_across_a_bright_edge()
    whole = smooth_along_structures(cube, 1.5, guide_weights=[0.2, 1.0])
    got = smooth_along_structures_dask(da.from_array(cube, chunks=(2, 30, 41)), 1.5,
                                       guide_weights=[0.2, 1.0]).compute()
    np.testing.assert_array_equal(got, whole)


@pytest.mark.parametrize("weights", [[1.0], [1.0, -1.0], [0.0, 0.0], [np.nan, 1.0]])
def test_bad_guide_weights_raise_input_error(weights):
    with pytest.raises(InputError, match="guide_weights"):
        smooth_along_structures(np.zeros((2, 10, 10)), 1.0, guide_weights=weights)
    with pytest.raises(InputError, match="guide_weights"):
        smooth_along_structures_dask(da.zeros((2, 10, 10)), 1.0, guide_weights=weights)


def test_flat_light_is_unchanged():
    cube = np.full((3, 40, 50), 7.0, np.float32)
    np.testing.assert_allclose(smooth_along_structures(cube, 2.0), cube, rtol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(sigma_px=0), dict(sigma_px=np.nan), dict(sigma_px=1, rho_px=-1),
                                    dict(sigma_px=1, guide_sigma_px=0)])
def test_bad_scales_raise_input_error(kwargs):
    with pytest.raises(InputError):
        smooth_along_structures(np.zeros((2, 10, 10)), **kwargs)


def test_a_cube_that_is_not_three_dimensional_raises_input_error():
    with pytest.raises(InputError, match="cube"):
        smooth_along_structures(np.zeros((10, 10)), 1.0)
