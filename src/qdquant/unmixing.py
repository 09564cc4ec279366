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
    "refine_library",
    "unmix",
]

#: :func:`check_library` warns when the library's condition number (columns
#: scaled to unit norm) is above this. Noise in the worst-separated direction
#: is amplified up to this many times more than in the best one.
CONDITION_LIMIT = 100.0

#: Pixels solved together (memory per block is about 60 bytes x bands x this).
_BLOCK_PX = 65536

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
    if k > 62:
        raise InputError(f"spectra has {k} endmembers; at most 62 are supported; shape {a.shape}")
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


def _codes(passive):
    """Integer code of each column's passive set (bit k = endmember k passive).

    passive : (K, m) bool. Returns (m,) int64.
    """
    k = passive.shape[0]
    if k <= 24:  # exact in float32
        bits = (1 << np.arange(k)).astype(np.float32)
        return (bits @ passive.astype(np.float32)).astype(np.int64)
    bits = (1 << np.arange(k, dtype=np.int64))
    return bits @ passive.astype(np.int64)


def _argmax0(w):
    """Row index and value of each column's maximum of ``w`` (K, m).

    Faster than ``w.argmax(axis=0)`` for the few rows here (numpy's argmax
    over a short, strided axis has a per-column overhead).
    """
    wmax = w.max(axis=0)
    j = np.full(w.shape[1], w.shape[0] - 1, dtype=np.intp)
    for r in range(w.shape[0] - 2, -1, -1):  # K steps, each vectorised over pixels
        np.copyto(j, r, where=w[r] == wmax)
    return j, wmax


class _SharedGram:
    """Subproblem solver when every pixel shares ``AtA`` (the unweighted fit).

    ``solve`` sorts the pixels by passive set and solves each group with one
    normal-equations solve: ``AtA`` restricted to the group's passive set is
    inverted once (cached, embedded in a K x K matrix of zeros) and applied
    to all the group's right-hand sides in one matrix product.
    """

    def __init__(self, ata):
        self.ata = np.ascontiguousarray(ata, dtype=np.float64)
        self.k = ata.shape[0]
        self._cache = {}

    def _inverse_t(self, code):
        """Transposed restricted inverse for a passive-set code (cached)."""
        inv = self._cache.get(code)
        if inv is None:
            idx = np.flatnonzero((code >> np.arange(self.k)) & 1)
            inv = np.zeros((self.k, self.k))
            if idx.size:
                sub = self.ata[np.ix_(idx, idx)]
                inv[np.ix_(idx, idx)] = np.linalg.solve(sub, np.eye(idx.size))
            inv = self._cache[code] = np.ascontiguousarray(inv.T)
        return inv

    def full(self, atb):
        return self._inverse_t((1 << self.k) - 1).T @ atb

    def solve(self, atb, codes, idx):
        """Least squares of columns ``atb`` (K, m) restricted to their passive sets."""
        m = codes.size
        # stable sort of small ints is a radix sort
        order = np.argsort(codes.astype(np.int16) if self.k < 16 else codes, kind="stable")
        sc = np.take(codes, order)
        starts = np.flatnonzero(sc[1:] != sc[:-1]) + 1
        if not starts.size:  # one group
            return self._inverse_t(int(sc[0])).T @ atb
        rhs = np.take(atb.T, order, axis=0)  # (m, K), pixels grouped
        z = np.empty_like(rhs)
        bounds = np.r_[0, starts, m].tolist()
        for s, e, c in zip(bounds[:-1], bounds[1:], np.take(sc, bounds[:-1]).tolist()):
            np.matmul(rhs[s:e], self._inverse_t(c), out=z[s:e])
        back = np.empty_like(order)
        back[order] = np.arange(m)
        return np.ascontiguousarray(np.take(z, back, axis=0).T)

    def gradient(self, atb, x, idx):
        return atb - self.ata @ x


class _PixelGram:
    """Subproblem solver when each pixel has its own Gram matrix (weighted fit).

    Every pixel's restricted system is solved in one batched
    ``np.linalg.solve``: rows and columns outside the passive set are
    replaced by the identity and their right-hand side by zero.
    """

    def __init__(self, gram):
        self.gram = gram  # (n, K, K)
        self.k = k = gram.shape[1]
        self._eye = np.eye(k, dtype=bool)

    def full(self, atb):
        return np.linalg.solve(self.gram, atb.T[..., None])[..., 0].T

    def solve(self, atb, codes, idx):
        p = ((codes[:, None] >> np.arange(self.k)) & 1).astype(bool)  # (m, K)
        g = np.where(p[:, :, None] & p[:, None, :], np.take(self.gram, idx, axis=0), self._eye)
        rhs = np.where(p, atb.T, 0.0)
        return np.linalg.solve(g, rhs[..., None])[..., 0].T

    def gradient(self, atb, x, idx):
        return atb - np.einsum("nkl,ln->kn", np.take(self.gram, idx, axis=0), x)


