"""Field-of-view shading: estimated from the slide itself, divided out before unmixing.

Slide scanners and multispectral microscopes image a slide as a mosaic of
fields of view (FOVs); each FOV is darker towards its corners (vignetting),
and what a flat-field calibration leaves of it repeats with the FOV period.
As in BaSiC (Peng et al. 2017, Nat Commun 8:14836), the profile is estimated
from the many FOVs of the slide: they share it, while the tissue under them
differs. Here the profile is a quadratic surface of the position in the
FOV, fitted to the logarithm of the nuclear stain's brightness in small
blocks (:func:`nuclear_brightness`: nuclei are stained much alike all over
a section, unlike the tissue's total intensity), after removing each FOV's
own level, so tissue differences between FOVs do not enter. The FOV size is
found from the data: the period whose profile best predicts regions it was
not fitted on. The tissue's own brightness still varies on the scale of a
field, so the estimate needs many FOVs (a whole slide has hundreds); with
too few, or no profile that predicts held-out data, nothing is applied.

Shading multiplies the signal, not the camera's dark offset, and is taken
as the same in every band. Vignetting only loses light, so the profile is
scaled to 1 at its brightest point: corrected counts are what the FOV
centre would have recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import dask.array as da
import numpy as np

from qdquant.errors import InputError

try:  # fused single passes over the cube; without numba, numpy does the same in several
    import numba as _numba
except Exception:  # pragma: no cover - numba is a dependency
    _numba = None

log = logging.getLogger(__name__)

#: Degree of the polynomial shading surface (higher orders fit the tissue, not the shading).
ORDER = 2
#: Edge of the blocks the shading is fitted on, pixels.
BIN_PX = 16
#: Held-out explained variance (of within-FOV log intensity) below which no shading is found.
MIN_EXPLAINED = 0.01
#: Share of a pixel's signal from the nuclear stain for it to count as nuclear.
MIN_NUCLEAR_SHARE = 0.75
#: Nuclear pixels a block needs for its brightness to count.
MIN_NUCLEAR_PX = 48
#: Fields of view a slide must hold along each axis for their size to be searched.
MIN_FOVS_PER_AXIS = 4
#: Smallest and largest FOV edge tried, pixels.
MIN_FOV_PX = 64
MAX_FOV_PX = 2048
#: Edge of the fixed regions whose own tissue level is removed when FOV sizes are compared, pixels.
REGION_PX = 512
#: Pixels the dark offset is estimated on (its 1st percentile: about 650 pixels below it).
OFFSET_PIXELS = 65_536
#: Blocks the FOV size is searched on (a random subset beyond this many).
MAX_DETECTION_BLOCKS = 40_000
#: Pixels a slide's shading is estimated on (268 Mpx: 16384², 256 FOVs of 1024 px); a larger
#: slide is read on evenly spaced chunks of that many pixels, not decoded whole once more.
#: (On a 4096² slide of 192-px FOVs half its pixels gave the shading as well as all of them,
#: a quarter less well, an eighth none.)
MAX_SHADING_PIXELS = 1 << 28
#: Edge of the regions a dask slide's block brightness is computed in (and, past
#: MAX_SHADING_PIXELS, sampled on), pixels: the default chunk edge, so that a slide chunked
#: by default is read chunk by chunk.
GRID_PX = 2048


@dataclass(frozen=True)
class Shading:
    """A field-of-view shading model.

    Attributes
    ----------
    fov_px : (int, int)
        FOV size (Y, X), pixels; the FOV grid starts at pixel (0, 0).
    profile : (fov_px[0], fov_px[1]) float32 array
        Relative sensitivity over one FOV, maximum 1.
    explained : float
        Fraction of the within-FOV variance of the log intensity that the
        profile explains on FOVs it was not fitted on (0 when none found).
    """

    fov_px: tuple[int, int]
    profile: np.ndarray

    explained: float = 0.0

    @property
    def is_flat(self) -> bool:
        return bool(self.profile.min() >= 1.0)


def _poly_terms(u: np.ndarray, v: np.ndarray | None, order: int = ORDER) -> np.ndarray:
    """Monomials of (u, v) in [-0.5, 0.5) up to total degree ``order``, without the constant."""
    cols = []
    for total in range(1, order + 1):
        for i in range(total + 1):
            j = total - i
            if v is None and j:
                continue
            cols.append(u**i * (1.0 if v is None else v**j))
    return np.stack(cols, axis=-1)


def _demean(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``values`` minus the mean of its group (groups: small non-negative ints)."""
    sums = np.bincount(groups, values)
    counts = np.bincount(groups)
    return values - (sums / np.maximum(counts, 1))[groups]


