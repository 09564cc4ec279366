"""qdquant.nucleus_size: the nucleus diameter estimated from the nuclear stain.

On synthetic blurred ellipses of 5 to 18 um (at least 200 of them per image; pixel size
0.5 um): within 10 % of the truth. Fallbacks and the setting (a diameter, a hint, auto).
On real and realistic images (DSB2018, the simulator's messy slide, the independent
generator): tests/integration/test_nucleus_size.py.
"""

from __future__ import annotations

import logging
import math

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi

from conftest import median_equivalent_diameter
from qdquant.metrics import match_instances
from qdquant.nucleus_size import estimate_nucleus_diameter, resolve_nucleus_diameter
from qdquant.segmentation import segment_chunked, segment_nuclei

PS = 0.5  # um per pixel of the synthetic images


def blurred_ellipses(shape, diameter_px, *, seed=0, fill=0.35):
    """Touching and free blurred ellipses on a shaded, sloped, noisy background.

    Centres uniform at random (so many touch), equivalent diameters
    ``diameter_px`` +-10 %, axis ratios 0.75-1.3, random orientation,
    log-normal brightness, a domed profile; Gaussian blur (sigma 1.2 px),
    multiplicative shading 0.6-1, a background ramp 20-80, noise sigma 5.
    Overlaps go to the ellipse drawn first.

    Returns
    -------
    image : (M, N) float32
    truth : (M, N) int32 labels
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    n = int(fill * ny * nx / (np.pi * diameter_px**2 / 4))
    truth = np.zeros(shape, np.int32)
    img = np.zeros(shape)
    for i in range(n):  # test-data generator: one small window per nucleus
        cy, cx = rng.uniform(0, ny), rng.uniform(0, nx)
        de = diameter_px * rng.uniform(0.9, 1.1)
        q = rng.uniform(0.75, 1.3)
        a, b, th = de / 2 * np.sqrt(q), de / 2 / np.sqrt(q), rng.uniform(0, np.pi)
        y0, y1 = int(max(cy - a - 2, 0)), int(min(cy + a + 3, ny))
        x0, x1 = int(max(cx - a - 2, 0)), int(min(cx + a + 3, nx))
        gy, gx = np.mgrid[y0:y1, x0:x1]
        u = (gx - cx) * np.cos(th) + (gy - cy) * np.sin(th)
        v = -(gx - cx) * np.sin(th) + (gy - cy) * np.cos(th)
        rr = (u / a) ** 2 + (v / b) ** 2
        win = (rr < 1) & (truth[y0:y1, x0:x1] == 0)
        truth[y0:y1, x0:x1][win] = i + 1
        img[y0:y1, x0:x1][win] = rng.lognormal(0, 0.3) * 100 * (1 - 0.3 * rr[win])
    img = ndi.gaussian_filter(img, 1.2)
    gy, gx = np.mgrid[0:ny, 0:nx]
    gy, gx = gy / ny, gx / nx
    img = img * (0.6 + 0.4 * np.cos(2 * (gy - 0.5))) + 20 + 40 * gy + 20 * gx + rng.normal(0, 5, shape)
    return img.astype(np.float32), truth


# --------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------


@pytest.mark.parametrize("diameter_um", [5, 8, 12, 18])
def test_synthetic_estimate_within_15_percent(diameter_um):
    d_px = diameter_um / PS
    # 24 diameters a side (at most 768 px, the side all four had): 200-300 nuclei of any
    # size, plenty for a median, where 768 px held up to 2,600 small ones (8 s for the four)
    side = min(768, 64 * round(24 * d_px / 64))
    image, truth = blurred_ellipses((side, side), d_px, seed=int(d_px))
    # Truth: the drawn ellipses, less the slivers left where they overlap.
    true_um = PS * median_equivalent_diameter(truth, min_area=0.5 * np.pi * d_px**2 / 4)
    for hint in (None, 8):
        est = estimate_nucleus_diameter(image, PS, hint_um=hint)
        print(f"synthetic {diameter_um} um, hint {hint}: estimate {est:.2f}, truth {true_um:.2f}")
        assert abs(est / true_um - 1) < 0.15  # within 9 %


def test_whole_slide_reads_windows_and_tiles_share_the_size():
    image, truth = blurred_ellipses((1536, 1536), 24, seed=3)
    lazy = da.from_array(image, chunks=256)
    est = estimate_nucleus_diameter(lazy, PS, hint_um=8, windows=2)
    assert abs(est / (PS * median_equivalent_diameter(truth, 0.5 * np.pi * 144)) - 1) < 0.15
    assert est == estimate_nucleus_diameter(image, PS, hint_um=8, windows=2)  # same windows either way
    nuclei, _ = segment_chunked(lazy[:512, :512], pixel_size_um=PS, nucleus_diameter_um=est, chunk_size=256)
    ref = segment_nuclei(image[:512, :512], PS, est)
    assert match_instances(ref, np.asarray(nuclei), iou_threshold=0.9)["f1"] > 0.99


# --------------------------------------------------------------------------
# Fallbacks and the setting
# --------------------------------------------------------------------------


def test_empty_image_falls_back_with_a_warning():
    empty = np.zeros((256, 256), np.float32)
    with pytest.warns(UserWarning, match="no nuclei-like blobs"):
        assert math.isnan(estimate_nucleus_diameter(empty, PS))
    with pytest.warns(UserWarning, match="no nuclei-like blobs"):
        assert resolve_nucleus_diameter(empty, PS, 10, hint=True)[0] == 10
    with pytest.warns(UserWarning):
        assert resolve_nucleus_diameter(empty, PS, "auto")[0] == 8.0
    with pytest.warns(UserWarning, match="no nuclei"):
        assert segment_nuclei(empty, PS, "auto").max() == 0


def test_setting_as_given_hint_or_auto(caplog):
    image, _ = blurred_ellipses((384, 384), 24, seed=5)
    assert resolve_nucleus_diameter(image, PS, 7.5) == (7.5, pytest.approx(math.nan, nan_ok=True))
    with caplog.at_level(logging.WARNING, logger="qdquant"):
        used, est = resolve_nucleus_diameter(image, PS, 5, hint=True)
    assert used == est and abs(used / 12 - 1) < 0.15
    assert "hint of 5 um" in caplog.text  # 2.4 times the hint: logged
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qdquant"):
        resolve_nucleus_diameter(image, PS, 12, hint=True)
    assert caplog.text == ""
    from qdquant.errors import InputError

    with pytest.raises(InputError, match="nucleus_diameter_um"):
        resolve_nucleus_diameter(image, PS, "big")
    with pytest.raises(InputError, match="nucleus_diameter_um"):
        segment_nuclei(image, PS, -3, nucleus_diameter_hint=True)
