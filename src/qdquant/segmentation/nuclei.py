"""Nucleus segmentation: LoG seeds, a seeded watershed and per-nucleus contours."""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import ndimage as ndi

from qdquant.segmentation._checks import _as_float, _check_image, _check_scale, _diameter, _radius_px
from qdquant.segmentation._components import contacts, fill_holes, label_sums, pieces
from qdquant.segmentation._distance import squared_distance
from qdquant.segmentation._flood import flood
from qdquant.segmentation._filters import gaussian, scale_space_maxima, scaled_log
from qdquant.segmentation._tuning import (
    _ALPHA, _COMPACTNESS, _LOG_Q, _MASK_MIN, _MAX_AREA_Q, _MERGE_AREA, _MERGE_DIP, _MERGE_R, _MIN_AREA_Q,
    _NMS_Q, _NOISE_K_MASK, _NOISE_K_SEED, _SEED_H, _SEED_MIN, _SMOOTH_Q, NUCLEUS_DIAMETER_UM,
)
from qdquant.segmentation.image_stats import _image_stats, _Stats, _subtract_background


def _largest_piece(lab: np.ndarray) -> np.ndarray:
    """Keep, for every label, only its largest 4-connected piece (the first in raster order of equal ones)."""
    pcs, npc = pieces(lab)
    if npc == 0:
        return lab
    area = np.bincount(pcs.ravel(), minlength=npc + 1)
    owner = np.zeros(npc + 1, dtype=lab.dtype)
    owner[pcs.ravel()] = lab.ravel()
    ids = np.arange(1, npc + 1)
    order = np.lexsort((-area[1:], owner[1:]))  # by owner, largest first
    first = np.ones(len(order), dtype=bool)
    first[1:] = owner[1:][order][1:] != owner[1:][order][:-1]
    keep = np.zeros(npc + 1, dtype=bool)
    keep[ids[order][first]] = True
    return np.where(keep[pcs], lab, 0)


def _ellipse_fit(mom: np.ndarray) -> np.ndarray:
    """Area over the area of the ellipse of the same second moments (1 for an ellipse)."""
    c, sy, sx, syy, sxx, sxy = mom
    with np.errstate(invalid="ignore", divide="ignore"):
        my, mx = sy / c, sx / c
        vy = syy / c - my * my + 1 / 12
        vx = sxx / c - mx * mx + 1 / 12
        cxy = sxy / c - my * mx
        return c / (4 * np.pi * np.sqrt(np.maximum(vy * vx - cxy * cxy, 1e-12)))


def _merge_fragments(lab: np.ndarray, fg: np.ndarray, max_area: float, min_fit: float, min_dip: float) -> np.ndarray:
    """Merge touching labels whose union is small and ellipse-like.

    Over-split textured nuclei give two or more touching pieces whose union
    has about one nucleus's area and an elliptical outline, with no
    intensity dip where they touch; touching distinct nuclei have twice the
    area, a waist or a dip.
    """
    n = int(lab.max())
    if n < 2:
        return lab
    lo, hi, vals = contacts(lab, fg)
    if len(lo) == 0:
        return lab
    key = lo.astype(np.int64) * (n + 1) + hi
    key, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
    contact = np.bincount(inv, vals.astype(np.float64)) / cnt  # mean intensity along the contact
    pa, pb = np.divmod(key, n + 1)
    sums = label_sums(lab, fg, n)  # count, y, x, yy, xx, xy, intensity
    mom = sums[:6]
    mean = sums[6] / np.maximum(mom[0], 1)
    union = mom[:, pa] + mom[:, pb]
    fit = _ellipse_fit(union)
    ok = (union[0] <= max_area) & (fit >= min_fit) & (contact >= min_dip * np.minimum(mean[pa], mean[pb]))
    if not ok.any():
        return lab
    pa, pb, fit = pa[ok], pb[ok], fit[ok]
    # Keep the pairs that are each member's best (mutual best fit): every
    # label is merged at most once per pass.
    best = np.full(n + 1, -np.inf)
    np.maximum.at(best, pa, fit)
    np.maximum.at(best, pb, fit)
    keep = (fit == best[pa]) & (fit == best[pb])
    lut = np.arange(n + 1, dtype=lab.dtype)
    lut[pb[keep]] = pa[keep]
    return lut[lab]