def _fit(terms: np.ndarray, values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of ``values`` on ``terms``, both demeaned per group."""
    t = np.stack([_demean(terms[:, i], groups) for i in range(terms.shape[1])], axis=1)
    coef, *_ = np.linalg.lstsq(t, _demean(values, groups), rcond=None)
    return coef


def _two_fold_r2(folds, yy) -> np.ndarray:
    """Mean held-out R² of each fold's least-squares fit on the other fold.

    ``folds``: per fold, the normal equations ``G`` (P, T, T) and ``r``
    (P, T) of P candidate fits; ``yy``: per fold, the summed squared
    values. A fold's error under coefficients ``c`` is ``|y|² - 2 c·r + c G c``.
    """
    scores = np.zeros(folds[0][1].shape[0])
    for (g_train, r_train), (g_test, r_test), yy_test in zip(folds, folds[::-1], yy[::-1]):
        if yy_test <= 0:
            continue
        coef = np.einsum("ptu,pu->pt", np.linalg.pinv(g_train), r_train)
        sse = yy_test - 2 * np.einsum("pt,pt->p", coef, r_test) + np.einsum("pt,ptu,pu->p", coef, g_test, coef)
        scores += 0.5 * (1.0 - sse / yy_test)
    return scores


def _fold_scores(terms: np.ndarray, weights: np.ndarray, ysum: np.ndarray, yy: tuple[float, float],
                 group: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Two-fold held-out R² of within-group least-squares fits, for many term sets at once.

    ``terms`` (P, T, U): P candidate term sets at U distinct points, each
    standing for ``weights`` (U,) blocks whose demeaned values sum to
    ``ysum`` (U,); ``group`` (U,): the group each point's level is removed
    in, wholly inside one fold; ``fold`` (U,) bool, ``yy``: the squared
    demeaned values summed per fold (True, False). Each fold's least
    squares reduces to sums over its points: the normal equations ``G``
    (P, T, T) and ``r`` (P, T); the other fold's error is
    ``|y|² - 2 c·r + c G c``.
    """
    from scipy import sparse

    members = sparse.csr_matrix((weights, (group, np.arange(group.size))), shape=(group.max() + 1, group.size))
    flat = terms.reshape(-1, group.size)
    means = (members @ flat.T).T / np.maximum(members @ np.ones(group.size), 1e-300)  # (P T, groups)
    d = (flat - means[:, group]).reshape(terms.shape)
    folds = []
    for part in (fold, ~fold):
        dp = d[..., part]
        folds.append(((dp * weights[part]) @ dp.swapaxes(1, 2), dp @ ysum[part]))
    return _two_fold_r2(folds, yy)


def _period_scores(coords: np.ndarray, values: np.ndarray, periods: np.ndarray, region: int) -> np.ndarray:
    """Held-out R² of a 1-D within-FOV profile for each period (all periods at once).

    Tissue level is removed per fixed ``region`` strip and the strips are
    split even/odd (both ways), the same for every period, so the scores of
    different periods compare the same data. A strip lies wholly in one
    fold, so demeaning per strip before splitting is demeaning per fold.
    Blocks at the same coordinate share their terms for every period, so
    the sums run over the distinct coordinates (a block row or column each).
    """
    strip = (coords // region).astype(np.intp)
    if strip.max() < 1:
        return np.zeros(len(periods))
    y = _demean(values, strip)
    even = strip % 2 == 0
    yy = (float(y[even] @ y[even]), float(y[~even] @ y[~even]))
    points, where = np.unique(coords, return_inverse=True)
    weights = np.bincount(where).astype(np.float64)
    ysum = np.bincount(where, y)
    periods = np.asarray(periods, dtype=np.float64)[:, None]
    terms = np.moveaxis(_poly_terms((points[None, :] % periods) / periods - 0.5, None), -1, 1)  # (P, T, U)
    group = (points // region).astype(np.intp)
    return _fold_scores(terms, weights, ysum, yy, group, group % 2 == 0)


def _period_1d(coords: np.ndarray, values: np.ndarray, length: int) -> tuple[int, float]:
    """The FOV period along one axis that best predicts held-out FOVs (0 when none explains enough).

    Every period (pixels) from :data:`MIN_FOV_PX` to a quarter of the slide
    (:data:`MIN_FOVS_PER_AXIS`; at most :data:`MAX_FOV_PX`) is tried: over
    many FOVs, a period off by one pixel already puts the last FOVs out of
    phase. Fewer FOVs than that do not tell a shading from the tissue.
    """
    if coords.size > MAX_DETECTION_BLOCKS:  # plenty to find a period on
        pick = np.random.default_rng(0).choice(coords.size, MAX_DETECTION_BLOCKS, replace=False)
        coords, values = coords[pick], values[pick]
    periods = np.arange(MIN_FOV_PX, min(length // MIN_FOVS_PER_AXIS, MAX_FOV_PX) + 1)
    if periods.size == 0:
        return 0, 0.0
    scores = _period_scores(coords, values, periods, min(REGION_PX, length // 2))
    best = int(np.argmax(scores))
    if scores[best] < MIN_EXPLAINED:
        return 0, float(scores[best])
    return int(periods[best]), float(scores[best])


def _fov_scores(ys, xs, values, fovs, region) -> np.ndarray:
    """Held-out explained variance of the 2-D profile of each FOV size in ``fovs`` ((F, 2), pixels).

    The score of :func:`_fov_fit`, for many sizes at once: every block
    kept, the level of fixed ``region``² squares removed, the squares split
    as a checkerboard, so that every size is scored on the same data.

    The fits' normal equations are sums over blocks of products of the
    terms ``u^p v^q`` (``u`` from a block's row and the FOV height, ``v``
    from its column and the FOV width) and of the values: per square, the
    sums over its rows of ``u^p`` times the blocks (or values) in each
    column, then over its columns of ``v^q``. So a size costs
    O(rows + columns), not O(blocks), and all the sizes' heights and widths
    are done together.
    """
    fovs = np.asarray(fovs, dtype=np.float64).reshape(-1, 2)
    ry, rx = (ys // region).astype(np.intp), (xs // region).astype(np.intp)
    y = _demean(values, ry * (rx.max() + 1) + rx)
    checker = (ry + rx) % 2 == 0
    yy = (float(y[checker] @ y[checker]), float(y[~checker] @ y[~checker]))
    rows, iy = np.unique(ys, return_inverse=True)
    cols, ix = np.unique(xs, return_inverse=True)
    cell = iy * cols.size + ix
    count = np.bincount(cell, minlength=rows.size * cols.size).reshape(rows.size, cols.size).astype(np.float64)
    ysum = np.bincount(cell, y, minlength=rows.size * cols.size).reshape(rows.size, cols.size)
    heights, fy = np.unique(fovs[:, 0], return_inverse=True)
    widths, fx = np.unique(fovs[:, 1], return_inverse=True)
    powers = np.arange(2 * ORDER + 1)[:, None, None]
    up = (((rows % heights[:, None]) / heights[:, None] - 0.5)[None]) ** powers  # (n, heights, rows)
    vp = (((cols % widths[:, None]) / widths[:, None] - 0.5)[None]) ** powers  # (n, widths, cols)
    row_band, col_band = (rows // region).astype(np.intp), (cols // region).astype(np.intp)
    col_starts = np.flatnonzero(np.r_[True, col_band[1:] != col_band[:-1]])
    # moments per square: sums of u^p v^q over its blocks (count) and over its values (ysum),
    # (n, heights, n, widths, col bands) for each row band
    moments, value_moments, parity = [], [], []
    for band in np.unique(row_band):
        in_band = row_band == band
        for grid, out in ((count, moments), (ysum, value_moments)):
            w = np.einsum("phr,rc->phc", up[:, :, in_band], grid[in_band])
            out.append(np.add.reduceat(w[:, :, None, None, :] * vp[None, None], col_starts, axis=-1))
        parity.append((band + col_band[col_starts]) % 2 == 0)
    m = np.concatenate(moments, axis=-1)[:, fy, :, fx]  # (F, n, n, squares): the sizes asked for
    my = np.concatenate(value_moments, axis=-1)[:, fy, :, fx]
    in_checker = np.concatenate(parity)
    expo = np.array([(i, total - i) for total in range(1, ORDER + 1) for i in range(total + 1)])  # _poly_terms'
    n = m[:, 0, 0]  # (F, squares) blocks per square
    means = m[:, expo[:, 0], expo[:, 1]] / np.maximum(n, 1e-300)[:, None]  # (F, T, squares)
    second = m[:, expo[:, 0, None] + expo[None, :, 0], expo[:, 1, None] + expo[None, :, 1]]  # (F, T, T, sq.)
    gram = second - n[:, None, None] * means[:, :, None] * means[:, None, :]
    rhs = my[:, expo[:, 0], expo[:, 1]] - means * my[:, None, 0, 0]
    folds = [(gram[..., part].sum(axis=-1), rhs[..., part].sum(axis=-1)) for part in (in_checker, ~in_checker)]
    return _two_fold_r2(folds, yy)


def _fov_fit(ys, xs, values, fov_px, bin_px, region=None):
    """Surface coefficients for FOVs of ``fov_px``, and their held-out explained variance (2-D).

    The fit removes each FOV's own level and leaves out blocks that straddle
    an FOV border. The score (for comparing FOV sizes) keeps every block and
    removes the level of fixed ``region``² squares instead, split as a
    checkerboard, so that it compares every size on the same data.
    """
    py, px = fov_px
    terms = _poly_terms((ys % py) / py - 0.5, (xs % px) / px - 0.5)
    half = bin_px / 2
    inside = ((ys % py) >= half) & ((ys % py) < py - half) & ((xs % px) >= half) & ((xs % px) < px - half)
    ty, tx = (ys // py).astype(np.intp), (xs // px).astype(np.intp)
    fov = ty * (tx.max() + 1) + tx
    coef = _fit(terms[inside], values[inside], fov[inside])
    explained = _fov_scores(ys, xs, values, [fov_px], max(py, px) if region is None else region)[0]
    return coef, explained


if _numba is not None:

    @_numba.njit(cache=True, nogil=True, fastmath=True)
    def _nb_nuclear_values(x, weights, weighted_offset, total_offset, scale, min_share, bin_px, values, counts):
        """:func:`_nuclear_values` in one read of ``x``, a row of pixels at a time."""
        c, h, w = x.shape
        weighted = np.empty(w, np.float32)
        total = np.empty(w, np.float32)
        for i in range(h):
            for j in range(w):
                weighted[j] = 0.0
                total[j] = 0.0
            for b in range(c):
                wb = weights[b]
                for j in range(w):
                    v = np.float32(x[b, i, j])
                    weighted[j] += wb * v
                    total[j] += v
            bi, r0 = i // bin_px, (i % bin_px) * bin_px
            for j in range(w):
                nuc = weighted[j] - weighted_offset
                tot = max(total[j] - total_offset, np.float32(1e-6))
                bj = j // bin_px
                if nuc > 0 and nuc * scale >= min_share * tot:
                    values[bi, bj, r0 + j % bin_px] = nuc
                    counts[bi, bj] += 1
                else:
                    values[bi, bj, r0 + j % bin_px] = np.inf


def _nuclear_values(x, weights, weighted_offset, total_offset, scale, min_share, bin_px, use_numba):
    """The nuclear pixels of the ``bin_px``² blocks of ``x`` (C, hb bin_px, wb bin_px).

    Per pixel, the nuclear abundance ``weights . x - weighted_offset`` and
    the signal ``sum(x) - total_offset`` (float32); a pixel is nuclear when
    its abundance is positive and ``scale`` times it is at least
    ``min_share`` of the signal. Returns each block's pixels' abundances,
    inf where not nuclear, (hb, wb, bin_px²) float32, and its nuclear
    pixels, (hb, wb) int64. ``use_numba``: in one compiled pass (else numpy, the same float32 sums).
    """
    c, h, w = x.shape
    hb, wb = h // bin_px, w // bin_px
    f4 = np.float32
    if use_numba:
        values, counts = np.empty((hb, wb, bin_px * bin_px), f4), np.zeros((hb, wb), np.int64)
        _nb_nuclear_values(x, weights, f4(weighted_offset), f4(total_offset), f4(scale), f4(min_share), bin_px,
                           values, counts)
        return values, counts
    y = x.astype(f4).reshape(c, -1)
    nuc = (weights @ y).reshape(h, w) - f4(weighted_offset)
    total = np.maximum(y.sum(axis=0).reshape(h, w) - f4(total_offset), f4(1e-6))
    nuclear = (nuc > 0) & (nuc * f4(scale) >= f4(min_share) * total)
    tiles = np.where(nuclear, nuc, np.inf).reshape(hb, bin_px, wb, bin_px).transpose(0, 2, 1, 3)
    return tiles.reshape(hb, wb, -1), nuclear.reshape(hb, bin_px, wb, bin_px).sum(axis=(1, 3))


def nuclear_brightness(
    cube: np.ndarray | da.Array,
    weights: np.ndarray,
    spectrum: np.ndarray,
    offset: np.ndarray,
    *,
    bin_px: int = BIN_PX,
    min_share: float = MIN_NUCLEAR_SHARE,
    min_pixels: int = MIN_NUCLEAR_PX,
    max_pixels: int | None = MAX_SHADING_PIXELS,
    engine: str = "auto",
) -> np.ndarray:
    """The brightness of the nuclear stain in ``bin_px``² blocks of a slide.

    Per pixel, the nuclear stain's abundance by plain least squares
    (``weights`` · the offset-removed spectrum: one row of the library's
    pseudo-inverse) and its share of the pixel's signal; per block, the
    median abundance over its nuclear pixels (share >= ``min_share``).
    Nuclei are stained to much the same level all over a section, unlike
    the tissue's total intensity (nests, stroma, glass), so this is the
    statistic the shading is fitted on. Pixels are picked by a ratio, which
    shading does not change: picking them by brightness would keep only the
    brightest nuclei in the dark corners of a field and hide its shading.

    Parameters
    ----------
    cube : (C, Y, X) numpy or dask array
        Camera counts; a dask cube is read once, chunk by chunk.
    weights : (C,) array
        The nuclear stain's row of the library's pseudo-inverse.
    spectrum : (C,) array
        The nuclear stain's spectrum (library units).
    offset : (C,) array
        Dark offset per band, counts.
    bin_px : int
        Block edge, pixels. Blocks lie on the slide's own grid (from pixel
        0): a dask cube is read in regions of :data:`GRID_PX` rounded to a
        multiple of ``bin_px``, whatever its chunks, so only the slide's
        last, partial row and column of blocks are left out.
    min_share : float
        Share of a pixel's signal the nuclear stain must have.
    min_pixels : int
        Nuclear pixels a block needs.
    max_pixels : int or None
        A dask cube of more pixels is read on evenly spaced regions (of
        that grid) of about this many pixels in all (as BaSiC fits a subset
        of a mosaic's fields); the blocks of the others are NaN. None:
        every region.
    engine : {"auto", "numpy", "numba"}
        The per-pixel pass: one compiled read of the cube ("numba"), or
        numpy; "auto" (default): numba when it imports.

    Returns
    -------
    (Y // bin_px, X // bin_px) float64 array
        Block brightness, abundance units; NaN where a block has too few
        nuclear pixels.
    """
    from qdquant.unmixing.fit import resolve_engine

    use_numba = resolve_engine(engine) == "numba" and _numba is not None
    weights = np.asarray(weights, dtype=np.float32)
    offset = np.asarray(offset, dtype=np.float64)
    scale = float(np.sum(spectrum))  # signal of one abundance unit of pure stain
    # the offset is subtracted from the two sums, not from every band
    weighted_offset, total_offset = float(weights.astype(np.float64) @ offset), float(offset.sum())

    def block(x):
        _, h, w = x.shape
        hb, wb = h // bin_px, w // bin_px
        out = np.full((-(-h // bin_px), -(-w // bin_px)), np.nan)
        if not (hb and wb):
            return out
        tiles, n = _nuclear_values(x[:, : hb * bin_px, : wb * bin_px], weights, weighted_offset, total_offset,
                                   scale, min_share, bin_px, use_numba)
        # the median of each block's nuclear pixels: sorted, the others (inf) last
        tiles.sort(axis=2)
        lo = np.take_along_axis(tiles, (np.maximum(n - 1, 0) // 2)[..., None], axis=2)[..., 0]
        hi = np.take_along_axis(tiles, (n // 2)[..., None], axis=2)[..., 0]
        out[:hb, :wb] = np.where(n >= min_pixels, 0.5 * (lo.astype(np.float64) + hi), np.nan)
        return out

    if isinstance(cube, da.Array):
        # a fixed grid, not the cube's chunks: the same blocks and regions whatever chunk_size is
        grid = bin_px * max(1, round(GRID_PX / bin_px))
        c = cube.rechunk({0: -1, 1: grid, 2: grid})
        chunks = tuple(tuple(-(-n // bin_px) for n in axis) for axis in c.chunks[1:])
        lazy = c.map_blocks(block, chunks=chunks, drop_axis=0, dtype=np.float64)
        nby, nbx = lazy.numblocks
        n_read = nby * nbx if max_pixels is None else max(1, -(-int(max_pixels) * nby * nbx // (c.shape[1] * c.shape[2])))
        if n_read >= nby * nbx:
            coarse = lazy.compute()
        else:  # evenly spaced chunks, the rest NaN (no data)
            from qdquant.unmixing import evenly_spaced

            picks = evenly_spaced(nby * nbx, n_read)
            coarse = np.full(lazy.shape, np.nan)
            starts = [np.r_[0, np.cumsum(axis)] for axis in lazy.chunks]
            for p, part in zip(picks, da.compute(*[lazy.blocks[p // nbx, p % nbx] for p in picks])):
                by, bx = p // nbx, p % nbx
                coarse[starts[0][by]:starts[0][by + 1], starts[1][bx]:starts[1][bx + 1]] = part
    else:
        coarse = block(np.asarray(cube))
    return coarse[: cube.shape[1] // bin_px, : cube.shape[2] // bin_px]


def estimate_shading(
    brightness: np.ndarray,
    *,
    fov_px: tuple[int, int] | None = None,
    bin_px: int = BIN_PX,
) -> Shading:
    """Estimate the field-of-view shading of a slide from block brightness.

    Parameters
    ----------
    brightness : (Y // bin_px, X // bin_px) array
        A statistic of each block whose expectation is the same all over
        the tissue but for the shading (:func:`nuclear_brightness`); NaN or
        <= 0 where there is none.
    fov_px : (int, int), optional
        FOV size (Y, X), pixels, when known; default: found from the data
        (every period from 64 pixels to a quarter of the slide, at most
        2048: a slide with fewer than 4 FOVs along an axis gets none).
    bin_px : int
        Block edge of ``brightness``, pixels.

    Returns
    -------
    Shading
        Flat (all ones) when no period explains at least
        :data:`MIN_EXPLAINED` of the held-out within-FOV variance.
    """
    brightness = np.asarray(brightness, dtype=np.float64)
    if brightness.ndim != 2:
        raise InputError(f"brightness must be 2-D, got shape {brightness.shape}")
    hc, wc = brightness.shape
    h, w = hc * bin_px, wc * bin_px
    flat = Shading((max(h, 1), max(w, 1)), np.ones((max(h, 1), max(w, 1)), np.float32))
    valid = np.isfinite(brightness) & (brightness > 0)
    if valid.sum() < 64:
        log.warning("illumination: too few blocks with a nucleus (%d) to estimate shading; none applied",
                    valid.sum())
        return flat
    yc, xc = np.nonzero(valid)
    values = np.log(brightness[yc, xc])
    ys, xs = (yc + 0.5) * bin_px - 0.5, (xc + 0.5) * bin_px - 0.5  # block centres, pixels

    if fov_px is None:
        py, sy = _period_1d(ys, values, h)
        px, sx = _period_1d(xs, values, w)
        if not (py and px):
            log.warning("illumination: no field-of-view shading found (held-out explained variance "
                        "Y %.3f, X %.3f); none applied", sy, sx)
            return flat
        fov_px = (py, px)
        # the 1-D searches see each axis through the other's noise: settle both together
        region = min(REGION_PX, h // 2, w // 2)
        sizes = [(a, b) for a in range(py - 3, py + 4) for b in range(px - 3, px + 4)]
        fov_px = sizes[int(np.argmax(_fov_scores(ys, xs, values, sizes, region)))]
    py, px = (int(v) for v in fov_px)
    if py < 1 or px < 1:
        raise InputError(f"fov_px must be positive, got {fov_px}")
    coef, explained = _fov_fit(ys, xs, values, (py, px), bin_px, min(REGION_PX, h // 2, w // 2))
    if not explained >= MIN_EXPLAINED:  # what the profile would explain is noise: leave the slide as it is
        log.warning("illumination: a %d x %d px FOV profile explains %.3f of held-out variance (< %.2f); "
                    "none applied", py, px, explained, MIN_EXPLAINED)
        return flat
    gy, gx = np.meshgrid(np.arange(py) / py - 0.5, np.arange(px) / px - 0.5, indexing="ij")
    surface = (_poly_terms(gy.ravel(), gx.ravel()) @ coef).reshape(py, px)
    profile = np.exp(surface - surface.max()).astype(np.float32)
    log.info("illumination: FOV %d x %d px, darkest point at %.0f %% of the brightest, "
             "held-out explained variance %.3f", py, px, 100 * profile.min(), explained)
    return Shading((py, px), profile, float(explained))


def estimate_slide_shading(cube, spectra: np.ndarray, nuclear: int, *, offset: np.ndarray | None = None,
                           max_pixels: int | None = MAX_SHADING_PIXELS) -> tuple[Shading, np.ndarray, np.ndarray]:
    """Shading of a (C, Y, X) slide from its nuclear stain (endmember ``nuclear`` of ``spectra``, (C, K)).

    Returns the :class:`Shading`, the block brightness it was fitted on
    (:func:`nuclear_brightness`, on at most about ``max_pixels`` pixels of
    a dask cube) and the dark offset per band (counts), which
    :func:`correct_shading` keeps unshaded: ``offset`` when given, else
    estimated on :data:`OFFSET_PIXELS` pixels of the cube.
    """
    from qdquant.unmixing import estimate_offset

    if offset is None:
        offset = estimate_offset(cube, max_pixels=OFFSET_PIXELS)
    brightness = nuclear_brightness(cube, np.linalg.pinv(spectra)[nuclear], spectra[:, nuclear], offset,
                                    max_pixels=max_pixels)
    return estimate_shading(brightness), brightness, offset


def shading_field(shading: Shading, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """The shading profile tiled over the rows ``y0:y1`` and columns ``x0:x1`` of the slide."""
    py, px = shading.fov_px
    return shading.profile[np.arange(y0, y1)[:, None] % py, np.arange(x0, x1)[None, :] % px]


def inverse_field(shading: Shading, chunks) -> da.Array:
    """The gain that undoes ``shading`` over a slide of (Y, X) ``chunks`` (dask's tuples): 1 / profile, lazy."""

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return (1.0 / shading_field(shading, y0, y1, x0, x1)).astype(np.float32)

    return da.map_blocks(block, chunks=chunks, dtype=np.float32, meta=np.empty((0, 0), np.float32))


def correct_shading(cube: da.Array, shading: Shading, offset: np.ndarray, *, engine: str = "auto") -> da.Array:
    """Divide the shading out of a (C, Y, X) cube's signal, lazily.

    Parameters
    ----------
    cube : (C, Y, X) dask array
        Camera counts.
    shading : Shading
        From :func:`estimate_shading`.
    offset : (C,) array
        Dark offset per band, counts: not shaded, so kept as it is.
    engine : {"auto", "numpy", "numba"}
        How the gain is applied (:func:`qdquant.unmixing.apply_gain`).

    Returns
    -------
    (C, Y, X) float32 dask array
        ``offset + (cube - offset) / profile``, chunked like ``cube`` (the
        residual flags and QC read it; the fit itself applies the same
        correction as it reads the cube: ``unmix(..., gain=inverse_field(...))``).
    """
    from qdquant.unmixing import apply_gain

    def block(x, block_info=None):
        (_, _), (y0, y1), (x0, x1) = block_info[0]["array-location"]
        return apply_gain(x, 1.0 / shading_field(shading, y0, y1, x0, x1), offset, engine=engine)

    cube = da.asarray(cube)
    return cube.map_blocks(block, dtype=np.float32)
