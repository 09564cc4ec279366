"""Smoothing of a cube along its local structure (membranes), before the fit.

At few photons per abundance unit, the fitted HER2 of a HER2-free membrane
beside a bright membrane stain is noisy, and the fit's non-negativity turns
that noise into a positive bias (a clipped zero-mean estimate has a positive
mean). The contract's HER2 rule takes a sector's mean over 3-6 ring pixels
and calls the cell 1+ when any of 36 sectors reaches ``t_faint``: noise and
bias alone make HER2-null cells 1+. An isotropic blur pools pixels but also
lowers a membrane's intensity across it (3+ cells read 2+). Smoothing along
the membrane pools the pixels that share its intensity and leaves its profile
across it alone; in flat regions it is a mild 1-D blur. The direction is the
structure tensor's: perpendicular to the dominant gradient, around each
pixel, of a guide image, the cube's total light or a weighted sum of its
bands (the membrane stains' light: in crowded nests the edges of the bright
nuclei would otherwise set the direction at the membranes between them).
"""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
from scipy import ndimage as ndi

from qdquant.errors import InputError
from qdquant.unmixing import kernels

__all__ = ["smooth_along_structures", "smooth_along_structures_dask", "smoothing_depth"]

#: Gaussian filters here are truncated at this many sigmas (scipy's ``truncate``).
TRUNCATE = 3.0


def smoothing_depth(sigma_px: float, rho_px: float, guide_sigma_px: float) -> int:
    """Pixels around a pixel that its smoothed value depends on (the dask overlap it needs)."""
    guide = math.ceil(TRUNCATE * guide_sigma_px) + 1  # the guide's blur and its central differences
    tensor = math.ceil(TRUNCATE * rho_px)
    taps = math.ceil(TRUNCATE * sigma_px) + 1  # the taps, rounded to the nearest pixel
    return max(guide + tensor, taps)


def _directions(total: np.ndarray, rho_px: float, guide_sigma_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (dy, dx) along the structure at each pixel of a padded (Y, X) image."""
    guide = ndi.gaussian_filter(total, guide_sigma_px, mode="nearest", truncate=TRUNCATE)
    gy = ndi.correlate1d(guide, [-0.5, 0.0, 0.5], axis=0, mode="nearest")
    gx = ndi.correlate1d(guide, [-0.5, 0.0, 0.5], axis=1, mode="nearest")
    jyy = ndi.gaussian_filter(gy * gy, rho_px, mode="nearest", truncate=TRUNCATE)
    jxy = ndi.gaussian_filter(gy * gx, rho_px, mode="nearest", truncate=TRUNCATE)
    jxx = ndi.gaussian_filter(gx * gx, rho_px, mode="nearest", truncate=TRUNCATE)
    # the dominant gradient is at angle theta from the Y axis; the structure runs across it
    theta = 0.5 * np.arctan2(2.0 * jxy, jyy - jxx)
    return (-np.sin(theta)).astype(np.float32), np.cos(theta).astype(np.float32)


def _guide(cube: np.ndarray, guide_weights) -> np.ndarray:
    """The (Y, X) image whose structure gives the direction: the bands' sum, or weighted sum."""
    if guide_weights is None:
        return cube.sum(axis=0, dtype=np.float32)
    # band by band, in order: every pixel's sum is the same whatever the block (a BLAS
    # product's order depends on the block's shape, and a last-bit change can turn a direction)
    guide = np.zeros(cube.shape[1:], np.float32)
    for weight, band in zip(guide_weights.astype(np.float32), cube):
        if weight:
            guide += weight * band.astype(np.float32, copy=False)
    return guide


def _smooth_padded(cube: np.ndarray, sigma_px: float, rho_px: float, guide_sigma_px: float,
                   guide_weights=None) -> np.ndarray:
    """The smoothing of a cube already padded by :func:`smoothing_depth` (its edge is not trimmed)."""
    cube = np.ascontiguousarray(cube)  # any real dtype: the kernel reads it into float32
    dy, dx = _directions(_guide(cube, guide_weights), rho_px, guide_sigma_px)
    half = math.ceil(TRUNCATE * sigma_px)
    steps = np.arange(-half, half + 1, dtype=np.float32)
    weights = np.exp(-0.5 * (steps / np.float32(sigma_px)) ** 2)
    weights = (weights / weights.sum()).astype(np.float32)
    out = np.empty(cube.shape, np.float32)
    if kernels.AVAILABLE:
        from qdquant.unmixing.kernels.lines import smooth_lines

        smooth_lines(cube, dy, dx, steps, weights, out)
    else:
        _smooth_lines_numpy(cube, dy, dx, steps, weights, out)
    return out


def _smooth_lines_numpy(cube, dy, dx, steps, weights, out):
    """:func:`qdquant.unmixing.kernels.lines.smooth_lines` in numpy (the same sums in the same order)."""
    h, w = cube.shape[1:]
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)  # tap positions in float64, as the kernel's
    out[...] = 0
    for step, weight in zip(steps, weights):
        ty = np.clip(np.floor(rows + np.float64(step * dy) + 0.5).astype(np.int64), 0, h - 1)
        tx = np.clip(np.floor(cols + np.float64(step * dx) + 0.5).astype(np.int64), 0, w - 1)
        out += weight * cube[:, ty, tx]