def _size_filter(lab: np.ndarray, min_area: float, max_area: float) -> np.ndarray:
    """Objects of ``min_area`` to ``max_area`` pixels kept, renumbered 1..n in the order of their ids (int32)."""
    area = np.bincount(lab.ravel())
    keep = (area >= min_area) & (area <= max_area) & (area > 0)
    keep[0] = False
    lut = np.cumsum(keep, dtype=np.int32)
    lut[~keep] = 0
    return lut[lab]


def _distance32(d2: np.ndarray) -> np.ndarray:
    """``sqrt(d2)`` as float32, equal to float32 of the float64 root.

    Below 2**24 the square is exact in float32 and the float32 root is the
    rounded float64 root (double rounding is harmless for square roots), so
    the float64 pass is only needed for images whose diagonal reaches 4096.
    """
    if (d2.shape[0] - 1) ** 2 + (d2.shape[1] - 1) ** 2 < 2**24:
        return np.sqrt(d2.astype(np.float32))
    return np.sqrt(d2).astype(np.float32)


def _seed_points(fg: np.ndarray, level: float, r: float) -> np.ndarray:
    """Scale-space maxima of the scale-normalised LoG (bool image)."""
    x = fg / np.float32(level)
    m = max(1, int(round(_NMS_Q * r)))
    resp = np.empty((len(_LOG_Q), *fg.shape), np.float32)
    for k, q in enumerate(_LOG_Q):
        scaled_log(x, q * r, out=resp[k])
    return scale_space_maxima(resp, m, _SEED_H)


def _nuclei_tile(tile: np.ndarray, stats: _Stats, r: float, y0: int = 0, x0: int = 0) -> np.ndarray:
    """Segment nuclei in one (possibly padded) tile at global offset (y0, x0)."""
    out = np.zeros(tile.shape, dtype=np.int32)
    if stats.empty or tile.size == 0:
        return out
    sigma = max(_SMOOTH_Q * r, 0.7)
    fg = _subtract_background(gaussian(tile, sigma), stats, y0, x0)
    level = np.float32(stats.level)
    t_seed = max(_SEED_MIN * stats.level, _NOISE_K_SEED * stats.noise)
    t_mask = max(_MASK_MIN * stats.level, _NOISE_K_MASK * stats.noise)
    mask = fg > t_mask
    if not mask.any():
        return out
    seeds = _seed_points(fg, stats.level, r) & (fg > t_seed)
    # Merge maxima closer than ~0.3 r (plateaus, neighbouring scales).
    grow = max(1, int(round(0.15 * r)))
    disk = np.hypot(*np.mgrid[-grow : grow + 1, -grow : grow + 1]) <= grow
    markers, n = ndi.label(ndi.binary_dilation(seeds, disk) & mask)
    if n == 0:
        return out
    land = -np.log(np.maximum(fg, np.float32(0.05) * level))
    # Distance-to-seed term: keeps a bright nucleus from flooding a dim
    # neighbour (like a compact watershed, at a fraction of its cost).
    land += (_COMPACTNESS / r) * _distance32(squared_distance(markers > 0))
    lab = flood(land, markers, mask)
    del land
    inside = lab > 0
    peak = np.full(n + 1, -np.inf, dtype=np.float32)
    np.maximum.at(peak, lab[inside], fg[inside])
    peak[0] = np.inf
    lab = np.where(fg > _ALPHA * peak[lab], lab, 0).astype(np.int32)
    lab = _largest_piece(lab)
    lab = fill_holes(lab)
    area = math.pi * r * r
    if _MERGE_AREA > 0:
        lab = _merge_fragments(lab, fg, _MERGE_AREA * area, _MERGE_R, _MERGE_DIP)
    return _size_filter(lab, _MIN_AREA_Q * area, _MAX_AREA_Q * area)