def _fcnnls(solver, atb, *, max_iter=None):
    """Fast combinatorial NNLS of all columns of ``atb`` (K, n), float64.

    Minimises ``||b - A x||`` subject to ``x >= 0`` for every pixel, given
    ``A.T @ A`` (inside ``solver``) and ``atb = A.T @ b``. Returns x (K, n).

    The Lawson-Hanson active-set method [2]_ is run on all pixels at once as
    in [1]_: the initial passive set is where the unconstrained solution is
    positive; each outer step solves every unfinished pixel restricted to its
    passive set (``solver.solve``, grouped by passive set), removes variables
    that went negative by the usual interpolation step (inner loop), then
    finishes the pixels that satisfy the KKT conditions and moves, for the
    others, the active variable with the largest gradient into the passive
    set. Only the unfinished pixels are carried from step to step.
    """
    k, n = atb.shape
    if max_iter is None:
        max_iter = 5 * k + 10
    bits = 1 << np.arange(k, dtype=np.int64)
    x = solver.full(atb)
    passive = x > 0
    idx = np.flatnonzero(~passive.all(axis=0))  # unfinished pixels
    if not idx.size:
        return x
    atb_f = np.take(atb, idx, axis=1)
    p_f = np.take(passive, idx, axis=1)
    d_f = np.take(x, idx, axis=1) * p_f  # feasible iterate (x is finite)
    codes = _codes(p_f)
    # gradient tolerance (AtB units), relative to each pixel's scale
    tol = np.abs(atb_f).max(axis=0)
    tol = 1e-11 * k * np.where(tol > 0, tol, 1.0)
    for _ in range(max_iter):
        z = solver.solve(atb_f, codes, idx)
        bad = np.flatnonzero((z < 0).any(axis=0))
        for _inner in range(k + 1):
            if not bad.size:
                break
            z_h, d_h, p_h = z[:, bad], d_f[:, bad], p_f[:, bad]
            with np.errstate(divide="ignore", invalid="ignore"):
                alpha = np.where(z_h < 0, d_h / (d_h - z_h), np.inf)
            cols = np.arange(bad.size)
            amin = alpha.argmin(axis=0)
            d_h += alpha[amin, cols] * (z_h - d_h)
            p_h &= d_h > 0
            p_h[amin, cols] = False
            d_h[~p_h] = 0.0
            d_f[:, bad], p_f[:, bad] = d_h, p_h
            codes[bad] = bits @ p_h.astype(np.int64)
            z_h = solver.solve(atb_f[:, bad], codes[bad], idx[bad])
            z[:, bad] = z_h
            bad = bad[(z_h < 0).any(axis=0)]
        if bad.size:  # safety net, not expected: keep the feasible iterate
            z[:, bad] = d_f[:, bad]
        # KKT: the gradient of every active (zero) variable must be <= tol
        w = solver.gradient(atb_f, z, idx)
        w += p_f * -1e300  # exclude passive variables (cheaper than a masked copy)
        more = w.max(axis=0) > tol
        if not more.any():
            x[:, idx] = z
            return x
        done = np.flatnonzero(~more)
        x[:, np.take(idx, done)] = np.take(z, done, axis=1)
        keep = np.flatnonzero(more)
        j, _ = _argmax0(np.take(w, keep, axis=1))
        idx, codes, tol = (np.take(v, keep) for v in (idx, codes, tol))
        atb_f, p_f, d_f = (np.take(v, keep, axis=1) for v in (atb_f, p_f, z))
        p_f[j, np.arange(j.size)] = True
        codes += bits[j]
    x[:, idx] = d_f  # not converged in max_iter: feasible, near-optimal
    return x


# --------------------------------------------------------------------------
# block kernel
# --------------------------------------------------------------------------


def _work_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _unmix_slab(b, a, a_w, solver, offset, weights):
    """Unmix pixels ``b`` (C, n), work dtype. Returns x (K, n) f64, rms (n,) f64."""
    if offset is not None:  # b is a private copy then
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


