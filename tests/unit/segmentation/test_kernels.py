"""The compiled kernels behind segmentation: the flood, the distance transform, the background.

Each is checked against the library function it replaces, on random images.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label as cc_label
from skimage.segmentation import expand_labels, watershed

from qdquant.segmentation._components import contacts, fill_holes, label_sums, pieces
from qdquant.segmentation._distance import squared_distance
from qdquant.segmentation._flood import flood
from qdquant.segmentation._filters import gaussian, scale_space_maxima, scaled_log
from qdquant.segmentation.cells import _rim_owner, _sq_threshold
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


def test_gaussian_equals_scipy_bit_for_bit():
    rng = np.random.default_rng(10)
    for _ in range(60):
        m, n = rng.integers(1, 70, 2)
        x = (rng.random((m, n)) * rng.choice([1.0, 100.0, 1e4])).astype(np.float32)
        sigma = float(rng.choice([0.5, 0.7, 1.3333, 1.5, 3.2]))
        np.testing.assert_array_equal(gaussian(x, sigma), ndi.gaussian_filter(x, sigma, mode="nearest"))


def test_scaled_log_equals_scipy_bit_for_bit():
    rng = np.random.default_rng(5)
    for _ in range(60):
        m, n = rng.integers(1, 70, 2)
        x = (rng.random((m, n)) * rng.choice([1.0, 100.0, 1e4])).astype(np.float32)
        sigma = float(rng.choice([0.7, 1.3, 3.2, 4.0, 4.8]))
        expected = ndi.gaussian_laplace(x, sigma, mode="nearest")
        expected *= np.float32(-(sigma * sigma))
        np.testing.assert_array_equal(scaled_log(x, sigma), expected)


def test_scale_space_maxima_equals_maximum_filters():
    rng = np.random.default_rng(6)
    for _ in range(30):
        m, n = rng.integers(1, 60, 2)
        resp = ndi.gaussian_filter(rng.random((3, m, n)), (0, 2, 2)).astype(np.float32)
        resp = np.round(resp * 50) / 50  # ties
        half, floor = int(rng.integers(1, 4)), 0.45
        nb = [ndi.maximum_filter(lg, size=2 * half + 1, mode="nearest") for lg in resp]
        expected = np.zeros((m, n), bool)
        for k, lg in enumerate(resp):
            top = np.maximum.reduce(nb[max(k - 1, 0) : k + 2])
            expected |= (lg >= top) & (lg > np.float32(floor))
        np.testing.assert_array_equal(scale_space_maxima(resp, half, floor), expected)


def _random_labels(rng, m, n):
    """Blobs of a few labels with gaps, holes and split pieces."""
    lab = rng.integers(0, 5, (m, n)) * (rng.random((m, n)) < 0.75)
    return ndi.median_filter(lab, size=3).astype(np.int32)


def test_pieces_equal_skimage_label():
    rng = np.random.default_rng(7)
    for _ in range(100):
        lab = _random_labels(rng, *rng.integers(1, 50, 2))
        got, n = pieces(lab)
        expected = cc_label(lab, background=0, connectivity=1)
        np.testing.assert_array_equal(got, expected)
        assert n == expected.max()


def _fill_holes_reference(lab):
    """Holes as binary_fill_holes finds them, filled where one label borders them."""
    holes = ndi.binary_fill_holes(lab > 0) & (lab == 0)
    hc, nh = ndi.label(holes)
    out = lab.copy()
    for h in range(1, nh + 1):
        border = ndi.binary_dilation(hc == h) & (hc != h)  # 4-neighbours (cross)
        found = np.unique(lab[border & (lab > 0)])
        if len(found) == 1:
            out[hc == h] = found[0]
    return out


def test_fill_holes_equals_reference():
    rng = np.random.default_rng(8)
    for _ in range(100):
        lab = _random_labels(rng, *rng.integers(1, 40, 2))
        before = lab.copy()
        np.testing.assert_array_equal(fill_holes(lab), _fill_holes_reference(lab))
        np.testing.assert_array_equal(lab, before)


@pytest.mark.parametrize("rim", [1.0, 2.0, 2.5, 3.0])
def test_rim_owner_equals_expand_labels(rim):
    """Ties between nuclei at the same distance go where scipy's feature transform sends them."""
    rng = np.random.default_rng(9)
    for _ in range(40):
        m, n = rng.integers(5, 60, 2)
        blobs = (rng.random((m, n)) < 0.04) | (ndi.uniform_filter(rng.random((m, n)), 5) > 0.6)
        nuclei = ndi.label(blobs)[0].astype(np.int32)
        if not nuclei.any():
            continue
        cells = expand_labels(nuclei, 4)  # any cells around the nuclei
        sel = rng.random((m, n)) < 0.7
        d2 = squared_distance(nuclei > 0)
        expected = sel & (expand_labels(nuclei, rim) == cells) & (cells > 0)
        got = _rim_owner(cells, nuclei, d2, sel & (cells > 0), _sq_threshold(rim))
        np.testing.assert_array_equal(got, expected)


def test_label_sums_and_contacts_equal_numpy():
    rng = np.random.default_rng(11)
    for _ in range(50):
        m, n = rng.integers(1, 50, 2)
        lab = _random_labels(rng, m, n)
        values = rng.normal(50, 20, (m, n)).astype(np.float32)
        k = int(lab.max())
        yy, xx = np.nonzero(lab)
        lv, yf, xf = lab[yy, xx], yy.astype(float), xx.astype(float)
        weights = (None, yf, xf, yf * yf, xf * xf, yf * xf, values[yy, xx].astype(float))
        expected = np.stack([np.bincount(lv, w, k + 1) for w in weights])
        np.testing.assert_array_equal(label_sums(lab, values, k), expected)
        lo, hi, mean = [], [], []
        for a, b, fa, fb in ((lab[:, :-1], lab[:, 1:], values[:, :-1], values[:, 1:]),
                             (lab[:-1], lab[1:], values[:-1], values[1:])):
            sel = (a > 0) & (b > 0) & (a != b)
            lo.append(np.minimum(a[sel], b[sel]))
            hi.append(np.maximum(a[sel], b[sel]))
            mean.append(0.5 * (fa[sel] + fb[sel]))
        for got, want in zip(contacts(lab, values), (lo, hi, mean)):
            np.testing.assert_array_equal(got, np.concatenate(want))


def test_float32_root_of_integers_below_2_24_is_the_rounded_float64_root():
    """What nuclei._distance32 relies on, for every integer it can meet."""
    k = np.arange(2**24, dtype=np.int64)
    np.testing.assert_array_equal(np.sqrt(k.astype(np.float32)), np.sqrt(k).astype(np.float32))