def _check(sigma_px, rho_px, guide_sigma_px, guide_weights, n_bands):
    for name, value in (("sigma_px", sigma_px), ("rho_px", rho_px), ("guide_sigma_px", guide_sigma_px)):
        if not (np.isfinite(value) and value > 0):
            raise InputError(f"{name} must be a finite number > 0, got {value}")
    if guide_weights is None:
        return None
    w = np.asarray(guide_weights, dtype=np.float64)
    if w.shape != (n_bands,) or not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise InputError(f"guide_weights must be {n_bands} finite weights >= 0 (one per band), not all 0; "
                         f"got shape {w.shape}")
    return w


def smooth_along_structures(cube, sigma_px: float, *, rho_px: float = 2.0, guide_sigma_px: float = 1.0,
                            guide_weights=None) -> np.ndarray:
    """Smooth every band of a cube along the local structure (membranes, edges).

    Parameters
    ----------
    cube : (C, Y, X) array_like
        Signal (counts, dark offset subtracted).
    sigma_px : float
        Gaussian sigma of the smoothing along the structure, pixels.
    rho_px : float, optional
        Gaussian sigma of the structure tensor's integration, pixels: the
        scale over which the direction is taken. Default 2.
    guide_sigma_px : float, optional
        Gaussian sigma of the blur of the guide image before its gradient,
        pixels. Default 1.
    guide_weights : (C,) array_like, optional
        Weights of the bands in the guide image whose structure gives the
        direction (e.g. the membrane stain's spectrum). Default: the sum
        of the bands.

    Returns
    -------
    smoothed : (C, Y, X) float32 ndarray
        Each pixel, each band: the Gaussian-weighted mean of the band along
        the line through the pixel in the structure's direction (taps every
        pixel out to 3 sigma, each at the nearest pixel; beyond the image
        edge the edge pixel). A straight membrane keeps its profile across
        itself, but for the taps' rounding to the nearest pixel (up to half
        a pixel off the line: the peak of a 1.5-px-wide line drops by under 2 %).

    Notes
    -----
    The result at a pixel depends on the cube within
    :func:`smoothing_depth` pixels of it, the image edge repeated beyond
    that, so :func:`smooth_along_structures_dask` gives the same values
    whatever the chunks.
    """
    cube = np.asarray(cube)
    if cube.ndim != 3:
        raise InputError(f"cube must be (C, Y, X), got shape {cube.shape}")
    weights = _check(sigma_px, rho_px, guide_sigma_px, guide_weights, cube.shape[0])
    depth = smoothing_depth(sigma_px, rho_px, guide_sigma_px)
    padded = np.pad(cube, ((0, 0), (depth, depth), (depth, depth)), mode="edge")
    return _smooth_padded(padded, sigma_px, rho_px, guide_sigma_px, weights)[:, depth:-depth, depth:-depth]


def smooth_along_structures_dask(cube: da.Array, sigma_px: float, *, rho_px: float = 2.0,
                                 guide_sigma_px: float = 1.0, guide_weights=None) -> da.Array:
    """:func:`smooth_along_structures` of a dask (C, Y, X) cube, chunk by chunk with the overlap it needs.

    Bands are gathered into one chunk (the direction uses all of them); the
    result equals the numpy function's on the whole cube, whatever the chunks.
    """
    if cube.ndim != 3:
        raise InputError(f"cube must be (C, Y, X), got shape {cube.shape}")
    weights = _check(sigma_px, rho_px, guide_sigma_px, guide_weights, cube.shape[0])
    depth = smoothing_depth(sigma_px, rho_px, guide_sigma_px)
    cube = cube.rechunk({0: -1})
    return da.map_overlap(
        _smooth_padded, cube, depth={0: 0, 1: depth, 2: depth},
        boundary={0: "none", 1: "nearest", 2: "nearest"}, dtype=np.float32, trim=True,
        sigma_px=sigma_px, rho_px=rho_px, guide_sigma_px=guide_sigma_px, guide_weights=weights,
    )