def segment_nuclei(
    image,
    pixel_size_um: float,
    nucleus_diameter_um: float | str = NUCLEUS_DIAMETER_UM,
    *,
    nucleus_diameter_hint: bool = False,
) -> np.ndarray:
    """Label the nuclei of a nuclear-stain abundance image.

    The stain image (DAPI/Hoechst abundance, histone counts, ...) may carry a
    smooth background, shading and noise. Steps:

    1. Gaussian smoothing (sigma = r / 6, r the nucleus radius in pixels).
    2. Subtraction of a smooth background: per ~4 r block, a plane fitted to
       the darker half of the block plus a low percentile of the residuals,
       a grey opening over 3 x 3 blocks (dense nests do not raise it), then
       bilinear interpolation. The Otsu level of the corrected image and the
       pixel noise (from neighbour differences) set the thresholds below.
    3. Seeds at the scale-space maxima of the scale-normalised Laplacian of
       Gaussian (sigma = 0.4, 0.5 and 0.6 r), which split touching nuclei by
       shape and by intensity dips alike; a seed must be brighter than 40 %
       of the Otsu level and 6 noise sigmas.
    4. A seeded watershed on log intensity plus a distance-to-seed term
       (a bright nucleus does not flood a dim neighbour) inside the
       foreground (above a quarter of the Otsu level and 3 noise sigmas).
    5. Each nucleus cut at 45 % of its own peak above background, so dim and
       bright nuclei get the same kind of contour (the edge of a blurred
       object); its largest piece kept, holes filled.
    6. Touching pieces of an over-split textured nucleus merged: pairs whose
       union is at most 1.3 times the nominal area, fits an ellipse (area
       >= 0.9 of the ellipse of the same second moments) and shows no
       intensity dip along the contact (each piece merged once).
    7. Objects smaller than 15 % or larger than 25 times the area of a disc
       of diameter ``nucleus_diameter_um`` dropped.

    Parameters
    ----------
    image : (M, N) array_like of float
        Nuclear-stain abundance, arbitrary units (NumPy or dask array;
        non-finite values count as 0).
    pixel_size_um : float
        Pixel edge, micrometres.
    nucleus_diameter_um : float or "auto", optional
        Typical nucleus diameter (of a disc of the same area), micrometres.
        It sets every scale of the method. A number is used as given (unless
        ``nucleus_diameter_hint``); ``"auto"`` estimates it from the image
        (:func:`qdquant.nucleus_size.estimate_nucleus_diameter`, 3-40 um).
        Where sizes vary, err on the large side (e.g. the upper quartile, or
        the tumour nuclei rather than the lymphocytes): too small a value
        splits large textured nuclei, too large a value merges touching
        small ones; nuclei under a third of it across tend to be missed.
        Default: the config schema's ``segmentation.nucleus_diameter_um``
        (``"auto"``), as a workflow run has it.
    nucleus_diameter_hint : bool, optional
        Treat a number ``nucleus_diameter_um`` as a hint: the diameter is
        estimated from the image within 1/3 to 3 times it.

    Returns
    -------
    nuclei : (M, N) ndarray of int32
        0 = background, 1..n = nuclei.
        An image with no nuclei (e.g. all zeros) gives all zeros and a
        :class:`UserWarning`.

    Raises
    ------
    InputError
        If ``image`` is not 2-D, or a length is not positive, or the nucleus
        is under 3 pixels across.
    """
    image = _check_image(image)
    d = _diameter(image, pixel_size_um, nucleus_diameter_um, nucleus_diameter_hint)
    ps, (d,) = _check_scale(pixel_size_um, nucleus_diameter_um=d)
    r = _radius_px(d, ps)
    stats = _image_stats(image, r, max(_SMOOTH_Q * r, 0.7))
    if stats.empty:
        warnings.warn(
            f"segment_nuclei: image of shape {tuple(image.shape)} has no signal above its noise; no nuclei",
            UserWarning,
            stacklevel=2,
        )
        return np.zeros(image.shape, dtype=np.int32)
    lab = _nuclei_tile(_as_float(image), stats, r)
    if lab.max() == 0:
        warnings.warn(
            f"segment_nuclei: no nuclei found in image of shape {tuple(image.shape)}", UserWarning, stacklevel=2
        )
    return lab