def _unmix_into(cube, a, offset, weights, abund, resid, block_px=None):
    """Unmix a numpy (C, Y, X) cube into preallocated outputs, by slabs of rows."""
    c, h, w = cube.shape
    wd = _work_dtype(cube.dtype)
    a_w = a.astype(wd)
    solver = _SharedGram(a.T @ a)
    rows = max(1, (block_px or _BLOCK_PX) // max(w, 1))
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        slab = cube[:, y0:y1, :]
        if offset is None and slab.dtype == wd:
            b = slab.reshape(c, -1)  # a view when the cube is C-contiguous; never written
        else:
            b = np.array(slab, dtype=wd, copy=True).reshape(c, -1)
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
    # cheap test first (a NaN/inf anywhere makes the sum non-finite)
    if np.issubdtype(cube.dtype, np.floating) and not (
        np.isfinite(cube.sum(dtype=np.float64)) or np.isfinite(cube).all()
    ):
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


# --------------------------------------------------------------------------
# library refinement on the slide
# --------------------------------------------------------------------------


def _shifted(spectrum, wl, shift, widen=1.0):
    """``spectrum`` (sampled at ``wl``) moved by ``shift`` nm and widened about its peak.

    Cubic-spline interpolation, edge values held outside the grid, negative
    ringing clipped; the column keeps its original maximum.
    """
    from scipy.interpolate import CubicSpline

    if shift == 0 and widen == 1.0:
        return spectrum.copy()
    peak = wl[np.argmax(spectrum)]
    src = peak + (wl - peak - shift) / widen
    src = np.clip(src, wl[0], wl[-1])
    out = np.clip(CubicSpline(wl, spectrum)(src), 0.0, None)
    m = out.max()
    return out * (spectrum.max() / m) if m > 0 else spectrum.copy()


def _sample_pixels(cube, n_pixels):
    """A strided subsample of at most about ``n_pixels`` pixels, (C, n) float64."""
    c, h, w = cube.shape
    stride = max(1, int(math.ceil(math.sqrt(h * w / n_pixels))))
    sub = cube[:, ::stride, ::stride]
    if isinstance(sub, da.Array):
        sub = sub.compute()
    return np.asarray(sub, dtype=np.float64).reshape(c, -1)


def _rss(b, a):
    """Sum of squared NNLS residuals of pixels ``b`` (C, n) with library ``a``."""
    _, r = unmix(b[:, None, :], a)
    return float((r.astype(np.float64) ** 2).sum() * b.shape[0])


def refine_library(
    cube_sample,
    spectra,
    wavelengths_nm,
    *,
    max_shift_nm=6.0,
    max_widen=0.0,
    n_iter=3,
    offset=None,
    n_pixels=20000,
    min_share=0.5,
):
    """Adjust each endmember's spectrum to the slide, within a small shift.

    Each (non-flat) endmember k is modelled as its library spectrum moved by
    ``s_k`` nm (``|s_k| <= max_shift_nm``) and, optionally, widened by a
    factor ``w_k`` (``|w_k - 1| <= max_widen``) about its peak. The fit
    alternates NNLS unmixing of a subsample of pixels with, for each
    endmember in turn, a bounded 1-D search of ``s_k`` (then ``w_k``) that
    minimises the residual of the pixels that endmember dominates.

    Parameters
    ----------
    cube_sample : (C, Y, X) numpy or dask array
        The slide, or a part of it, in counts.
    spectra : (C, K) array_like or pandas.DataFrame
        The library; a DataFrame in the ``config/spectra.csv`` format
        (``wavelength_nm`` then endmember columns) is accepted and returned
        in kind.
    wavelengths_nm : (C,) array_like
        Band centres, nm, increasing.
    max_shift_nm : float, optional
        Bound on each endmember's shift. Default 6 nm.
    max_widen : float, optional
        Bound on the relative change of width (0: no widening, the default).
    n_iter : int, optional
        Alternations of unmixing and per-endmember fits. Default 3.
    offset : None, float, (C,) array or "auto", optional
        Dark offset, as for :func:`unmix`.
    n_pixels : int, optional
        Pixels in the (strided) subsample. Default 20000.
    min_share : float, optional
        A pixel is dominated by endmember k when k's share of its modelled
        signal is at least this. Default 0.5.

    Returns
    -------
    refined : (C, K) array or DataFrame
        The refined library, same kind as ``spectra``; flat endmembers and
        endmembers that dominate fewer than 10 pixels are unchanged.
    report : pandas.DataFrame
        Per endmember: ``endmember``, ``shift_nm``, ``widen``, ``n_pixels``
        (dominated pixels used), ``residual_before`` and ``residual_after``
        (RMS residual over those pixels, counts, with the library and with
        the refined spectra). ``report.attrs`` has ``residual_before`` and
        ``residual_after`` over the whole subsample.
    """
    import pandas as pd
    from scipy.optimize import minimize_scalar

    names = None
    if isinstance(spectra, pd.DataFrame):
        frame = spectra
        names = [c for c in frame.columns if c != "wavelength_nm"]
        a0 = frame[names].to_numpy(dtype=np.float64)
    else:
        a0 = np.array(spectra, dtype=np.float64)
    _check_cube_shape(cube_sample)
    c = cube_sample.shape[0]
    a0 = _as_spectra(a0, c)
    k = a0.shape[1]
    names = names or [str(i) for i in range(k)]
    wl = np.asarray(wavelengths_nm, dtype=np.float64)
    if wl.shape != (c,) or not np.isfinite(wl).all() or (np.diff(wl) <= 0).any():
        raise InputError(f"wavelengths_nm must be ({c},) increasing finite values, got shape {wl.shape}")
    if not max_shift_nm >= 0 or not 0 <= max_widen < 1:
        raise InputError(f"max_shift_nm must be >= 0 and max_widen in [0, 1); got {max_shift_nm}, {max_widen}")
    if isinstance(offset, str):
        if offset != "auto":
            raise InputError(f"offset must be None, a number, a (C,) array or 'auto', got {offset!r}")
        offset = estimate_offset(cube_sample)
    offset = _as_offset(offset, c)

    b = _sample_pixels(cube_sample, n_pixels)
    if offset is not None:
        b = b - offset[:, None]
    flat = np.ptp(a0, axis=0) <= 1e-9 * a0.max(axis=0)
    shift, widen = np.zeros(k), np.ones(k)
    a = a0.copy()

    def column(j, s, w):
        return _shifted(a0[:, j], wl, s, w)

    def dominated(x, j):
        contrib = x * a.sum(axis=0)[:, None]
        share = contrib[j] / np.maximum(contrib.sum(axis=0), 1e-300)
        return np.flatnonzero((share >= min_share) & (x[j] > 0))

    for _ in range(max(1, int(n_iter))):
        x = unmix(b[:, None, :], a)[0][:, 0, :].astype(np.float64)
        for j in range(k):
            if flat[j]:
                continue
            sel = dominated(x, j)
            if sel.size < 10:
                continue
            bj = b[:, sel]

            def cost(s, w, j=j, bj=bj):
                trial = a.copy()
                trial[:, j] = column(j, s, w)
                return _rss(bj, trial)

            if max_shift_nm > 0:
                # coarse grid, then a bounded scalar search around the best point
                grid = np.linspace(-max_shift_nm, max_shift_nm, 13)
                costs = [cost(s, widen[j]) for s in grid]
                i = int(np.argmin(costs))
                step = grid[1] - grid[0]
                lo, hi = max(-max_shift_nm, grid[i] - step), min(max_shift_nm, grid[i] + step)
                res = minimize_scalar(lambda s: cost(s, widen[j]), bounds=(lo, hi),
                                      method="bounded", options={"xatol": 0.01})
                shift[j] = res.x if res.fun <= costs[i] else grid[i]
            if max_widen > 0:
                res = minimize_scalar(lambda w: cost(shift[j], w), bounds=(1 - max_widen, 1 + max_widen),
                                      method="bounded", options={"xatol": 1e-3})
                widen[j] = res.x if res.fun <= cost(shift[j], widen[j]) else widen[j]
            a[:, j] = column(j, shift[j], widen[j])

    # report
    x0 = unmix(b[:, None, :], a0)[0][:, 0, :].astype(np.float64)
    rows = []
    for j in range(k):
        contrib = x0 * a0.sum(axis=0)[:, None]
        share = contrib[j] / np.maximum(contrib.sum(axis=0), 1e-300)
        sel = np.flatnonzero((share >= min_share) & (x0[j] > 0))
        if sel.size:
            before = math.sqrt(_rss(b[:, sel], a0) / (c * sel.size))
            after = math.sqrt(_rss(b[:, sel], a) / (c * sel.size))
        else:
            before = after = float("nan")
        rows.append(dict(endmember=names[j], shift_nm=float(shift[j]), widen=float(widen[j]),
                         n_pixels=int(sel.size), residual_before=before, residual_after=after))
    report = pd.DataFrame(rows)
    n = b.shape[1]
    report.attrs["residual_before"] = math.sqrt(_rss(b, a0) / (c * n))
    report.attrs["residual_after"] = math.sqrt(_rss(b, a) / (c * n))
    if isinstance(spectra, pd.DataFrame):
        refined = frame.copy()
        refined[names] = a
        return refined, report
    return a, report
