"""Whole-image statistics of a stain: background surface, Otsu level, noise.

Everything in segmentation that depends on the whole image is estimated here
from block reductions that do not depend on how the image is chunked, so the
tiled result of :func:`qdquant.segmentation.segment_chunked` equals the
unchunked one.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numba
import numpy as np
from scipy import ndimage as ndi
from skimage import filters

from qdquant.segmentation._checks import _is_dask
from qdquant.segmentation._tuning import _BG_BLOCK_Q, _BG_PERCENTILE, _NOISE_K_SEED, _PCT_Z, _SAMPLE_MAX


@dataclass(frozen=True)
class _Stats:
    """Whole-image statistics of one stain (see :func:`_image_stats`)."""

    coarse: np.ndarray  # background level per block of `step` pixels
    step: int  # block edge, pixels
    level: float  # Otsu level of the background-corrected block means
    noise: float  # noise sigma of the smoothed image, same units
    empty: bool  # nothing above the noise


def _diff_var(a, axis=None):
    """Per-block half mean squared difference of horizontal neighbours.

    Called by ``dask.array.coarsen`` with ``a`` of shape (m, b, n, b).
    """
    if a.ndim != 4:
        return np.zeros((1,) * a.ndim, dtype=np.float64)
    d = np.diff(a, axis=3)
    return 0.5 * (d * d).mean(axis=(1, 3))


def _low_percentile(a, axis=None):
    """Per-block background: plane fit to the lower half, plus a low percentile.

    Called by ``dask.array.coarsen`` with ``a`` of shape (m, b, n, b). A
    plane is fitted (least squares) to the values at or below each block's
    median -- mostly background -- and the block's value is the plane at
    the block centre plus the ``_BG_PERCENTILE`` percentile of all residuals,
    so a slope across the block does not pull the estimate down.
    """
    if a.ndim != 4:
        return np.percentile(a, _BG_PERCENTILE, axis=axis)
    m, b, n, _ = a.shape
    v = a.transpose(0, 2, 1, 3).reshape(m, n, b * b)
    u, w = np.meshgrid(np.arange(b) - (b - 1) / 2, np.arange(b) - (b - 1) / 2, indexing="ij")
    u, w = u.ravel(), w.ravel()
    sel = (v <= np.median(v, axis=-1, keepdims=True)).astype(np.float64)
    # the normal equations of the fit of c0 + gu * u + gw * w to the selected values: six
    # distinct sums for the symmetric lhs, three for the rhs
    s1, su, sw = sel.sum(-1), (sel * u).sum(-1), (sel * w).sum(-1)
    suu, suw, sww = (sel * (u * u)).sum(-1), (sel * (u * w)).sum(-1), (sel * (w * w)).sum(-1)
    sv = sel * v
    rhs = np.stack([sv.sum(-1), (sv * u).sum(-1), (sv * w).sum(-1)], axis=-1)
    lhs = np.stack([np.stack([s1, su, sw], -1), np.stack([su, suu, suw], -1), np.stack([sw, suw, sww], -1)], -2)
    lhs += np.eye(3) * 1e-9
    c0, gu, gw = np.moveaxis(np.linalg.solve(lhs, rhs[..., None])[..., 0], -1, 0)
    resid = v - (c0[..., None] + gu[..., None] * u + gw[..., None] * w)
    return c0 + np.percentile(resid, _BG_PERCENTILE, axis=-1)


def _finite_float64(a):
    """``a`` as float64, its non-finite values 0 (``where(isfinite(a), a, 0.0)``), one new array."""
    out = np.array(a, dtype=np.float64)  # a copy even of float64: dask's chunk stays as it was
    out[~np.isfinite(out)] = 0.0
    return out


def _extend_linear(grid, k):
    """Pad a 2-D grid by ``k`` on every side, extrapolating linearly."""
    for axis in (0, 1):
        g = np.moveaxis(grid, axis, 0)
        n = g.shape[0]
        if n >= 3:
            lo = (g[2] - g[0]) / 2
            hi = (g[-1] - g[-3]) / 2
        elif n == 2:
            lo = hi = g[1] - g[0]
        else:
            lo = hi = np.zeros_like(g[0])
        steps = np.arange(1, k + 1)[:, None]
        before = g[0] - steps[::-1] * lo
        after = g[-1] + steps * hi
        grid = np.moveaxis(np.concatenate([before, g, after]), 0, axis)
    return grid


def _bilinear(coarse, step, ys, xs):
    """Block rows interpolated at ``ys`` (float64), and the columns and weights to interpolate them at ``xs``."""

    def weights(coord, n):
        # Linear inside the grid, linear extrapolation over the half block
        # beyond the outer block centres.
        u = (np.asarray(coord, dtype=np.float64) + 0.5) / step - 0.5
        i0 = np.clip(np.floor(u).astype(np.intp), 0, max(n - 2, 0))
        i1 = np.minimum(i0 + 1, n - 1)
        w = np.where(i1 > i0, u - i0, 0.0)
        return i0, i1, w

    y0, y1, wy = weights(ys, coarse.shape[0])
    x0, x1, wx = weights(xs, coarse.shape[1])
    rows = coarse[y0] * (1 - wy)[:, None] + coarse[y1] * wy[:, None]
    return rows, x0, x1, wx


def _upsample(coarse, step, ys, xs):
    """Bilinear value of the block grid at global pixel rows ``ys`` x cols ``xs`` (float32)."""
    rows, x0, x1, wx = _bilinear(coarse, step, ys, xs)
    return (rows[:, x0] * (1 - wx) + rows[:, x1] * wx).astype(np.float32)


# No fastmath: the same float64 products and sum as numpy's (no fused multiply-add).
@numba.njit(cache=True, nogil=True)
def _subtract_kernel(image, rows, x0, x1, wx, omwx):
    for i in range(image.shape[0]):
        r = rows[i]
        for j in range(image.shape[1]):
            image[i, j] -= np.float32(r[x0[j]] * omwx[j] + r[x1[j]] * wx[j])


def _subtract_background(image: np.ndarray, stats: _Stats, y0: int, x0: int) -> np.ndarray:
    """``image - _upsample(...)`` in place, for a float32 tile at global offset (y0, x0).

    The same float64 sums rounded to float32 as :func:`_upsample`, in one
    pass and without its (rows, cols) float64 temporaries.
    """
    ny, nx = image.shape
    rows, c0, c1, wx = _bilinear(stats.coarse, stats.step, np.arange(y0, y0 + ny), np.arange(x0, x0 + nx))
    _subtract_kernel(image, rows, c0, c1, wx, 1 - wx)
    return image


def _stats_parts(image, radius_px: float):
    """Lazy block reductions behind :func:`_image_stats` (dask arrays).

    f x f block means (f ~ r / 4); a low percentile of them per block of
    ~4 r pixels (the background); a regular sub-sample of at most
    ``_SAMPLE_MAX`` block means (Otsu level); per-block neighbour-difference
    variance (noise). None depends on the chunking of ``image``.
    """
    import dask.array as da

    f = max(1, int(round(radius_px / 4)))
    b = max(2, int(round(_BG_BLOCK_Q * radius_px / f)))
    step = f * b
    m, n = image.shape
    pm, pn = (-m) % step, (-n) % step
    x = image if _is_dask(image) else da.from_array(np.asarray(image), chunks=(32 * step, 32 * step))
    # float64, non-finite values 0, in one copy per chunk (astype then where made two)
    x = x.map_blocks(_finite_float64, dtype=np.float64)
    if pm or pn:
        x = da.pad(x, ((0, pm), (0, pn)), mode="edge")
    fine = da.coarsen(np.mean, x, {0: f, 1: f})
    coarse = da.coarsen(_low_percentile, fine, {0: b, 1: b})
    dvar = da.coarsen(_diff_var, x, {0: step, 1: step})
    nfm, nfn = fine.shape
    s = max(1, int(math.ceil(math.sqrt(nfm * nfn / _SAMPLE_MAX))))
    sample = fine[::s, ::s]
    return (coarse, sample, dvar), dict(f=f, step=step, s=s)


def _stats_finish(coarse, sample, dvar, *, f, step, s, smooth_sigma) -> _Stats:
    """Background surface, Otsu level and noise from the block reductions."""
    # Pixel noise: half the mean squared difference of horizontal neighbours,
    # in the median block (smooth structure adds little to it).
    sigma_raw = math.sqrt(max(float(np.median(dvar)), 0.0))
    sigma_fine = sigma_raw / f
    # A low percentile of noisy block means sits ~1.28 sigma below their mean;
    # a 3 x 3 grey opening removes blocks raised by dense nests without
    # biasing smooth slopes (as a plain minimum would).
    # Filters see the grid extended linearly, so that slopes survive at the edges.
    k = 5
    grid = _extend_linear(np.asarray(coarse, dtype=np.float64), k)
    grid = ndi.gaussian_filter(ndi.grey_opening(grid, size=3), 1.0)
    coarse = grid[k:-k, k:-k] + _PCT_Z * sigma_fine
    # Background at the sampled block means (centres of f x f blocks).
    sample = np.asarray(sample, dtype=np.float64)
    ys = np.arange(sample.shape[0]) * (s * f) + (f - 1) / 2
    xs = np.arange(sample.shape[1]) * (s * f) + (f - 1) / 2
    fg = (sample - _upsample(coarse, step, ys, xs)).ravel()
    noise = sigma_raw / (2 * math.sqrt(math.pi) * smooth_sigma)
    if fg.size == 0 or not np.ptp(fg) > 0:
        return _Stats(coarse, step, 0.0, noise, True)
    level = float(filters.threshold_otsu(fg))
    empty = level <= 0 or not np.any(fg > _NOISE_K_SEED * sigma_fine)
    return _Stats(coarse, step, level, noise, bool(empty))


def _image_stats(image, radius_px: float, smooth_sigma: float) -> _Stats:
    """Whole-image statistics of a stain image, computed now.

    The same numbers come out whether ``image`` is a NumPy array or a dask
    array of any chunking, which is what makes :func:`segment_chunked`
    tiling-invariant.
    """
    import dask

    parts, kw = _stats_parts(image, radius_px)
    parts = dask.compute(*parts, scheduler="threads")
    return _stats_finish(*parts, smooth_sigma=smooth_sigma, **kw)


def _stats_finish_warn(*parts, what, **kw) -> _Stats:
    stats = _stats_finish(*parts, **kw)
    if stats.empty and what:
        warnings.warn(f"segment_chunked: {what} has no signal above its noise; no nuclei", UserWarning, stacklevel=2)
    return stats


def _image_stats_lazy(image, radius_px: float, smooth_sigma: float, what: str | None):
    """:func:`_image_stats` as a ``dask.delayed`` object (warns about ``what`` when empty)."""
    import dask

    parts, kw = _stats_parts(image, radius_px)
    return dask.delayed(_stats_finish_warn, pure=True)(*parts, smooth_sigma=smooth_sigma, what=what, **kw)
