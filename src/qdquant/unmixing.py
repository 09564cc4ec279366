"""Linear spectral unmixing with non-negative abundances.

The model of one pixel is ``b = offset + A @ x + noise``: ``b`` is the pixel's
spectrum (C bands, camera counts), ``A`` the spectral library (C, K), one
column per endmember, and ``x >= 0`` the K abundances, in units of the
library's columns (a pixel equal to 100 times column k has abundance 100 for
endmember k).

:func:`unmix` solves the non-negative least-squares problem of every pixel at
once with the fast combinatorial NNLS of Van Benthem & Keenan (2004): the
Lawson-Hanson active-set algorithm runs on all pixels together; in each step
the pixels that share a passive set are grouped and solved with one
normal-equations solve, using ``A.T @ A`` (computed once) and ``A.T @ b``
(computed once per pixel).

References
----------
.. [1] M. H. Van Benthem and M. R. Keenan, "Fast algorithm for the solution of
   large-scale non-negativity-constrained least squares problems",
   J. Chemometrics 18 (2004) 441-450. :doi:`10.1002/cem.889`
.. [2] C. L. Lawson and R. J. Hanson, "Solving Least Squares Problems",
   Prentice-Hall, 1974, chapter 23.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import dask.array as da
import numpy as np

from qdquant.errors import InputError

__all__ = [
    "CONDITION_LIMIT",
    "LibraryCheck",
    "check_library",
    "estimate_offset",
    "unmix",
]

#: :func:`check_library` warns when the library's condition number (columns
#: scaled to unit norm) is above this. Noise in the worst-separated direction
#: is amplified up to this many times more than in the best one.
CONDITION_LIMIT = 100.0

#: Pixels solved together (memory per block is about 60 bytes x bands x this).
_BLOCK_PX = 16384

#: Poisson weights: the expected count of a band is floored at
#: max(_POISSON_FLOOR_COUNTS, _POISSON_FLOOR_FRACTION x the pixel's largest
#: expected band), standing in for read noise.
_POISSON_FLOOR_COUNTS = 1.0
_POISSON_FLOOR_FRACTION = 0.01


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------


def _as_spectra(spectra, n_bands=None):
    """Validate a library and return it as a C-contiguous float64 (C, K) array."""
    try:
        a = np.array(spectra, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"spectra: not a numeric (C, K) array ({exc})") from None
    if a.ndim != 2:
        raise InputError(f"spectra must be a 2-D (C bands, K endmembers) array, got shape {a.shape}")
    c, k = a.shape
    if n_bands is not None and c != n_bands:
        raise InputError(
            f"spectra has {c} rows (bands) but the cube has {n_bands} bands; "
            f"spectra shape {a.shape}"
        )
    if k == 0:
        raise InputError(f"spectra has no endmember column; shape {a.shape}")
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise InputError(
            f"spectra contains NaN or inf (first at band {bad[0]}, endmember {bad[1]}); "
            f"shape {a.shape}"
        )
    if (a < 0).any():
        bad = np.argwhere(a < 0)[0]
        raise InputError(
            f"spectra contains negative values (first {a[bad[0], bad[1]]:g} at band {bad[0]}, "
            f"endmember {bad[1]}); shape {a.shape}"
        )
    zero = np.flatnonzero(~a.any(axis=0))
    if zero.size:
        raise InputError(f"spectra column {int(zero[0])} is all zero; shape {a.shape}")
    if k > c:
        raise InputError(
            f"spectra has more endmembers ({k}) than bands ({c}): the fit is underdetermined; "
            f"shape {a.shape}"
        )
    s = np.linalg.svd(a / np.linalg.norm(a, axis=0), compute_uv=False)
    if s[-1] <= s[0] * 1e-10:
        raise InputError(
            f"spectra columns are linearly dependent (condition number > 1e10); shape {a.shape}"
        )
    return np.ascontiguousarray(a)


def _check_cube_shape(cube):
    shape = getattr(cube, "shape", None)
    if shape is None or len(shape) != 3:
        raise InputError(f"cube must be a 3-D (C, Y, X) array, got shape {shape}")
    dtype = np.dtype(cube.dtype)
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)) or dtype == np.bool_:
        raise InputError(f"cube must have an integer or float dtype, got {dtype}; shape {shape}")


def _as_offset(offset, n_bands):
    """None, or a float64 (C,) offset."""
    if offset is None:
        return None
    o = np.asarray(offset, dtype=np.float64)
    if o.ndim == 0:
        o = np.full(n_bands, float(o))
    if o.shape != (n_bands,):
        raise InputError(f"offset must be a scalar or have shape ({n_bands},), got shape {o.shape}")
    if not np.isfinite(o).all():
        raise InputError(f"offset contains NaN or inf; shape {o.shape}")
    return o


# --------------------------------------------------------------------------
# FC-NNLS core
# --------------------------------------------------------------------------


def _set_codes(passive):
    """Integer label per column of a boolean (K, n) passive-set array."""
    k = passive.shape[0]
    if k <= 15:
        weights = (1 << np.arange(k)).astype(np.int16)
        return weights @ passive.astype(np.int16)
    if k <= 62:
        weights = (1 << np.arange(k, dtype=np.int64))
        return weights @ passive.astype(np.int64)
    return np.unique(passive, axis=1, return_inverse=True)[1].ravel()


class _SharedGram:
    """Subproblem solver when every pixel shares ``AtA`` (the unweighted fit).

    ``solve`` groups the columns by passive set and solves each group with
    one cached normal-equations solve (the inverse of ``AtA`` restricted to
    the passive set, embedded in a K x K matrix of zeros).
    """

    def __init__(self, ata):
        self.ata = ata
        self.k = ata.shape[0]
        self._inv = {}

    def _inverse(self, mask):
        key = mask.tobytes()
        inv = self._inv.get(key)
        if inv is None:
            inv = np.zeros((self.k, self.k))
            idx = np.flatnonzero(mask)
            if idx.size:
                sub = self.ata[np.ix_(idx, idx)]
                inv[np.ix_(idx, idx)] = np.linalg.solve(sub, np.eye(idx.size))
            self._inv[key] = inv
        return inv

    def full(self, atb):
        return self._inverse(np.ones(self.k, bool)) @ atb

    def solve(self, atb, passive):
        """Least squares restricted to the passive set, per column."""
        out = np.zeros_like(atb)
        codes = _set_codes(passive)
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
        ends = np.r_[starts[1:], codes.size]
        for s, e in zip(starts, ends):
            cols = order[s:e]
            inv = self._inverse(passive[:, cols[0]])
            if e - s == codes.size:
                out[:] = inv @ atb
            else:
                out[:, cols] = inv @ atb[:, cols]
        return out

    def gradient(self, atb, x, cols):
        return atb - self.ata @ x


class _PixelGram:
    """Subproblem solver when each pixel has its own Gram matrix (weighted fit).

    Every pixel's restricted system is solved in one batched
    ``np.linalg.solve``: rows and columns outside the passive set are
    replaced by the identity and their right-hand side by zero.
    """

    def __init__(self, gram):
        self.gram = gram  # (n, K, K)
        self.k = gram.shape[1]
        self._eye = np.eye(self.k, dtype=bool)

    def full(self, atb):
        return np.linalg.solve(self.gram, atb.T[..., None])[..., 0].T

    def solve(self, atb, passive, cols):
        p = passive.T  # (m, K)
        g = self.gram[cols]
        m = p[:, :, None] & p[:, None, :]
        g = np.where(m, g, self._eye)
        rhs = np.where(p, atb.T, 0.0)
        return np.linalg.solve(g, rhs[..., None])[..., 0].T

    def gradient(self, atb, x, cols):
        return atb - np.einsum("nkl,ln->kn", self.gram[cols], x)


def _fcnnls(solver, atb, *, max_iter=None):
    """Fast combinatorial NNLS of all columns of ``atb`` (K, n), float64.

    Minimises ``||b - A x||`` subject to ``x >= 0`` given ``AtA`` (inside
    ``solver``) and ``atb = A.T @ b`` for each pixel. Returns x (K, n).
    """
    k, n = atb.shape
    shared = isinstance(solver, _SharedGram)
    if max_iter is None:
        max_iter = 5 * k + 10
    # tolerance on the gradient (in AtB units), relative to each pixel's scale
    scale = np.abs(atb).max(axis=0)
    tol = 1e-11 * k * np.where(scale > 0, scale, 1.0)

    def solve(cols, passive):
        if shared:
            return solver.solve(atb[:, cols], passive)
        return solver.solve(atb[:, cols], passive, cols)

    x = solver.full(atb)
    passive = x > 0
    x[~passive] = 0.0
    free = np.flatnonzero(~passive.all(axis=0))  # columns still to optimise
    # Columns whose unconstrained solution is all-zero or partly negative must be
    # checked for optimality; set up by one gradient step as in Lawson-Hanson.
    d = x  # feasible iterate (modified in place)
    it = 0
    while free.size and it < max_iter:
        it += 1
        p_f = passive[:, free]
        z = solve(free, p_f)
        # inner loop: make infeasible solutions feasible
        bad = np.flatnonzero((z < 0).any(axis=0))
        inner = 0
        while bad.size and inner <= k:
            inner += 1
            cols = free[bad]
            z_h = z[:, bad]
            d_h = d[:, cols]
            p_h = p_f[:, bad]
            neg = (z_h < 0) & p_h
            with np.errstate(divide="ignore", invalid="ignore"):
                alpha = np.where(neg, d_h / (d_h - z_h), np.inf)
            amin = alpha.argmin(axis=0)
            step = alpha[amin, np.arange(bad.size)]
            d_h = d_h + step * (z_h - d_h)
            p_h = p_h & (d_h > 0)
            p_h[amin, np.arange(bad.size)] = False
            d_h[~p_h] = 0.0
            d[:, cols] = d_h
            p_f[:, bad] = p_h
            z_h = solve(cols, p_h)
            z[:, bad] = z_h
            bad = bad[(z_h < 0).any(axis=0)]
        if bad.size:  # safety net, never expected: keep the last feasible iterate
            z[:, bad] = np.maximum(z[:, bad], 0.0)
        passive[:, free] = p_f
        d[:, free] = z
        # optimality: largest gradient over the active (zero) set
        w = solver.gradient(atb[:, free], z, free)
        w[p_f] = -np.inf
        j = w.argmax(axis=0)
        wmax = w[j, np.arange(free.size)]
        more = wmax > tol[free]
        free = free[more]
        passive[j[more], free] = True
    return d


# --------------------------------------------------------------------------
# block kernel
# --------------------------------------------------------------------------


def _work_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _unmix_slab(b, a, a_w, solver, offset, weights):
    """Unmix pixels ``b`` (C, n), work dtype. Returns x (K, n) f64, rms (n,) f64."""
    if offset is not None:
        b -= offset.astype(b.dtype)[:, None]
    atb = (a_w.T @ b).astype(np.float64)
    if not np.isfinite(atb).all():
        raise InputError("cube contains NaN or inf pixel values")
    x = _fcnnls(solver, atb)
    if weights == "poisson":
        expected = a @ x  # (C, n) float64
        floor = np.maximum(_POISSON_FLOOR_COUNTS, _POISSON_FLOOR_FRACTION * expected.max(axis=0))
        w = 1.0 / np.maximum(expected, floor)
        c, k = a.shape
        outer = (a[:, :, None] * a[:, None, :]).reshape(c, k * k)
        gram = (w.T @ outer).reshape(-1, k, k)
        atb_w = a.T @ (w * b)
        x = _fcnnls(_PixelGram(gram), atb_w)
    r = a_w @ x.astype(b.dtype)
    np.subtract(b, r, out=r)
    np.square(r, out=r)
    rms = np.sqrt(r.mean(axis=0, dtype=np.float64))
    if not np.isfinite(rms).all():
        raise InputError("cube contains NaN or inf pixel values")
    return x, rms


def _unmix_into(cube, a, offset, weights, abund, resid, block_px=_BLOCK_PX):
    """Unmix a numpy (C, Y, X) cube into preallocated outputs, by slabs of rows."""
    c, h, w = cube.shape
    wd = _work_dtype(cube.dtype)
    a_w = a.astype(wd)
    solver = _SharedGram(a.T @ a)
    rows = max(1, block_px // max(w, 1))
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        b = np.array(cube[:, y0:y1, :], dtype=wd, copy=True).reshape(c, -1)
        x, rms = _unmix_slab(b, a, a_w, solver, offset, weights)
        abund[:, y0:y1, :] = x.reshape(-1, y1 - y0, w)
        resid[y0:y1, :] = rms.reshape(y1 - y0, w)


def _unmix_block(block, a, offset, weights):
    """map_blocks kernel: (C, y, x) -> (K + 1, y, x) float32 (residual last)."""
    k = a.shape[1]
    out = np.empty((k + 1,) + block.shape[1:], np.float32)
    if block.size:
        _unmix_into(block, a, offset, weights, out[:k], out[k])
    return out


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def unmix(cube, spectra, *, offset=None, weights=None):
    """Non-negative least-squares unmixing of a multispectral cube.

    Parameters
    ----------
    cube : (C, Y, X) numpy or dask array, integer or float
        The image, C spectral bands in the row order of ``spectra``, in camera
        counts.
    spectra : (C, K) array_like
        The spectral library, one non-negative column per endmember. A flat
        column (all ones) models a camera dark offset as an endmember.
    offset : None, float, (C,) array_like or "auto", optional
        Dark offset in counts subtracted from every pixel before the fit.
        None: no subtraction (the library may contain a flat endmember
        instead); "auto": :func:`estimate_offset` of ``cube``.
    weights : None or "poisson", optional
        None: ordinary least squares. "poisson": photon-noise-aware fit; the
        unweighted fit gives each band's expected count ``e = A @ x``, then the
        fit is repeated once with each band of each pixel weighted by
        ``1 / max(e, floor)``, ``floor = max(1, 0.01 * max_c e)`` counts, a
        stand-in for the read noise.

    Returns
    -------
    abundances : (K, Y, X) float32 array
        Non-negative abundances in units of the library's columns.
    residual : (Y, X) float32 array
        Per-pixel root-mean-square residual over the bands, in counts:
        ``sqrt(mean_c (cube - offset - spectra @ abundances)**2)``, unweighted
        also for weighted fits.

    Both outputs are numpy arrays for a numpy cube and lazy dask arrays for a
    dask cube (bands are rechunked into one chunk; compute both together with
    ``dask.compute(abundances, residual)`` to unmix once).

    Raises
    ------
    InputError
        When ``cube`` is not 3-D, ``spectra`` does not match its bands, has
        NaN/inf, negative or all-zero columns, more endmembers than bands or
        linearly dependent columns, or the cube has NaN/inf values (for a dask
        cube, when the offending block is computed).

    Notes
    -----
    The fast combinatorial NNLS [1]_ runs the Lawson-Hanson active-set
    algorithm on all pixels at once: every iteration groups the pixels that
    share a passive set and solves each group with one normal-equations solve
    (float64 normal equations, ``A.T @ A`` precomputed). Band sums
    (``A.T @ b`` and the residual) are done in float32, or float64 for a
    float64 cube. The result equals ``scipy.optimize.nnls`` per pixel.
    """
    _check_cube_shape(cube)
    c = cube.shape[0]
    a = _as_spectra(spectra, c)
    k = a.shape[1]
    if isinstance(offset, str):
        if offset != "auto":
            raise InputError(f"offset must be None, a number, a (C,) array or 'auto', got {offset!r}")
        offset = estimate_offset(cube)
    offset = _as_offset(offset, c)
    if weights not in (None, "poisson"):
        raise InputError(f"weights must be None or 'poisson', got {weights!r}")

    if isinstance(cube, da.Array):
        cube = cube.rechunk({0: -1})
        out = da.map_blocks(
            _unmix_block, cube, a, offset, weights,
            dtype=np.float32,
            chunks=((k + 1,),) + cube.chunks[1:],
            meta=np.empty((0, 0, 0), np.float32),
        )
        return out[:k], out[k]

    cube = np.asarray(cube)
    if np.issubdtype(cube.dtype, np.floating) and not np.isfinite(cube).all():
        bad = np.argwhere(~np.isfinite(cube))[0]
        raise InputError(
            f"cube contains NaN or inf (first at band {bad[0]}, y {bad[1]}, x {bad[2]}); "
            f"shape {cube.shape}"
        )
    _, h, w = cube.shape
    abund = np.empty((k, h, w), np.float32)
    resid = np.empty((h, w), np.float32)
    _unmix_into(cube, a, offset, weights, abund, resid)
    return abund, resid


def estimate_offset(cube, *, percentile=1.0, max_pixels=1_000_000):
    """Estimate each band's dark offset (counts) from the image itself.

    Parameters
    ----------
    cube : (C, Y, X) numpy or dask array
        The image, in counts.
    percentile : float, optional
        The offset of a band is this low percentile of its pixel values, on
        the premise that some pixels (slide background, empty glass) carry no
        fluorescence. Default 1.0.
    max_pixels : int, optional
        Pixels looked at: a regular grid (stride in Y and X) of about this many
        pixels. A dask cube reads at most 16 evenly spaced chunks.

    Returns
    -------
    offset : (C,) float64 array
        Counts per band.

    Notes
    -----
    Noise spreads the background pixels around the offset, so a low
    percentile slightly underestimates it (by about 2.3 noise sigmas at 1 %),
    which keeps the subtracted cube non-negative on the background.
    """
    _check_cube_shape(cube)
    c, h, w = cube.shape
    if not 0 <= percentile <= 100:
        raise InputError(f"percentile must be in [0, 100], got {percentile}")
    if isinstance(cube, da.Array):
        nby, nbx = cube.numblocks[1], cube.numblocks[2]
        n_blocks = nby * nbx
        picks = np.unique(np.linspace(0, n_blocks - 1, min(16, n_blocks)).round().astype(int))
        parts = []
        per_block = max(1, max_pixels // picks.size)
        for p in picks:
            blk = cube.blocks[:, p // nbx, p % nbx]
            bh, bw = blk.shape[1:]
            stride = max(1, int(math.sqrt(bh * bw / per_block)))
            parts.append(blk[:, ::stride, ::stride].reshape(c, -1))
        sample = np.concatenate(da.compute(*parts), axis=1)
    else:
        cube = np.asarray(cube)
        stride = max(1, int(math.sqrt(h * w / max_pixels)))
        sample = cube[:, ::stride, ::stride].reshape(c, -1)
    sample = np.asarray(sample, dtype=np.float64)
    if sample.shape[1] == 0:
        raise InputError(f"cube has no pixels; shape {cube.shape}")
    if not np.isfinite(sample).all():
        raise InputError(f"cube contains NaN or inf; shape {cube.shape}")
    return np.percentile(sample, percentile, axis=1)


@dataclass(frozen=True)
class LibraryCheck:
    """How well a spectral library separates its endmembers.

    Attributes
    ----------
    condition_number : float
        2-norm condition number of the library with columns scaled to unit
        norm (1 = orthogonal spectra; noise amplification of the worst
        direction relative to the best).
    most_collinear : tuple of str
        Names of the two endmembers whose spectra are most alike.
    cosine : float
        Cosine similarity of that pair (1 = identical shapes).
    """

    condition_number: float
    most_collinear: tuple[str, str]
    cosine: float


def check_library(spectra, names):
    """Condition number and most collinear pair of a spectral library.

    Parameters
    ----------
    spectra : (C, K) array_like
        The library, one column per endmember.
    names : sequence of K str
        Endmember names, in column order.

    Returns
    -------
    LibraryCheck

    Warns
    -----
    UserWarning
        When the condition number is above :data:`CONDITION_LIMIT` (100).

    Raises
    ------
    InputError
        For a malformed library (see :func:`unmix`) or a wrong number of names.
    """
    a = _as_spectra(spectra)
    names = [str(n) for n in names]
    k = a.shape[1]
    if len(names) != k:
        raise InputError(f"{len(names)} names given for {k} spectra columns; spectra shape {a.shape}")
    u = a / np.linalg.norm(a, axis=0)
    s = np.linalg.svd(u, compute_uv=False)
    cond = float(s[0] / s[-1])
    if k > 1:
        cos = u.T @ u
        np.fill_diagonal(cos, -np.inf)
        i, j = np.unravel_index(np.argmax(cos), cos.shape)
        pair, cosine = (names[min(i, j)], names[max(i, j)]), float(cos[i, j])
    else:
        pair, cosine = (names[0], names[0]), 1.0
    if cond > CONDITION_LIMIT:
        warnings.warn(
            f"spectral library is ill-conditioned (condition number {cond:.3g} > "
            f"{CONDITION_LIMIT:g}); most collinear: {pair[0]} and {pair[1]} "
            f"(cosine {cosine:.4f})",
            UserWarning,
            stacklevel=2,
        )
    return LibraryCheck(condition_number=cond, most_collinear=pair, cosine=cosine)
