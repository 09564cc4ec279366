"""Nucleus and whole-cell segmentation, and the per-cell compartments.

Classical image analysis only (no trained model):

* :func:`segment_nuclei` -- background-corrected multi-scale
  Laplacian-of-Gaussian seeds, a seeded watershed on log intensity plus a
  distance-to-seed term, and a per-nucleus contour at a fixed fraction of
  the nucleus's own peak, so that dim and bright nuclei are cut alike and
  touching nuclei are split.
* :func:`segment_cells` -- each nucleus grown by at most
  ``cell_expansion_um``: a seeded watershed on the membrane stain (plus a
  distance term, so cells without membrane stain still get a sensible
  territory) or, with no membrane image, a plain expansion.
* :func:`segment_chunked` -- both of the above on overlapping tiles of a
  whole slide held as a dask array; each object is kept by the tile that owns
  its nucleus centroid, so the result does not depend on the tiling.
* :func:`membrane_ring` and :func:`compartments` -- the per-cell nucleus,
  membrane and cytoplasm masks of the user contract.

Physical parameters are in micrometres; the pixel size converts them.
Everything that depends on the whole image (background surface, Otsu level,
noise level, membrane scale) is estimated once by :func:`_image_stats` from
block reductions that do not depend on how the image is chunked; everything
else is local, which is what makes the chunked result equal the unchunked one.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import zarr
from scipy import ndimage as ndi
from skimage import filters, segmentation

from qdquant.errors import InputError

__all__ = [
    "membrane_ring",
    "compartments",
    "segment_nuclei",
    "segment_cells",
    "segment_chunked",
]

# --- tuning constants (fractions of the nucleus radius r unless stated) -----
_SMOOTH_Q = 1 / 6  # pre-smoothing Gaussian sigma
_LOG_Q = (0.4, 0.5, 0.6)  # LoG scales of the seed detector
_SEED_H = 0.05  # minimum scale-normalised LoG response (units of the Otsu level)
_NMS_Q = 0.3  # half-width of the non-maximum suppression window
_SEED_MIN = 0.4  # a seed's intensity >= this fraction of the Otsu level
_MASK_MIN = 0.25  # watershed mask: intensity >= this fraction of the Otsu level
_NOISE_K_SEED = 6.0  # ... and >= this many noise sigmas (seeds)
_NOISE_K_MASK = 3.0  # ... (mask)
_ALPHA = 0.45  # nucleus contour at this fraction of its own peak
_COMPACTNESS = 0.8  # weight of the distance-to-seed term (per r) in the watershed landscape
_MIN_AREA_Q = 0.15  # smallest nucleus, fraction of pi r^2
_MERGE_AREA = 1.3  # merge touching pieces whose union is below this multiple of pi r^2 ...
_MERGE_R = 0.9  # ... and at least this ellipse-like ...
_MERGE_DIP = 0.8  # ... and no dip: contact intensity >= this fraction of the dimmer piece's mean
_MAX_AREA_Q = 25.0  # largest object kept, multiple of pi r^2
_BG_BLOCK_Q = 4.0  # background block edge, in r
_BG_PERCENTILE = 10.0
_PCT_Z = 1.2816  # standard-normal quantile of _BG_PERCENTILE (bias correction)
_SAMPLE_MAX = 4_000_000  # most block means used for the global statistics
_MEMBRANE_SMOOTH_UM = 0.75  # membrane pre-smoothing sigma, micrometres
_MEMBRANE_WEIGHT = 4.0  # weight of the membrane term against the distance term
# A cell whose cytoplasm carries essentially no membrane stain (mean
# saturated score m / (1 + m) below this, i.e. m ~ 1/20 of the Otsu level)
# keeps only a rim of cytoplasm this wide, micrometres. Higher levels also
# trim the sparse-count cells of the MIBI data set (tests/test_segmentation.py).
_BARE_LEVEL = 0.05
_BARE_RIM_UM = 1.0


# --------------------------------------------------------------------------
# Compartments
# --------------------------------------------------------------------------


def membrane_ring(cells: np.ndarray, width_px: float) -> np.ndarray:
    """Pixels of each cell within ``width_px`` (Euclidean) of a pixel outside it.

    "Outside" is background or another cell; pixels beyond the image edge are
    not pixels, so the image edge alone does not make a ring (the same as
    ``ndi.distance_transform_edt(cells == id) <= width_px`` per cell).

    Parameters
    ----------
    cells : (M, N) ndarray of int
        Cell labels, 0 = background.
    width_px : float
        Ring width in pixels (>= 0; below 1 the ring is empty).

    Returns
    -------
    ring : (M, N) ndarray of bool
    """
    cells = np.asarray(cells)
    if cells.ndim != 2:
        raise InputError(f"cells must be 2-D, got shape {cells.shape}")
    if not np.isfinite(width_px) or width_px < 0:
        raise InputError(f"width_px must be a finite number >= 0, got {width_px}")
    r = int(np.floor(width_px))
    m, n = cells.shape
    ring = np.zeros(cells.shape, dtype=bool)
    # Compare every pixel with each pixel of the disc of radius width_px around
    # it; "edge" padding repeats the border value, so the outside of the image
    # never differs from the cell (the image edge is not "outside").
    padded = np.pad(cells, r, mode="edge")
    w2 = width_px * width_px
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if (dy or dx) and dy * dy + dx * dx <= w2:
                ring |= padded[r + dy : r + dy + m, r + dx : r + dx + n] != cells
    return ring & (cells > 0)


def compartments(cells: np.ndarray, nuclei: np.ndarray, membrane_width_px: float):
    """Nucleus, membrane and cytoplasm masks of every cell.

    Parameters
    ----------
    cells, nuclei : (M, N) ndarrays of int
        Cell and nucleus labels (0 = background); a cell and its nucleus
        share the id.
    membrane_width_px : float
        Width of the membrane ring, pixels (see :func:`membrane_ring`).

    Returns
    -------
    nucleus, membrane, cytoplasm : (M, N) ndarrays of bool
        Nucleus: the nucleus label (inside its cell); membrane: the ring of
        :func:`membrane_ring`; cytoplasm: the rest of the cell (neither
        nucleus nor membrane). Nucleus and membrane may overlap where a
        nucleus reaches the cell border.
    """
    cells = np.asarray(cells)
    nuclei = np.asarray(nuclei)
    if cells.shape != nuclei.shape:
        raise InputError(f"cells and nuclei shapes differ: {cells.shape} vs {nuclei.shape}")
    nucleus = (nuclei > 0) & (cells > 0)
    membrane = membrane_ring(cells, membrane_width_px)
    cytoplasm = (cells > 0) & ~nucleus & ~membrane
    return nucleus, membrane, cytoplasm


# --------------------------------------------------------------------------
# Input checks and global statistics
# --------------------------------------------------------------------------


def _is_dask(a) -> bool:
    return type(a).__module__.startswith("dask")


def _check_image(image, name="image"):
    ndim = getattr(image, "ndim", None)
    shape = getattr(image, "shape", None)
    if ndim is None:
        image = np.asarray(image)
        ndim, shape = image.ndim, image.shape
    if ndim != 2:
        raise InputError(f"{name} must be a 2-D (Y, X) image, got shape {tuple(shape)}")
    dtype = np.dtype(image.dtype)
    if dtype.kind not in "biuf":
        raise InputError(f"{name} must be numeric, got dtype {dtype}")
    return image


def _check_scale(pixel_size_um, **lengths):
    try:
        ps = float(pixel_size_um)
    except (TypeError, ValueError):
        raise InputError(f"pixel_size_um must be a number, got {pixel_size_um!r}") from None
    if not (np.isfinite(ps) and ps > 0):
        raise InputError(f"pixel_size_um must be > 0, got {pixel_size_um}")
    out = []
    for k, v in lengths.items():
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise InputError(f"{k} must be a number, got {v!r}") from None
        strict = k == "nucleus_diameter_um"
        if not (np.isfinite(v) and (v > 0 if strict else v >= 0)):
            raise InputError(f"{k} must be a finite length in micrometres ({'> 0' if strict else '>= 0'}), got {v}")
        out.append(v)
    return ps, out


def _as_float(tile) -> np.ndarray:
    tile = np.asarray(tile, dtype=np.float32)
    if not np.all(np.isfinite(tile)):
        tile = np.where(np.isfinite(tile), tile, 0).astype(np.float32)
    return tile


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
    cols = (np.ones_like(u), u, w)
    lhs = np.empty((m, n, 3, 3))
    rhs = np.empty((m, n, 3))
    for i, ci in enumerate(cols):
        rhs[..., i] = (sel * v * ci).sum(-1)
        for j, cj in enumerate(cols):
            lhs[..., i, j] = (sel * (ci * cj)).sum(-1)
    lhs += np.eye(3) * 1e-9
    c0, gu, gw = np.moveaxis(np.linalg.solve(lhs, rhs[..., None])[..., 0], -1, 0)
    resid = v - (c0[..., None] + gu[..., None] * u + gw[..., None] * w)
    return c0 + np.percentile(resid, _BG_PERCENTILE, axis=-1)


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


def _upsample(coarse, step, ys, xs):
    """Bilinear value of the block grid at global pixel rows ``ys`` x cols ``xs``."""

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
    return (rows[:, x0] * (1 - wx) + rows[:, x1] * wx).astype(np.float32)


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
    x = x.astype(np.float64)
    x = da.where(da.isfinite(x), x, 0.0)
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


# --------------------------------------------------------------------------
# Label-image helpers (vectorised)
# --------------------------------------------------------------------------


def _largest_piece(lab: np.ndarray) -> np.ndarray:
    """Keep, for every label, only its largest 4-connected piece."""
    from skimage.measure import label as cc_label

    pieces = cc_label(lab, background=0, connectivity=1)
    npc = int(pieces.max())
    if npc == 0:
        return lab
    area = np.bincount(pieces.ravel(), minlength=npc + 1)
    owner = np.zeros(npc + 1, dtype=lab.dtype)
    owner[pieces.ravel()] = lab.ravel()
    ids = np.arange(1, npc + 1)
    order = np.lexsort((-area[1:], owner[1:]))  # by owner, largest first
    first = np.ones(len(order), dtype=bool)
    first[1:] = owner[1:][order][1:] != owner[1:][order][:-1]
    keep = np.zeros(npc + 1, dtype=bool)
    keep[ids[order][first]] = True
    return np.where(keep[pieces], lab, 0)


def _fill_holes(lab: np.ndarray) -> np.ndarray:
    """Fill the background holes that touch a single label with that label."""
    filled = ndi.binary_fill_holes(lab > 0)
    holes = filled & (lab == 0)
    if not holes.any():
        return lab
    hc, nh = ndi.label(holes)
    pairs = []
    for axis in (0, 1):
        for shift in (1, -1):
            a = hc
            b = np.roll(lab, shift, axis=axis)
            valid = np.ones(lab.shape, dtype=bool)
            idx = [slice(None)] * 2
            idx[axis] = slice(0, 1) if shift == 1 else slice(-1, None)
            valid[tuple(idx)] = False
            sel = valid & (a > 0) & (b > 0)
            pairs.append(np.stack([a[sel], b[sel]], axis=1))
    pairs = np.unique(np.concatenate(pairs), axis=0)
    n_nb = np.bincount(pairs[:, 0], minlength=nh + 1)
    fill = np.zeros(nh + 1, dtype=lab.dtype)
    single = n_nb[pairs[:, 0]] == 1
    fill[pairs[single, 0]] = pairs[single, 1]
    return np.where(hc > 0, fill[hc], lab).astype(lab.dtype)


def _moments(lab: np.ndarray, n: int) -> np.ndarray:
    """(6, n + 1) per-label sums: count, y, x, yy, xx, xy (pixel centres)."""
    yy, xx = np.nonzero(lab)
    lv = lab[yy, xx]
    yy = yy.astype(np.float64)
    xx = xx.astype(np.float64)
    return np.stack([np.bincount(lv, w, n + 1) for w in (None, yy, xx, yy * yy, xx * xx, yy * xx)])


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
    pairs, vals = [], []
    for a, b, fa, fb in ((lab[:, :-1], lab[:, 1:], fg[:, :-1], fg[:, 1:]), (lab[:-1], lab[1:], fg[:-1], fg[1:])):
        sel = (a > 0) & (b > 0) & (a != b)
        pairs.append(np.stack([np.minimum(a[sel], b[sel]), np.maximum(a[sel], b[sel])], 1))
        vals.append(0.5 * (fa[sel] + fb[sel]))
    pairs = np.concatenate(pairs)
    if len(pairs) == 0:
        return lab
    vals = np.concatenate(vals).astype(np.float64)
    key = pairs[:, 0].astype(np.int64) * (n + 1) + pairs[:, 1]
    key, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
    contact = np.bincount(inv, vals) / cnt  # mean intensity along the contact
    pa, pb = np.divmod(key, n + 1)
    mom = _moments(lab, n)
    inside = lab > 0
    mean = np.bincount(lab[inside], fg[inside].astype(np.float64), n + 1) / np.maximum(mom[0], 1)
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
    area = np.bincount(lab.ravel())
    bad = (area < min_area) | (area > max_area)
    bad[0] = False
    if bad.any():
        lab = np.where(bad[lab], 0, lab)
    return lab


def _relabel(lab: np.ndarray) -> np.ndarray:
    """Consecutive ids 1..n, in the order of the old ids."""
    present = np.bincount(lab.ravel()) > 0
    present[0] = False
    lut = np.cumsum(present, dtype=np.int32)
    lut[~present] = 0
    return lut[lab]


# --------------------------------------------------------------------------
# Nuclei
# --------------------------------------------------------------------------


def _seed_points(fg: np.ndarray, level: float, r: float) -> np.ndarray:
    """Scale-space maxima of the scale-normalised LoG (bool image)."""
    x = fg / np.float32(level)
    m = max(1, int(round(_NMS_Q * r)))
    resp, peak_nb = [], []
    for q in _LOG_Q:
        s = q * r
        lg = ndi.gaussian_laplace(x, s, mode="nearest")
        lg *= np.float32(-(s * s))
        resp.append(lg)
        peak_nb.append(ndi.maximum_filter(lg, size=2 * m + 1, mode="nearest"))
    peaks = np.zeros(fg.shape, dtype=bool)
    k_last = len(resp) - 1
    for k, lg in enumerate(resp):
        nb = peak_nb[k]
        if k > 0:
            nb = np.maximum(nb, peak_nb[k - 1])
        if k < k_last:
            nb = np.maximum(nb, peak_nb[k + 1])
        peaks |= (lg >= nb) & (lg > _SEED_H)
    return peaks


def _nuclei_tile(tile: np.ndarray, stats: _Stats, r: float, y0: int = 0, x0: int = 0) -> np.ndarray:
    """Segment nuclei in one (possibly padded) tile at global offset (y0, x0)."""
    ny, nx = tile.shape
    out = np.zeros(tile.shape, dtype=np.int32)
    if stats.empty or tile.size == 0:
        return out
    sigma = max(_SMOOTH_Q * r, 0.7)
    smooth = ndi.gaussian_filter(tile, sigma, mode="nearest")
    bg = _upsample(stats.coarse, stats.step, np.arange(y0, y0 + ny), np.arange(x0, x0 + nx))
    fg = smooth - bg
    del smooth, bg
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
    land += (_COMPACTNESS / r) * ndi.distance_transform_edt(markers == 0).astype(np.float32)
    lab = segmentation.watershed(land, markers, mask=mask)
    del land
    inside = lab > 0
    peak = np.full(n + 1, -np.inf, dtype=np.float32)
    np.maximum.at(peak, lab[inside], fg[inside])
    peak[0] = np.inf
    lab = np.where(fg > _ALPHA * peak[lab], lab, 0).astype(np.int32)
    lab = _largest_piece(lab)
    lab = _fill_holes(lab)
    area = math.pi * r * r
    if _MERGE_AREA > 0:
        lab = _merge_fragments(lab, fg, _MERGE_AREA * area, _MERGE_R, _MERGE_DIP)
    lab = _size_filter(lab, _MIN_AREA_Q * area, _MAX_AREA_Q * area)
    return _relabel(lab)


def segment_nuclei(
    image, pixel_size_um: float, nucleus_diameter_um: float | str = 8, *, nucleus_diameter_hint: bool = False
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


def _diameter(image, pixel_size_um, nucleus_diameter_um, hint: bool):
    """The diameter to use (um): the number given, or the estimate for "auto" or a hint."""
    if isinstance(nucleus_diameter_um, str) or hint:
        from qdquant.nucleus_size import resolve_nucleus_diameter

        return resolve_nucleus_diameter(image, pixel_size_um, nucleus_diameter_um, hint=hint)[0]
    return nucleus_diameter_um


def _radius_px(d_um: float, ps: float) -> float:
    r = d_um / ps / 2
    if r < 1.5:
        raise InputError(
            f"nucleus_diameter_um={d_um} is only {2 * r:.1f} px at pixel_size_um={ps}; need >= 3 px"
        )
    return r


# --------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------


def _membrane_radius(ps: float) -> float:
    """Scale (pixels) of the membrane statistics: ~4 um blocks."""
    return max(4.0 / ps, 2.0)


def _cells_tile(nuclei, membrane, mstats, ps, dist_px, y0=0, x0=0) -> np.ndarray:
    """Grow the nuclei of one tile into cells (see :func:`segment_cells`)."""
    nuclei = np.asarray(nuclei, dtype=np.int32)
    if dist_px <= 0 or not nuclei.any():
        return nuclei.copy()
    if membrane is None or mstats is None or mstats.empty:
        return segmentation.expand_labels(nuclei, distance=dist_px).astype(np.int32)
    dist = ndi.distance_transform_edt(nuclei == 0).astype(np.float32)
    sigma = max(_MEMBRANE_SMOOTH_UM / ps, 0.5)
    ny, nx = nuclei.shape
    mem = ndi.gaussian_filter(_as_float(membrane), sigma, mode="nearest")
    mem -= _upsample(mstats.coarse, mstats.step, np.arange(y0, y0 + ny), np.arange(x0, x0 + nx))
    # Membrane in units of its Otsu level, saturating: a ridge is a ridge
    # however bright, and noise below the background does not count.
    m = np.clip(mem / np.float32(mstats.level), 0, None)
    m = m / (1 + m)
    land = _MEMBRANE_WEIGHT * m + dist / np.float32(dist_px)
    del mem
    # The background floods too, from every pixel farther than dist_px from
    # all nuclei: a cell reaches the expansion limit where nothing stops it,
    # but the pocket beyond its own membrane (lower than the ridge) goes to
    # the background instead of the cell.
    bg = int(nuclei.max()) + 1
    markers = np.where(dist > dist_px, bg, nuclei)
    lab = segmentation.watershed(land, markers)
    lab[lab == bg] = 0
    # Cells without membrane stain around their nucleus (stroma, immune cells:
    # the stain marks epithelium) keep only a thin rim of cytoplasm instead of
    # growing to the expansion limit.
    cyto = (lab > 0) & (nuclei == 0)
    score = np.bincount(lab[cyto], weights=m[cyto], minlength=bg) / np.maximum(
        np.bincount(lab[cyto], minlength=bg), 1)
    bare = score < _BARE_LEVEL
    bare[0] = False
    if bare.any():
        rim = segmentation.expand_labels(nuclei, distance=_BARE_RIM_UM / ps)
        lab[bare[lab] & (rim != lab)] = 0
    return lab.astype(np.int32)


def segment_cells(nuclei, membrane=None, *, pixel_size_um: float, cell_expansion_um: float = 5) -> np.ndarray:
    """Grow every nucleus into its cell, by at most ``cell_expansion_um``.

    With a membrane-stain image, a watershed seeded by the nuclei floods the
    landscape ``4 m / (1 + m) + d / D`` -- ``m`` the background-corrected
    membrane stain (Gaussian sigma 0.75 um) in units of its Otsu level, ``d``
    the distance to the nearest nucleus and ``D`` the expansion distance -- so
    neighbouring cells meet on the membrane where it is stained and half-way
    between nuclei where it is not. The background, seeded at every pixel
    farther than ``D`` from all nuclei, floods the same landscape: a cell
    with a stained membrane ends on it (the pocket beyond goes to the
    background), a cell without one grows to ``D``. A cell whose cytoplasm
    then carries essentially no membrane stain (mean ``m / (1 + m)`` below
    0.05: stromal and immune cells, where the stain marks epithelium) is cut
    back to its nucleus and a 1 um rim, the thin cytoplasm such cells have,
    instead of a ``D``-wide halo. Without a membrane image, nuclei are
    expanded by ``D``
    (:func:`skimage.segmentation.expand_labels`). Either way a cell never
    takes a pixel farther than ``D`` from every nucleus, never takes another
    cell's pixels, keeps its whole nucleus, is connected where its nucleus
    is, and shares its nucleus's id.

    Parameters
    ----------
    nuclei : (M, N) array_like of int
        Nucleus labels, 0 = background (e.g. from :func:`segment_nuclei`).
    membrane : (M, N) array_like of float, optional
        Membrane-stain abundance (E-cadherin, Na/K-ATPase, pan-cytokeratin,
        or a sum of several), arbitrary units.
    pixel_size_um : float
        Pixel edge, micrometres.
    cell_expansion_um : float, optional
        Largest growth of a cell beyond its nucleus, micrometres (0 gives
        cells equal to their nuclei).

    Returns
    -------
    cells : (M, N) ndarray of int32
        Cell labels; cell ``i`` contains nucleus ``i``.

    Raises
    ------
    InputError
        If an image is not 2-D, the shapes differ, ``nuclei`` is not an
        integer label image, or a length is negative.
    """
    nuclei = np.asarray(_check_image(nuclei, "nuclei"))
    if nuclei.dtype.kind not in "biu":
        raise InputError(f"nuclei must be an integer label image, got dtype {nuclei.dtype}")
    if nuclei.size and (int(nuclei.max()) > np.iinfo(np.int32).max or int(nuclei.min()) < 0):
        raise InputError(f"nuclei ids must be in [0, 2**31 - 1], got [{nuclei.min()}, {nuclei.max()}]")
    ps, (d_um,) = _check_scale(pixel_size_um, cell_expansion_um=cell_expansion_um)
    dist_px = d_um / ps
    mstats = None
    if membrane is not None:
        membrane = _check_image(membrane, "membrane")
        if tuple(membrane.shape) != nuclei.shape:
            raise InputError(f"membrane shape {tuple(membrane.shape)} differs from nuclei shape {nuclei.shape}")
        rm = _membrane_radius(ps)
        mstats = _image_stats(membrane, rm, max(_MEMBRANE_SMOOTH_UM / ps, 0.5))
        membrane = np.asarray(membrane)
    return _cells_tile(nuclei, membrane, mstats, ps, dist_px)


# --------------------------------------------------------------------------
# Whole slides: overlapping tiles
# --------------------------------------------------------------------------


def _tile_task(nuc_tile, mem_tile, nstats, mstats, *, scratch, index, r, ps, dist_px, origin, core,
               id_base, id_stride):
    """Segment one padded tile; store the objects whose nucleus centroid is in ``core``.

    The owned objects (ids ``id_base + 1 ..``, int32, at the padded tile's
    full extent) are written to ``scratch[index]`` -- nuclei in plane 0,
    cells in plane 1 -- so that dask holds only the returned ``index``
    between this task and the blocks that read the tile back.
    """
    py0, px0 = origin
    (cy0, cy1), (cx0, cx1) = core
    nuc = _nuclei_tile(_as_float(nuc_tile), nstats, r, py0, px0)
    cells = _cells_tile(nuc, mem_tile, mstats, ps, dist_px, py0, px0)
    n = int(nuc.max())
    if n >= id_stride:  # cannot happen: objects are disjoint and >= the minimum area
        raise RuntimeError(f"tile at {origin} has {n} nuclei, more than its id range {id_stride}")
    if n:
        yy, xx = np.nonzero(nuc)
        lab = nuc[yy, xx]
        area = np.bincount(lab, minlength=n + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cy = np.floor(np.bincount(lab, yy, n + 1) / area) + py0
            cx = np.floor(np.bincount(lab, xx, n + 1) / area) + px0
        own = (area > 0) & (cy >= cy0) & (cy < cy1) & (cx >= cx0) & (cx < cx1)
        own[0] = False
        lut = np.zeros(n + 1, dtype=np.int32)
        ids = np.flatnonzero(own)
        lut[ids] = id_base + np.arange(1, len(ids) + 1, dtype=np.int64)
        h, w = nuc.shape
        scratch[index + (slice(None), slice(0, h), slice(0, w))] = np.stack([lut[nuc], lut[cells]])
    return index


def _assemble_task(core, scratch, tiles, *written):
    """Compose one output block from the owned objects of the tiles around it.

    ``tiles`` lists ``(index, origin, shape)`` of the block's own tile first,
    then its neighbours in raster order; each is read back from ``scratch``
    (only the part over the block; ``written`` are the tile tasks' results,
    there to order this task after them). A pixel claimed by several tiles
    goes to the first (the own tile, then raster order), cell and nucleus
    together, so a nucleus pixel always lies in the cell of its id.
    """
    (y0, y1), (x0, x1) = core
    nuc_out = np.zeros((y1 - y0, x1 - x0), dtype=np.int32)
    cell_out = np.zeros_like(nuc_out)
    for index, (oy, ox), (h, w) in tiles:
        ty0, tx0 = max(y0, oy), max(x0, ox)
        ty1, tx1 = min(y1, oy + h), min(x1, ox + w)
        if ty0 >= ty1 or tx0 >= tx1:
            continue
        nuc, cells = scratch[index + (slice(None), slice(ty0 - oy, ty1 - oy), slice(tx0 - ox, tx1 - ox))]
        dst = (slice(ty0 - y0, ty1 - y0), slice(tx0 - x0, tx1 - x0))
        free = (cell_out[dst] == 0) & (cells > 0)
        cell_out[dst] = np.where(free, cells, cell_out[dst])
        nuc_out[dst] = np.where(free, nuc, nuc_out[dst])
    return nuc_out, cell_out


def segment_chunked(
    nuclear,
    membrane=None,
    *,
    pixel_size_um: float,
    nucleus_diameter_um: float | str = 8,
    nucleus_diameter_hint: bool = False,
    cell_expansion_um: float = 5,
    chunk_size: int = 2048,
    overlap_px: int | None = None,
    scratch=None,
):
    """Segment nuclei and cells of a whole slide tile by tile, lazily.

    The slide is cut into ``chunk_size`` x ``chunk_size`` tiles; each is
    segmented (:func:`segment_nuclei` then :func:`segment_cells`) with
    ``overlap_px`` pixels of context on every side, and keeps only the
    objects whose nucleus centroid falls in its own tile, at their full
    extent (which may reach into the neighbouring tiles). Each output block
    is then composed from the kept objects of its tile and of its eight
    neighbours; where two claim a pixel, the block's own tile wins, then the
    neighbours in raster order. Global statistics (background surface, Otsu
    level, noise) come from one lazy pass of block reductions that do not
    depend on the tiling, so with enough overlap the result matches the
    unchunked one object for object.

    Parameters
    ----------
    nuclear : (M, N) dask or NumPy array
        Nuclear-stain abundance.
    membrane : (M, N) dask or NumPy array, optional
        Membrane-stain abundance (see :func:`segment_cells`).
    pixel_size_um : float
        Pixel edge, micrometres.
    nucleus_diameter_um, nucleus_diameter_hint, cell_expansion_um : optional
        As in :func:`segment_nuclei` and :func:`segment_cells`, micrometres.
        An estimated diameter is estimated once, from a few windows of the
        whole slide, before the tiles are cut, so all tiles use the same.
    chunk_size : int, optional
        Tile edge and output chunk edge, pixels. Inputs chunked otherwise
        are rechunked (reading is cheapest when it is a multiple of the
        input's chunk edge).
    overlap_px : int, optional
        Context on each side of a tile, pixels; at most ``chunk_size``.
        Default: two cell diameters, ``ceil(2 * (nucleus_diameter_um + 2 *
        cell_expansion_um) / pixel_size_um)``, capped at ``chunk_size``.
        An object whose nucleus is larger than the overlap may be cut at a
        tile edge.
    scratch : str, path or zarr store, optional
        Where the tiles' labels wait for their neighbours (an empty or
        absent directory; it must outlive the computation of the results,
        and may be deleted after). Default: in memory, which grows with
        the slide; whole slides should pass a directory on local disk.

    Returns
    -------
    nuclei, cells : (M, N) dask arrays of int32, chunks (chunk_size, chunk_size)
        Lazy label images; a cell and its nucleus share the id. Ids are
        unique over the slide but not consecutive: tile ``k`` (raster order)
        uses ``k * stride + 1 ..``, with ``stride`` the largest number of
        nuclei a padded tile can hold at the minimum nucleus area.

    Raises
    ------
    InputError
        For a non-2-D image, differing shapes, bad lengths, an overlap
        outside ``[0, chunk_size]`` or a slide too large for int32 ids.

    Notes
    -----
    Memory does not grow with the slide: a tile task holds its padded tile
    (``(chunk_size + 2 * overlap_px)**2`` pixels) as float32 and about a
    dozen same-sized work arrays (~60 bytes per pixel, ~300 MB at the
    defaults) and writes its labels to ``scratch``; a block task reads back
    only the parts of its nine tiles that cover it (about 16 bytes per block
    pixel); dask runs one task per worker thread at a time. Computing
    ``nuclei`` and ``cells`` separately segments every tile twice: compute or
    store them together (``dask.compute(nuclei, cells)``,
    ``dask.array.store``). The whole-slide statistics need one extra read of
    the slide at block-mean resolution, within the same graph.
    """
    import dask
    import dask.array as da

    nuclear = _check_image(nuclear, "nuclear")
    shape = tuple(int(v) for v in nuclear.shape)
    if membrane is not None:
        membrane = _check_image(membrane, "membrane")
        if tuple(membrane.shape) != shape:
            raise InputError(f"membrane shape {tuple(membrane.shape)} differs from nuclear shape {shape}")
    _check_scale(pixel_size_um, cell_expansion_um=cell_expansion_um)
    d_um = _diameter(nuclear, pixel_size_um, nucleus_diameter_um, nucleus_diameter_hint)
    ps, (d_um, e_um) = _check_scale(
        pixel_size_um, nucleus_diameter_um=d_um, cell_expansion_um=cell_expansion_um
    )
    r = _radius_px(d_um, ps)
    dist_px = e_um / ps
    try:
        chunk_size = int(chunk_size)
    except (TypeError, ValueError):
        raise InputError(f"chunk_size must be an integer, got {chunk_size!r}") from None
    if chunk_size < 16:
        raise InputError(f"chunk_size must be >= 16 pixels, got {chunk_size}")
    if overlap_px is None:
        overlap_px = min(int(math.ceil(2 * (d_um + 2 * e_um) / ps)), chunk_size)
    try:
        overlap_px = int(overlap_px)
    except (TypeError, ValueError):
        raise InputError(f"overlap_px must be an integer, got {overlap_px!r}") from None
    if not 0 <= overlap_px <= chunk_size:
        raise InputError(f"overlap_px must be in [0, chunk_size={chunk_size}], got {overlap_px}")

    def as_dask(a):
        if _is_dask(a):
            return a.rechunk((chunk_size, chunk_size))
        return da.from_array(np.asarray(a), chunks=(chunk_size, chunk_size))

    nuclear = as_dask(nuclear)
    membrane = as_dask(membrane) if membrane is not None else None
    nstats = _image_stats_lazy(nuclear, r, max(_SMOOTH_Q * r, 0.7), f"nuclear image of shape {shape}")
    mstats = None
    if membrane is not None:
        mstats = _image_stats_lazy(membrane, _membrane_radius(ps), max(_MEMBRANE_SMOOTH_UM / ps, 0.5), None)

    m, n = shape
    ty = [(y, min(y + chunk_size, m)) for y in range(0, m, chunk_size)]
    tx = [(x, min(x + chunk_size, n)) for x in range(0, n, chunk_size)]
    pad = (min(chunk_size + 2 * overlap_px, m), min(chunk_size + 2 * overlap_px, n))
    padded_area = pad[0] * pad[1]
    stride = int(padded_area // max(_MIN_AREA_Q * math.pi * r * r, 1.0)) + 1
    if len(ty) * len(tx) * stride >= 2**31 - 1:
        raise InputError(
            f"slide of shape {shape} needs more than int32 ids with {len(ty) * len(tx)} tiles "
            f"of up to {stride} nuclei; use a larger nucleus_diameter_um or pixel_size_um"
        )
    scratch = zarr.open_array(
        zarr.storage.MemoryStore() if scratch is None else scratch, mode="w",
        shape=(len(ty), len(tx), 2, *pad), chunks=(1, 1, 2, *pad), dtype=np.int32, fill_value=0,
    )
    task = dask.delayed(_tile_task, pure=True)
    tiles = {}
    for i, (y0, y1) in enumerate(ty):
        for j, (x0, x1) in enumerate(tx):
            py0, py1 = max(0, y0 - overlap_px), min(m, y1 + overlap_px)
            px0, px1 = max(0, x0 - overlap_px), min(n, x1 + overlap_px)
            nt = nuclear[py0:py1, px0:px1]
            mt = membrane[py0:py1, px0:px1] if membrane is not None else None
            k = i * len(tx) + j
            written = task(
                nt, mt, nstats, mstats, scratch=scratch, index=(i, j), r=r, ps=ps, dist_px=dist_px,
                origin=(py0, px0), core=((y0, y1), (x0, x1)), id_base=k * stride, id_stride=stride,
            )
            tiles[i, j] = ((i, j), (py0, px0), (py1 - py0, px1 - px0)), written
    assemble = dask.delayed(_assemble_task, pure=True, nout=2)
    nuc_rows, cell_rows = [], []
    for i, (y0, y1) in enumerate(ty):
        nuc_row, cell_row = [], []
        for j, (x0, x1) in enumerate(tx):
            order = [(i, j)] + [
                (i + di, j + dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)
                if (di or dj) and (i + di, j + dj) in tiles
            ]
            nb, cb = assemble(
                ((y0, y1), (x0, x1)), scratch, [tiles[key][0] for key in order], *[tiles[key][1] for key in order]
            )
            nuc_row.append(da.from_delayed(nb, shape=(y1 - y0, x1 - x0), dtype=np.int32))
            cell_row.append(da.from_delayed(cb, shape=(y1 - y0, x1 - x0), dtype=np.int32))
        nuc_rows.append(nuc_row)
        cell_rows.append(cell_row)
    return da.block(nuc_rows), da.block(cell_rows)
