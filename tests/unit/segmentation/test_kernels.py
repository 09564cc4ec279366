"""The compiled kernels behind segmentation: the flood, the distance transform, the background.

Each is checked against the library function it replaces, on random images.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from qdquant.segmentation._distance import squared_distance
from qdquant.segmentation._flood import flood
from qdquant.segmentation.cells import _sq_threshold
from qdquant.segmentation.image_stats import _Stats, _subtract_background, _upsample


def _random_case(rng, plateaus: bool):
    m, n = rng.integers(2, 50, 2)
    land = rng.random((m, n)).astype(np.float32) - 0.3
    if plateaus:  # ties among the flooded pixels: the entry order decides
        land = np.round(land * 4).astype(np.float32)
    markers = np.zeros((m, n), np.int32)
    k = int(rng.integers(1, min(8, m * n)))
    markers.flat[rng.choice(m * n, k, replace=False)] = rng.permutation(k) + 1
    if rng.random() < 0.3:
        markers = ndi.grey_dilation(markers, size=3)
    # seeds of distinct values: skimage leaves ties among seeds in an order of its own heap
    seeds = markers > 0
    land[seeds] = -1 - np.arange(seeds.sum(), dtype=np.float32) / 64
    mask = rng.random((m, n)) > 0.25 if rng.random() < 0.5 else None
    return land, markers, mask


@pytest.mark.parametrize("plateaus", [False, True])
def test_flood_equals_skimage_watershed(plateaus):
    rng = np.random.default_rng(1 + plateaus)
    for _ in range(200):
        land, markers, mask = _random_case(rng, plateaus)
        expected = watershed(land, markers, mask=mask)
        got = flood(land, markers, mask)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, expected)


def test_flood_seed_ties_go_in_raster_order_and_unreachable_pixels_stay_0():
    land = np.zeros((3, 5), np.float32)
    markers = np.zeros((3, 5), np.int32)
    markers[1, 0], markers[1, 2] = 7, 3  # pixel (1, 1) borders both
    mask = np.ones((3, 5), bool)
    mask[:, 3] = False  # column 4 is cut off from every seed
    out = flood(land, markers, mask)
    assert out[1, 1] == 7
    assert (out[:, 3:] == 0).all()
    assert (out[:, :3] > 0).all()


def test_squared_distance_equals_scipy():
    rng = np.random.default_rng(3)
    for _ in range(300):
        m, n = rng.integers(1, 60, 2)
        feature = rng.random((m, n)) < rng.choice([0.002, 0.02, 0.2, 0.7])
        feature.flat[rng.integers(m * n)] = True
        d2 = squared_distance(feature)
        np.testing.assert_array_equal(np.sqrt(d2), ndi.distance_transform_edt(~feature))


@pytest.mark.parametrize("d", [0.0, 0.5, 1.0, 2.0, 2.5, 9.6, 10.0, math.sqrt(2), 1e-9])
def test_sq_threshold_matches_comparing_square_roots(d):
    k = np.arange(200)
    assert _sq_threshold(d) == k[np.sqrt(k) <= d].max()


def test_subtract_background_equals_upsample():
    rng = np.random.default_rng(4)
    coarse = rng.normal(50, 10, (7, 9))
    stats = _Stats(coarse, 16, 1.0, 1.0, False)
    image = rng.random((90, 130)).astype(np.float32) * 100
    ys, xs = np.arange(11, 101), np.arange(5, 135)
    expected = image - _upsample(coarse, 16, ys, xs)
    got = _subtract_background(image.copy(), stats, 11, 5)
    np.testing.assert_array_equal(got, expected)
