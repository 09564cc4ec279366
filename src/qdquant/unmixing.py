"""Linear spectral unmixing with non-negative abundances.

The model of one pixel is ``b = offset + A @ x + noise``: ``b`` is the pixel's
spectrum (C bands, camera counts), ``A`` the spectral library (C, K), one
column per endmember, and ``x >= 0`` the K abundances, in units of the
library's columns (a pixel equal to 100 times column k has abundance 100 for
endmember k).

:func:`unmix` solves the non-negative least-squares problem of every pixel
exactly (the solution of ``scipy.optimize.nnls``), on the normal equations
``G = A.T @ A`` (computed once) and ``A.T @ b`` (once per pixel). Two engines:

- a numba kernel (the default when numba imports): one fused pass over the
  cube; the unconstrained solution of every pixel, then the Lawson-Hanson
  active-set algorithm [2]_ for the pixels where it has a negative entry,
  warm-started from its positive entries (see "numba kernel" below);
- the fast combinatorial NNLS of Van Benthem & Keenan [1]_ in numpy, used
  without numba: the Lawson-Hanson algorithm runs on all pixels together and
  in each step the pixels that share a passive set are grouped and solved
  with one normal-equations solve.

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
import threading
import warnings
from dataclasses import dataclass

import dask.array as da
import numpy as np

from qdquant.errors import InputError

try:  # the fast kernel; without numba the numpy FC-NNLS below does the same, slower
    import numba as _numba
    from llvmlite import ir as _ir
    from numba.core import cgutils as _cgutils
    from numba.core import types as _nbtypes
    from numba.extending import intrinsic as _intrinsic
    from numba.extending import models as _models
    from numba.extending import register_model as _register_model
except Exception:  # pragma: no cover - numba is a dependency, but keep working without it
    _numba = None

__all__ = [
    "CONDITION_LIMIT",
    "LibraryCheck",
    "apply_gain",
    "check_library",
    "estimate_offset",
    "flat_columns",
    "refine_library",
    "unmix",
]

#: :func:`check_library` warns when the library's condition number (columns
#: scaled to unit norm) is above this. Noise in the worst-separated direction
#: is amplified up to this many times more than in the best one.
CONDITION_LIMIT = 100.0

#: Pixels solved together by the numpy path (memory per block is about 60
#: bytes x bands x this).
_BLOCK_PX = 65536

#: Solve with the numba kernel (when numba imports); False selects the
#: pure-numpy FC-NNLS (same results, several times slower).
_USE_NUMBA = _numba is not None

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


class _NonFiniteCube(InputError):
    """The cube has a NaN or inf value (seen as a non-finite fit or residual)."""


def _work_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _unmix_slab(b, a, a_w, solver, offset, weights):
    """Unmix pixels ``b`` (C, n), work dtype. Returns x (K, n) f64, rms (n,) f64."""
    if offset is not None:  # b is a private copy then
        b -= offset.astype(b.dtype)[:, None]
    atb = (a_w.T @ b).astype(np.float64)
    if not np.isfinite(atb).all():
        raise _NonFiniteCube("cube contains NaN or inf pixel values")
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
        raise _NonFiniteCube("cube contains NaN or inf pixel values")
    return x, rms


def _unmix_into(cube, a, offset, weights, abund, resid, block_px=None, gain=None, gain_offset=None):
    """Unmix a numpy (C, Y, X) cube into preallocated outputs.

    With numba: the fused kernel, multi-threaded when called from the main
    thread (a dask worker thread runs it single-threaded: dask already works
    on several blocks at once). Without: the numpy FC-NNLS by slabs of rows.
    ``gain``, ``gain_offset``: fit ``apply_gain(cube, gain, gain_offset)``.
    """
    global _USE_NUMBA
    if gain is not None and gain_offset is None:
        gain_offset = np.zeros(cube.shape[0])
    if _USE_NUMBA and _numba is not None:
        parallel = threading.current_thread() is threading.main_thread()
        try:
            _unmix_into_numba(cube, a, offset, weights, abund, resid, parallel=parallel,
                              gain=gain, gain_offset=gain_offset)
            return
        except _numba.core.errors.NumbaError as exc:  # pragma: no cover - a broken numba install
            _USE_NUMBA = False
            warnings.warn(f"numba kernel unavailable ({exc.__class__.__name__}: {exc}); using numpy from now on",
                          RuntimeWarning, stacklevel=2)
    if gain is not None:
        _unmix_into_gained(cube, gain, gain_offset, a, offset, weights, abund, resid)
        return
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


def _unmix_block(block, a, offset, weights, gain=None, gain_offset=None, block_info=None):
    """map_blocks kernel: (C, y, x) -> (K + 1, y, x) float32 (residual last); ``gain``: (1, y, x) or None.

    A NaN or inf is reported at its (band, y, x) in the whole cube (``block_info`` gives the block's origin).
    """
    k = a.shape[1]
    out = np.empty((k + 1,) + block.shape[1:], np.float32)
    if block.size:
        try:
            _unmix_into(block, a, offset, weights, out[:k], out[k],
                        gain=None if gain is None else gain[0], gain_offset=gain_offset)
        except _NonFiniteCube:
            y0, x0 = (r[0] for r in block_info[0]["array-location"][1:]) if block_info else (0, 0)
            bad = np.argwhere(~np.isfinite(block)) if block.dtype.kind == "f" else ()
            if len(bad):
                b, y, x = bad[0]
                raise InputError(f"cube contains NaN or inf (first at band {b}, y {y0 + y}, x {x0 + x} "
                                 "in this block)") from None
            raise
    return out


#: Pixels per slab that a gain is applied to before the fit (a float32 slab of
#: 31 bands: 8 MB, reused: no corrected copy of the cube, no fresh pages).
_GAIN_SLAB_PX = 65536


def apply_gain(cube, gain, gain_offset, out=None):
    """``gain_offset + gain * (cube - gain_offset)``, float32, in one pass.

    Parameters
    ----------
    cube : (C, Y, X) numpy array
        Counts, any real dtype.
    gain : (Y, X) array
        Multiplier of each pixel's signal (e.g. the inverse of a shading profile).
    gain_offset : (C,) array
        The part of each band that the gain leaves alone (the camera's dark offset), counts.
    out : (C, Y, X) float32 array, optional
        Where to write; default a new array.

    Returns
    -------
    (C, Y, X) float32 array
    """
    gain = np.asarray(gain, dtype=np.float32)
    gain_offset = np.asarray(gain_offset, dtype=np.float32)
    if out is None:
        out = np.empty(cube.shape, np.float32)
    if _numba is not None and cube.size:
        _nb_apply_gain(cube, gain, gain_offset, out)
    else:
        np.subtract(cube, gain_offset[:, None, None], out=out, dtype=np.float32)
        out *= gain
        out += gain_offset[:, None, None]
    return out


def _unmix_into_gained(cube, gain, gain_offset, a, offset, weights, abund, resid):
    """:func:`_unmix_into` of ``apply_gain(cube, gain, gain_offset)``, by slabs of rows into one buffer."""
    c, h, w = cube.shape
    rows = max(1, _GAIN_SLAB_PX // max(w, 1))
    buf = np.empty((c, min(rows, h), w), np.float32)
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        slab = apply_gain(cube[:, y0:y1], gain[y0:y1], gain_offset, out=buf[:, : y1 - y0])
        _unmix_into(slab, a, offset, weights, abund[:, y0:y1], resid[y0:y1])


# --------------------------------------------------------------------------
# numba kernel: one fused pass over the cube
# --------------------------------------------------------------------------
#
# For every tile of _TILE pixels (contiguous along X) the pixels' spectra are
# read once (offset subtracted, float64); ``b = A.T @ y`` and the
# unconstrained solution ``G^-1 b`` (``G = A.T @ A``) are computed for the
# whole tile, pixel loops innermost (vectorised). A pixel whose unconstrained
# solution has no negative entry is done: that is its NNLS solution. The
# others run the Lawson-Hanson active-set algorithm on the Gram form (G, b),
# warm-started from the passive set of the unconstrained solution's positive
# entries (cold-started from the empty set if that fails). The residual is
# then computed from the tile still in cache.
#
# Passive systems: for K <= _KP endmembers (the fast path) the problem is
# padded to _KP variables (G with an identity block, b = 0: the padding
# variables never enter the passive set) and the inverse of G restricted to
# each of the 2**_KP passive sets, computed once per call by Cholesky on the
# sub-matrix, is looked up; every loop of the per-pixel algorithm then has a
# fixed trip count and the data-dependent choices are mostly selects, not
# branches (mispredicted branches cost more than the arithmetic here). A
# first pass, without branches, solves every such pixel on its warm-start
# passive set and checks the KKT conditions (done for about 2/3 of them on
# typical data); a second pass runs the Lawson-Hanson loop for the rest.
# In the scalar kernel beyond _KP endmembers (with Poisson weights, or K >
# _K16_MAX), and for the per-pixel Gram matrices of the Poisson refit, each
# passive system is factorised (Cholesky) when it comes.
#
# Without weights and for K <= _KP, _nb_tiles8 does the same with explicit
# vectors of 8 float64 (numba intrinsics for LLVM vector operations, below):
# 8 pixels a vector for the band sums, the unconstrained solution, the
# outputs and the residual; a pixel's _KP variables a vector for its
# active-set steps. LLVM does not vectorise either on its own. See "the fast
# kernel" below. For _KP < K <= _K16_MAX (the shipped panel has K = 9) the
# 16-lane kernel does the same with a pixel's variables in 16 lanes ("the
# 16-lane kernel" below). Both read 8 neighbouring pixels a load: a cube
# strided along X is copied to them by slabs of rows.
#
# Pixels whose active-set iteration does not converge (_LH_ITER_FACTOR x K + 1
# outer steps from the warm start, then as many from the cold start), or
# whose passive system is not numerically positive definite, are flagged and
# re-solved with the numpy FC-NNLS above.
#
# The constants below are compiled into the kernel, except _FAST_LH and
# _LH_ITER_FACTOR (read at each call).

#: Pixels per tile of the numba kernel.
_TILE = 128
#: Endmembers of the fast path (problems with fewer are padded to this).
_KP = 8
#: Use the fast path when K <= _KP (tests switch it off to check the other).
_FAST_LH = True
#: Outer Lawson-Hanson iterations per pixel and start: _LH_ITER_FACTOR x K + 1.
_LH_ITER_FACTOR = 3
#: A Cholesky pivot below this times the diagonal element counts as not
#: positive definite (the pixel goes to the numpy path).
_CHOL_RTOL = 1e-13
#: KKT gradient tolerance, relative to max |A.T b| (times K), as in _fcnnls.
_KKT_RTOL = 1e-11
#: The residual sum of squares is computed in Gram form,
#: ``|y|^2 - x.(2 b - G x)`` (float64, error about 1e-14 |y|^2); where that
#: is below this fraction of ``|y|^2`` it is recomputed band by band.
_RSS_GRAM_MIN = 1e-6

_NB_SUPPORTED = frozenset(np.dtype(t) for t in (
    np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64,
    np.float32, np.float64,
))

if _numba is not None:
    _NB_OPTS = dict(cache=True, fastmath=False, nogil=True, error_model="numpy")
    _njit = _numba.njit(**_NB_OPTS)

    @_intrinsic
    def _nb_stack_f8(typingctx, n):
        """Pointer to ``n`` (a literal int) float64 on the calling function's stack.

        ``numba.carray(_nb_stack_f8(8), 8)`` is an array without reference
        counting that LLVM can keep in registers (a small heap array would be
        stored and reloaded at every update).
        """
        if not isinstance(n, _nbtypes.IntegerLiteral):
            return None
        size = n.literal_value

        def codegen(context, builder, sig, args):
            return _cgutils.alloca_once(builder, context.get_value_type(_nbtypes.float64), size=size)

        return _nbtypes.CPointer(_nbtypes.float64)(n), codegen

    @_intrinsic
    def _nb_stack_i8(typingctx, n):
        """Pointer to ``n`` (a literal int) int64 on the calling function's stack
        (as ``_nb_stack_f8``; no heap array, no reference counting)."""
        if not isinstance(n, _nbtypes.IntegerLiteral):
            return None
        size = n.literal_value

        def codegen(context, builder, sig, args):
            return _cgutils.alloca_once(builder, context.get_value_type(_nbtypes.int64), size=size)

        return _nbtypes.CPointer(_nbtypes.int64)(n), codegen

    # ----------------------------------------------------------------------
    # vectors of 8 or 16 float64 (8: one AVX-512 register, 16: two)
    # ----------------------------------------------------------------------
    # LLVM does not vectorise the per-pixel loops of the active-set method on
    # its own (nor the register-blocked band sums), so the fast kernels below
    # write them with these: numba types for the LLVM vectors <8 x double>
    # (8 pixels, or a pixel's variables for K <= 8) and <16 x double> (a
    # pixel's variables for K <= 16; LLVM splits each operation over two
    # registers), and intrinsics for the few operations they need. The
    # arithmetic, compares, selects and reductions take either width (all
    # operands alike); loads and splats have one function per width. Lane
    # masks are int64 bit masks (bit i = lane i), the same form as the
    # passive-set codes.

    class _F8xNType(_nbtypes.Type):
        def __init__(self, n):
            self.n = n
            super().__init__(name=f"qdquant_f8x{n}")

    _f8x8 = _F8xNType(8)
    _f8x16 = _F8xNType(16)
    _V8 = _ir.VectorType(_ir.DoubleType(), 8)

    @_register_model(_F8xNType)
    class _F8xNModel(_models.PrimitiveModel):
        def __init__(self, dmm, fe_type):
            super().__init__(dmm, fe_type, _ir.VectorType(_ir.DoubleType(), fe_type.n))

    def _llvm_fn(builder, name, ret, args):
        return _cgutils.get_or_insert_function(builder.module, _ir.FunctionType(ret, args), name)

    def _item_ptr(context, builder, aryty, ary, inds):
        arr = context.make_array(aryty)(context, builder, ary)
        return _cgutils.get_item_pointer2(context, builder, data=arr.data,
                                          shape=_cgutils.unpack_tuple(builder, arr.shape),
                                          strides=_cgutils.unpack_tuple(builder, arr.strides),
                                          layout=aryty.layout, inds=inds, wraparound=False)

    def _is_f8_vector(*tys):
        """All of ``tys`` are the same vector type."""
        return isinstance(tys[0], _F8xNType) and all(t == tys[0] for t in tys)

    def _vty(ty):
        """The LLVM type of a vector type."""
        return _ir.VectorType(_ir.DoubleType(), ty.n)

    def _v_loader(vt, doc):
        @_intrinsic
        def load(typingctx, arr, i):
            if not (isinstance(arr, _nbtypes.Array) and arr.ndim == 1 and arr.dtype == _nbtypes.float64):
                return None

            def codegen(context, builder, sig, args):
                p = _item_ptr(context, builder, sig.args[0], args[0], [args[1]])
                return builder.load(builder.bitcast(p, _vty(vt).as_pointer()), align=8)

            return vt(arr, _nbtypes.intp), codegen

        load.__doc__ = doc
        return load

    _v_load = _v_loader(_f8x8, "``arr[i:i + 8]`` (1-D float64 array) as a vector.")
    _v16_load = _v_loader(_f8x16, "``arr[i:i + 16]`` (1-D float64 array) as a vector.")

    @_intrinsic
    def _v_store(typingctx, arr, i, v):
        """``arr[i:i + n] = v`` (1-D float64 array, a vector of n)."""
        if not (isinstance(arr, _nbtypes.Array) and arr.ndim == 1 and arr.dtype == _nbtypes.float64
                and _is_f8_vector(v)):
            return None

        def codegen(context, builder, sig, args):
            p = _item_ptr(context, builder, sig.args[0], args[0], [args[1]])
            builder.store(args[2], builder.bitcast(p, _vty(sig.args[2]).as_pointer()), align=8)
            return context.get_dummy_value()

        return _nbtypes.none(arr, _nbtypes.intp, v), codegen

    @_intrinsic
    def _v_load_row(typingctx, arr, c, y, x):
        """``arr[c, y, x:x + 8]`` of a 3-D array, converted to float64.

        The last axis must have unit stride (checked by the caller).
        """
        if not (isinstance(arr, _nbtypes.Array) and arr.ndim == 3
                and isinstance(arr.dtype, (_nbtypes.Integer, _nbtypes.Float))):
            return None
        dt = arr.dtype

        def codegen(context, builder, sig, args):
            p = _item_ptr(context, builder, sig.args[0], args[0], list(args[1:]))
            ety = context.get_data_type(dt)
            vt = _ir.VectorType(ety, 8)
            v = builder.load(builder.bitcast(p, vt.as_pointer()), align=context.get_abi_alignment(ety))
            if isinstance(dt, _nbtypes.Float):
                return v if dt.bitwidth == 64 else builder.fpext(v, _V8)
            return builder.sitofp(v, _V8) if dt.signed else builder.uitofp(v, _V8)

        return _f8x8(arr, _nbtypes.intp, _nbtypes.intp, _nbtypes.intp), codegen

    @_intrinsic
    def _v_store_row_f4(typingctx, arr, c, y, x, v):
        """``arr[c, y, x:x + 8] = float32(v)`` (3-D float32 array, unit last stride)."""
        if not (isinstance(arr, _nbtypes.Array) and arr.ndim == 3 and arr.dtype == _nbtypes.float32
                and v == _f8x8):
            return None

        def codegen(context, builder, sig, args):
            p = _item_ptr(context, builder, sig.args[0], args[0], list(args[1:4]))
            vt = _ir.VectorType(_ir.FloatType(), 8)
            builder.store(builder.fptrunc(args[4], vt), builder.bitcast(p, vt.as_pointer()), align=4)
            return context.get_dummy_value()

        return _nbtypes.none(arr, _nbtypes.intp, _nbtypes.intp, _nbtypes.intp, v), codegen

    @_intrinsic
    def _v_dataptr(typingctx, arr):
        """Data pointer of an array, for ``_v_loadp``: no reference counting
        (an array passed to an inlined function is counted at every call)."""
        if not isinstance(arr, _nbtypes.Array):
            return None

        def codegen(context, builder, sig, args):
            return context.make_array(sig.args[0])(context, builder, args[0]).data

        return _nbtypes.CPointer(arr.dtype)(arr), codegen

    def _v_ploader(vt, doc):
        @_intrinsic
        def loadp(typingctx, p, i):
            if not (isinstance(p, _nbtypes.CPointer) and p.dtype == _nbtypes.float64):
                return None

            def codegen(context, builder, sig, args):
                q = builder.gep(args[0], [args[1]])
                return builder.load(builder.bitcast(q, _vty(vt).as_pointer()), align=8)

            return vt(p, _nbtypes.intp), codegen

        loadp.__doc__ = doc
        return loadp

    _v_loadp = _v_ploader(_f8x8, "``p[i:i + 8]`` (float64 pointer) as a vector.")
    _v16_loadp = _v_ploader(_f8x16, "``p[i:i + 16]`` (float64 pointer) as a vector.")

    def _v_splatter(vt, doc):
        @_intrinsic
        def splat(typingctx, x):
            if not isinstance(x, _nbtypes.Float):
                return None

            def codegen(context, builder, sig, args):
                val = context.cast(builder, args[0], sig.args[0], _nbtypes.float64)
                undef = _ir.Constant(_vty(vt), _ir.Undefined)
                v = builder.insert_element(undef, val, _ir.Constant(_ir.IntType(32), 0))
                mask = _ir.Constant(_ir.VectorType(_ir.IntType(32), vt.n), [0] * vt.n)
                return builder.shuffle_vector(v, undef, mask)

            return vt(x), codegen

        splat.__doc__ = doc
        return splat

    _v_splat = _v_splatter(_f8x8, "Vector of 8 copies of the float ``x``.")
    _v16_splat = _v_splatter(_f8x16, "Vector of 16 copies of the float ``x``.")

    def _v_binop(name, doc):
        @_intrinsic
        def op(typingctx, a, b):
            if not _is_f8_vector(a, b):
                return None

            def codegen(context, builder, sig, args):
                return getattr(builder, name)(args[0], args[1])

            return a(a, b), codegen

        op.__doc__ = doc
        return op

    _v_add = _v_binop("fadd", "a + b")
    _v_sub = _v_binop("fsub", "a - b")
    _v_mul = _v_binop("fmul", "a * b")
    _v_div = _v_binop("fdiv", "a / b")

    def _v_unary(llvm_name, doc):
        @_intrinsic
        def op(typingctx, a):
            if not _is_f8_vector(a):
                return None

            def codegen(context, builder, sig, args):
                vt = _vty(sig.args[0])
                fn = _llvm_fn(builder, f"llvm.{llvm_name}.v{vt.count}f64", vt, [vt])
                return builder.call(fn, list(args))

            return a(a), codegen

        op.__doc__ = doc
        return op

    _v_abs = _v_unary("fabs", "|a|")
    _v_sqrt = _v_unary("sqrt", "sqrt(a)")

    @_intrinsic
    def _v_fma(typingctx, a, b, c):
        """``a * b + c``, rounded once."""
        if not _is_f8_vector(a, b, c):
            return None

        def codegen(context, builder, sig, args):
            vt = _vty(sig.args[0])
            return builder.call(_llvm_fn(builder, f"llvm.fma.v{vt.count}f64", vt, [vt] * 3), list(args))

        return a(a, b, c), codegen

    @_intrinsic
    def _v_round_f4(typingctx, a):
        """``float64(float32(a))``, lane by lane."""
        if not _is_f8_vector(a):
            return None

        def codegen(context, builder, sig, args):
            vt = _vty(sig.args[0])
            return builder.fpext(builder.fptrunc(args[0], _ir.VectorType(_ir.FloatType(), vt.count)), vt)

        return a(a), codegen

    def _v_compare(op, doc):
        @_intrinsic
        def cmp(typingctx, a, b):
            if not _is_f8_vector(a, b):
                return None

            def codegen(context, builder, sig, args):
                m = builder.fcmp_ordered(op, args[0], args[1])
                return builder.zext(builder.bitcast(m, _ir.IntType(sig.args[0].n)), _ir.IntType(64))

            return _nbtypes.int64(a, b), codegen

        cmp.__doc__ = doc
        return cmp

    _v_gt = _v_compare(">", "Bit mask of the lanes where a > b (False where NaN)")
    _v_lt = _v_compare("<", "Bit mask of the lanes where a < b (False where NaN)")
    _v_le = _v_compare("<=", "Bit mask of the lanes where a <= b (False where NaN)")
    _v_eq = _v_compare("==", "Bit mask of the lanes where a == b (False where NaN)")

    @_intrinsic
    def _v_select(typingctx, m, a, b):
        """Lane i: ``a[i]`` where bit i of the integer ``m`` is set, else ``b[i]``."""
        if not (isinstance(m, _nbtypes.Integer) and _is_f8_vector(a, b)):
            return None

        def codegen(context, builder, sig, args):
            n = sig.args[1].n
            mi = builder.trunc(context.cast(builder, args[0], sig.args[0], _nbtypes.int64), _ir.IntType(n))
            return builder.select(builder.bitcast(mi, _ir.VectorType(_ir.IntType(1), n)), args[1], args[2])

        return a(m, a, b), codegen

    def _v_reduce(op, doc):
        @_intrinsic
        def red(typingctx, v):
            if not _is_f8_vector(v):
                return None

            def codegen(context, builder, sig, args):
                x = args[0]
                n = sig.args[0].n
                s = 1
                while s < n:  # butterfly: the result in every lane
                    idx = _ir.Constant(_ir.VectorType(_ir.IntType(32), n), [i ^ s for i in range(n)])
                    other = builder.shuffle_vector(x, x, idx)
                    x = builder.select(builder.fcmp_ordered(op, other, x), other, x)
                    s *= 2
                return x

            return v(v), codegen

        red.__doc__ = doc
        return red

    _v_max = _v_reduce(">", "The largest lane, in every lane (no NaN lanes)")
    _v_min = _v_reduce("<", "The smallest lane, in every lane (no NaN lanes)")

    def _transpose8x8(builder, rows):
        """The 8 x 8 matrix of 8 <8 x double> rows, transposed (a list of rows)."""
        mty = _ir.VectorType(_ir.IntType(32), 8)
        s = 1
        while s < 8:  # butterfly: swap the off-diagonal s x s blocks
            new = list(rows)
            for r in range(8):
                if r & s:
                    continue
                lo = [ln if not ln & s else ln - s + 8 for ln in range(8)]
                hi = [ln + s if not ln & s else ln + 8 for ln in range(8)]
                new[r] = builder.shuffle_vector(rows[r], rows[r + s], _ir.Constant(mty, lo))
                new[r + s] = builder.shuffle_vector(rows[r], rows[r + s], _ir.Constant(mty, hi))
            rows = new
            s *= 2
        return rows

    def _v_permuter(load_at, store_at, doc):
        """An intrinsic ``(arr, i)`` that loads the 8-lane rows at ``arr[i + load_at[r]]``,
        transposes each group of 8 and stores the rows to ``arr[i + store_at[r]]``, in place."""

        @_intrinsic
        def permute(typingctx, arr, i):
            if not (isinstance(arr, _nbtypes.Array) and arr.ndim == 1 and arr.dtype == _nbtypes.float64):
                return None

            def codegen(context, builder, sig, args):
                p = _item_ptr(context, builder, sig.args[0], args[0], [args[1]])

                def ptr(off):
                    q = builder.gep(p, [_ir.Constant(_ir.IntType(64), off)])
                    return builder.bitcast(q, _V8.as_pointer())

                rows = [builder.load(ptr(off), align=8) for off in load_at]
                out = []
                for g in range(0, len(rows), 8):
                    out += _transpose8x8(builder, rows[g:g + 8])
                for off, row in zip(store_at, out):
                    builder.store(row, ptr(off), align=8)
                return context.get_dummy_value()

            return _nbtypes.none(arr, _nbtypes.intp), codegen

        permute.__doc__ = doc
        return permute

    _v_transpose = _v_permuter(range(0, 64, 8), range(0, 64, 8),
                               "Transpose the 8 x 8 row-major block ``arr[i:i + 64]`` in place.")
    # a block of 8 pixels x 16 variables: rows 0-7 and 8-15 of the variable-
    # major form become lanes 0-7 and 8-15 of each pixel's row of 16
    _v_transpose16x8 = _v_permuter(
        range(0, 128, 8), [16 * p for p in range(8)] + [16 * p + 8 for p in range(8)],
        "``arr[i:i + 128]``, 16 rows of 8 (row r at 8 r), in place as 8 rows of 16 (row p at 16 p).")
    _v_transpose8x16 = _v_permuter(
        [16 * p for p in range(8)] + [16 * p + 8 for p in range(8)], range(0, 128, 8),
        "The inverse of ``_v_transpose16x8``.")

    @_intrinsic
    def _ctz(typingctx, x):
        """Index of the lowest set bit of ``x`` (64 for 0)."""
        if not isinstance(x, _nbtypes.Integer):
            return None

        def codegen(context, builder, sig, args):
            v = context.cast(builder, args[0], sig.args[0], _nbtypes.int64)
            fn = _llvm_fn(builder, "llvm.cttz.i64", _ir.IntType(64), [_ir.IntType(64), _ir.IntType(1)])
            return builder.call(fn, [v, _ir.Constant(_ir.IntType(1), 0)])

        return _nbtypes.int64(x), codegen

    # Hot loops index flat arrays directly: numba reference-counts array
    # views and the arrays passed to a call with atomic operations, which
    # would cost more than the arithmetic of one pixel.

    @_njit
    def _nb_chol_solve(g, b, pidx, m, chol, z):
        """Solve ``g[p, p] z = b[p]`` (p = pidx[:m]) by Cholesky; False if not PD."""
        for i in range(m):
            pi = pidx[i]
            for j in range(i + 1):
                pj = pidx[j]
                s = g[pi, pj]
                for q in range(j):
                    s -= chol[i, q] * chol[j, q]
                if i == j:
                    if not s > _CHOL_RTOL * g[pi, pi]:  # also catches NaN
                        return False
                    chol[i, i] = math.sqrt(s)
                else:
                    chol[i, j] = s / chol[j, j]
        for i in range(m):
            s = b[pidx[i]]
            for q in range(i):
                s -= chol[i, q] * z[q]
            z[i] = s / chol[i, i]
        for i in range(m - 1, -1, -1):
            s = z[i]
            for q in range(i + 1, m):
                s -= chol[q, i] * z[q]
            z[i] = s / chol[i, i]
        return True

    @_njit
    def _nb_inverse_table(g):
        """Inverse of ``g`` (_KP x _KP) restricted to every passive set, by Cholesky.

        ``table[code * _KP**2:][:_KP**2]`` is, for the passive set ``code``
        (bit i set: variable i passive), the inverse of ``g[p, p]`` embedded
        in a _KP x _KP matrix of zeros, row-major; ``ok[code]`` is False when
        ``g[p, p]`` is not numerically positive definite.
        """
        kp = _KP
        n = 1 << kp
        table = np.zeros(n * kp * kp)
        ok = np.ones(n, np.bool_)
        pidx = np.empty(kp, np.intp)
        chol = np.empty((kp, kp))
        z = np.empty(kp)
        e = np.zeros(kp)
        for code in range(1, n):
            m = 0
            for i in range(kp):
                if (code >> i) & 1:
                    pidx[m] = i
                    m += 1
            for col in range(m):
                e[pidx[col]] = 1.0
                if not _nb_chol_solve(g, e, pidx, m, chol, z):
                    ok[code] = False
                e[pidx[col]] = 0.0
                for q in range(m):
                    table[code * kp * kp + pidx[q] * kp + pidx[col]] = z[q]
        return table, ok

    @_njit
    def _nb_lh_generic(g, b, d, code, tol, max_outer, pidx, chol, z):
        """Lawson-Hanson NNLS in Gram form (G, b), any K, from a feasible start.

        ``d`` (K,) is feasible: ``d > 0`` on the passive set ``code`` (bit
        mask), 0 elsewhere; it ends as the solution. Passive systems by
        Cholesky. Returns 0 when the KKT conditions hold, 1 when a passive
        system is not positive definite, 2 when ``max_outer`` outer steps did
        not converge.
        """
        k = g.shape[0]
        for _ in range(max_outer):
            # least squares on the passive set, stepping back to the feasible
            # region (each step drops at least one variable)
            for _inner in range(k + 1):
                m = 0
                for i in range(k):
                    if (code >> i) & 1:
                        pidx[m] = i
                        m += 1
                if m == 0:
                    break
                if not _nb_chol_solve(g, b, pidx, m, chol, z):
                    return 1
                alpha = np.inf
                imin = -1
                for q in range(m):
                    zq = z[q]
                    if zq <= 0.0:
                        i = pidx[q]
                        step = d[i] / (d[i] - zq)
                        if step < alpha:
                            alpha = step
                            imin = i
                if imin < 0:  # z is feasible
                    for q in range(m):
                        d[pidx[q]] = z[q]
                    break
                for q in range(m):
                    i = pidx[q]
                    v = d[i] + alpha * (z[q] - d[i])
                    if v <= 0.0 or i == imin:
                        v = 0.0
                        code &= ~(np.int64(1) << i)
                    d[i] = v
            # KKT: the gradient b - G d of every active variable must be <= tol
            jmax = -1
            wmax = tol
            for j in range(k):
                if not (code >> j) & 1:
                    s = b[j]
                    for i in range(k):
                        s -= g[j, i] * d[i]
                    if s > wmax:
                        wmax = s
                        jmax = j
            if jmax < 0:
                return 0
            code |= np.int64(1) << jmax
        return 2

    @_njit
    def _nb_nnls_generic(g, b, xu, x, max_outer, pidx, chol, z):
        """NNLS of one pixel from G (K, K), b and the unconstrained solution ``xu``.

        Warm start from the positive entries of ``xu``, a cold start from the
        empty passive set when that fails. Writes the solution to ``x[:K]``;
        returns the status (0 = converged).
        """
        k = g.shape[0]
        scale = 0.0
        code = np.int64(0)
        for i in range(k):
            scale = max(scale, abs(b[i]))
            if xu[i] > 0.0:
                code |= np.int64(1) << i
                x[i] = xu[i]
            else:
                x[i] = 0.0
        tol = _KKT_RTOL * k * (scale if scale > 0.0 else 1.0)
        status = _nb_lh_generic(g, b, x, code, tol, max_outer, pidx, chol, z)
        if status != 0:
            for i in range(k):
                x[i] = 0.0
            status = _nb_lh_generic(g, b, x, np.int64(0), tol, max_outer, pidx, chol, z)
        return status

    @_njit
    def _nb_nnls_tile(table, ok, g8, g, bt, xt, nt, n, neg, fast, max_outer, st, codes,
                      b, d, z, xu, pidx, chol):
        """NNLS of the pixels j < n of a tile with ``neg[j] > 0``.

        ``bt`` and ``xt`` are (rows, nt) flattened, rows >= K (and >= _KP on
        the fast path, padding rows zero): ``A.T @ y`` and, on entry, the
        unconstrained solutions, replaced by the NNLS solutions. ``st[j]``
        gets the status (0 converged, 1 not positive definite, 2 not
        converged; 0 for pixels not solved here). ``fast``: the table path
        (``table``, ``ok``, ``g8`` = G padded to _KP x _KP, flat); else
        :func:`_nb_nnls_generic` with ``g``. ``codes`` (nt,) int64 and
        ``b`` ... ``chol``: work arrays.

        Fast path, in two passes. First, without branches (so that the
        processor overlaps consecutive pixels): the least squares on the
        passive set of the positive unconstrained entries, and its KKT
        check; most pixels are done there. Then the Lawson-Hanson loop for
        the others, from where the first pass left them.
        """
        k = g.shape[0]
        if not fast:
            for j in range(n):
                st[j] = 0
                if neg[j] > 0.0:
                    for i in range(k):
                        b[i] = bt[i * nt + j]
                        xu[i] = xt[i * nt + j]
                    st[j] = _nb_nnls_generic(g, b, xu, d, max_outer, pidx, chol, z)
                    for i in range(k):
                        xt[i * nt + j] = d[i]
            return
        kp = _KP
        kk = kp * kp
        bs = _numba.carray(_nb_stack_f8(_KP), _KP)  # b, d, z of the pixel, in registers
        ds = _numba.carray(_nb_stack_f8(_KP), _KP)
        zs = _numba.carray(_nb_stack_f8(_KP), _KP)
        # pass 1: solve on the positive set P of the unconstrained solution
        pending = 0
        for j in range(n):
            st[j] = 0
            if not neg[j] > 0.0:
                continue
            scale = 0.0
            code = np.int64(0)
            for i in range(kp):
                bi = bt[i * nt + j]
                bs[i] = bi
                ab = abs(bi)
                scale = ab if ab > scale else scale
                v = xt[i * nt + j]
                pos = v > 0.0
                ds[i] = v if pos else 0.0
                code |= np.int64(pos) << i
            tol = _KKT_RTOL * k * (scale if scale > 0.0 else 1.0)
            base = code * kk
            for i in range(kp):
                s = 0.0
                for r in range(kp):
                    s += table[base + i * kp + r] * bs[r]
                zs[i] = s  # 0 outside P
            feasible = ok[code]
            for i in range(kp):
                feasible &= (zs[i] > 0.0) | (((code >> i) & 1) == 0)
            jmax = -1
            wmax = tol
            for jj in range(kp):
                s = bs[jj]
                for i in range(kp):
                    s -= g8[jj * kp + i] * zs[i]
                cand = (((code >> jj) & 1) == 0) & (s > wmax)
                wmax = s if cand else wmax
                jmax = jj if cand else jmax
            # done: z; else the LH state to go on from: z and P + {jmax}
            # when z is feasible, the positive part of the unconstrained
            # solution and P when not
            for i in range(kp):
                xt[i * nt + j] = zs[i] if feasible else ds[i]
            more = feasible & (jmax >= 0)
            codes[j] = code | (np.int64(more) << max(jmax, 0))
            todo = (not feasible) | more
            st[j] = 3 if todo else 0
            pending += todo
        if pending == 0:
            return
        # pass 2: Lawson-Hanson from there (then from the empty set if that fails)
        for j in range(n):
            if st[j] != 3:
                continue
            scale = 0.0
            for i in range(kp):
                bi = bt[i * nt + j]
                bs[i] = bi
                ab = abs(bi)
                scale = ab if ab > scale else scale
            tol = _KKT_RTOL * k * (scale if scale > 0.0 else 1.0)
            status = 2
            for attempt in range(2):
                code = codes[j] if attempt == 0 else np.int64(0)
                for i in range(kp):
                    ds[i] = xt[i * nt + j] if attempt == 0 else 0.0
                status = 2
                for _outer in range(max_outer):
                    # least squares on the passive set, stepping back to the
                    # feasible region (each step drops at least one variable)
                    for _inner in range(kp + 1):
                        if code == 0:
                            break
                        if not ok[code]:
                            status = 1
                            break
                        base = code * kk
                        for i in range(kp):
                            s = 0.0
                            for r in range(kp):
                                s += table[base + i * kp + r] * bs[r]
                            zs[i] = s  # 0 outside the passive set
                        alpha = np.inf
                        imin = -1
                        for i in range(kp):
                            zi = zs[i]
                            if (zi <= 0.0) & (((code >> i) & 1) == 1):
                                step = ds[i] / (ds[i] - zi)
                                if step < alpha:
                                    alpha = step
                                    imin = i
                        if imin < 0:  # z is feasible
                            for i in range(kp):
                                ds[i] = zs[i]
                            break
                        for i in range(kp):
                            p = ((code >> i) & 1) == 1
                            v = ds[i] + alpha * (zs[i] - ds[i])
                            drop = p & ((v <= 0.0) | (i == imin))
                            ds[i] = v if p & (not drop) else 0.0
                            code &= ~(np.int64(drop) << i)
                    if status == 1:
                        break
                    # KKT: the gradient b - G d of every active variable <= tol
                    jmax = -1
                    wmax = tol
                    for jj in range(kp):
                        s = bs[jj]
                        for i in range(kp):
                            s -= g8[jj * kp + i] * ds[i]
                        cand = (((code >> jj) & 1) == 0) & (s > wmax)
                        wmax = s if cand else wmax
                        jmax = jj if cand else jmax
                    if jmax < 0:
                        status = 0
                        break
                    code |= np.int64(1) << jmax
                if status == 0:
                    break
            for i in range(kp):
                xt[i * nt + j] = ds[i]
            st[j] = status

    @_njit
    def _nb_tiles(cube, a, gram, ginv, table, ok, g8, fast, offset, poisson, max_outer, t0, t1,
                  abund, resid, status):
        """Unmix tiles ``t0:t1`` of ``cube`` (C, H, W) into abund, resid, status.

        Tile t covers row ``t // ntx`` (ntx tiles a row), columns from
        ``(t % ntx) * _TILE``. Per-tile buffers are flat (rows of _TILE
        pixels), pixel loops innermost; a short tile is padded with zero
        pixels. Returns the number of pixels with a nonzero status and the
        number with a residual that is not finite (NaN or inf in the cube).
        """
        c_n, _, w_n = cube.shape
        k = a.shape[1]
        nt = _TILE
        ntx = (w_n + nt - 1) // nt
        rows = max(k, _KP)
        yt = np.zeros(c_n * nt)
        bt = np.zeros(rows * nt)
        xt = np.zeros(rows * nt)
        yy = np.empty(nt)
        rs = np.empty(nt)
        neg = np.empty(nt)
        gx = np.empty(nt)
        st = np.zeros(nt, np.int8)
        codes = np.zeros(nt, np.int64)
        b = np.zeros(rows)
        d = np.zeros(rows)
        z = np.zeros(rows)
        xu = np.zeros(rows)
        pidx = np.zeros(rows, np.intp)
        chol = np.zeros((rows, rows))
        # one pixel of a Poisson refit
        bp = np.empty(k)
        xp = np.empty(k)
        xo = np.empty(k)
        gp = np.empty((k, k))
        wc = np.empty(c_n)
        n_bad = 0
        n_nonfinite = 0
        for t in range(t0, t1):
            y = t // ntx
            x0 = (t % ntx) * nt
            n = min(nt, w_n - x0)
            # spectra, offset subtracted, and |y|^2
            for j in range(nt):
                yy[j] = 0.0
            for c in range(c_n):
                oc = offset[c]
                o = c * nt
                for j in range(n):
                    yt[o + j] = np.float64(cube[c, y, x0 + j]) - oc
                for j in range(n, nt):
                    yt[o + j] = 0.0
                for j in range(nt):
                    yy[j] += yt[o + j] * yt[o + j]
            # b = A.T y, four bands at a time
            for i in range(k):
                ob = i * nt
                for j in range(nt):
                    bt[ob + j] = 0.0
                c = 0
                while c + 4 <= c_n:
                    a0, a1, a2, a3 = a[c, i], a[c + 1, i], a[c + 2, i], a[c + 3, i]
                    o0, o1, o2, o3 = c * nt, (c + 1) * nt, (c + 2) * nt, (c + 3) * nt
                    for j in range(nt):
                        bt[ob + j] += (a0 * yt[o0 + j] + a1 * yt[o1 + j]) + (a2 * yt[o2 + j] + a3 * yt[o3 + j])
                    c += 4
                while c < c_n:
                    a0 = a[c, i]
                    o0 = c * nt
                    for j in range(nt):
                        bt[ob + j] += a0 * yt[o0 + j]
                    c += 1
            # unconstrained solution G^-1 b; count of negative entries
            for j in range(nt):
                neg[j] = 0.0
            for i in range(k):
                ox = i * nt
                for j in range(nt):
                    xt[ox + j] = 0.0
                for q in range(k):
                    gq = ginv[i, q]
                    ob = q * nt
                    for j in range(nt):
                        xt[ox + j] += gq * bt[ob + j]
                for j in range(nt):
                    neg[j] += 1.0 if xt[ox + j] < 0.0 else 0.0
            # pixels with a negative entry: active set
            _nb_nnls_tile(table, ok, g8, gram, bt, xt, nt, n, neg, fast, max_outer, st, codes,
                          b, d, z, xu, pidx, chol)
            if poisson:
                for j in range(n):
                    if st[j] != 0:
                        continue
                    # refit with weights 1 / max(e, floor), e = A x of the unweighted fit
                    emax = 0.0
                    for c in range(c_n):
                        e = 0.0
                        for i in range(k):
                            e += a[c, i] * xt[i * nt + j]
                        wc[c] = e
                        emax = max(emax, e)
                    floor = max(_POISSON_FLOOR_COUNTS, _POISSON_FLOOR_FRACTION * emax)
                    for c in range(c_n):
                        wc[c] = 1.0 / max(wc[c], floor)
                    for i in range(k):
                        s = 0.0
                        for c in range(c_n):
                            s += a[c, i] * wc[c] * yt[c * nt + j]
                        bp[i] = s
                        for q in range(i + 1):
                            s = 0.0
                            for c in range(c_n):
                                s += wc[c] * a[c, i] * a[c, q]
                            gp[i, q] = s
                            gp[q, i] = s
                        pidx[i] = i
                    if _nb_chol_solve(gp, bp, pidx, k, chol, xp):
                        negp = False
                        for i in range(k):
                            xo[i] = xp[i]
                            negp |= xp[i] < 0.0
                        if negp:
                            st[j] = _nb_nnls_generic(gp, bp, xp, xo, max_outer, pidx, chol, z)
                        for i in range(k):
                            xt[i * nt + j] = xo[i]
                    else:
                        st[j] = 1
            # outputs; the residual is that of the abundances as returned (float32)
            for j in range(n):
                status[y, x0 + j] = st[j]
                n_bad += st[j] != 0
            for i in range(k):
                ox = i * nt
                for j in range(n):
                    v = np.float32(xt[ox + j])
                    abund[i, y, x0 + j] = v
                    xt[ox + j] = np.float64(v)
                for j in range(n, nt):
                    xt[ox + j] = 0.0
            # Gram form: |y - A x|^2 = |y|^2 - x.(2 b - G x)
            for j in range(nt):
                rs[j] = yy[j]
            for i in range(k):
                for j in range(nt):
                    gx[j] = 0.0
                for q in range(k):
                    gq = gram[i, q]
                    ox = q * nt
                    for j in range(nt):
                        gx[j] += gq * xt[ox + j]
                ox = i * nt
                for j in range(nt):
                    rs[j] -= xt[ox + j] * (2.0 * bt[ox + j] - gx[j])
            for j in range(n):
                r = rs[j]
                if not r > _RSS_GRAM_MIN * yy[j]:  # small (or NaN): band by band
                    r = 0.0
                    for c in range(c_n):
                        s = yt[c * nt + j]
                        for i in range(k):
                            s -= a[c, i] * xt[i * nt + j]
                        r += s * s
                r = math.sqrt(r / c_n)
                n_nonfinite += not math.isfinite(r)
                resid[y, x0 + j] = np.float32(r)
        return n_bad, n_nonfinite

    @_numba.njit(parallel=True, **_NB_OPTS)
    def _nb_tiles_parallel(cube, a, gram, ginv, table, ok, g8, fast, offset, poisson, max_outer,
                           n_chunks, abund, resid, status):
        """``_nb_tiles`` over all tiles: ``n_chunks`` contiguous ranges of tiles in parallel."""
        ntiles = cube.shape[1] * ((cube.shape[2] + _TILE - 1) // _TILE)
        n_bad = 0
        n_nonfinite = 0
        for ch in _numba.prange(n_chunks):
            t0 = ntiles * ch // n_chunks
            t1 = ntiles * (ch + 1) // n_chunks
            counts = _nb_tiles(cube, a, gram, ginv, table, ok, g8, fast, offset, poisson, max_outer,
                               t0, t1, abund, resid, status)
            n_bad += counts[0]
            n_nonfinite += counts[1]
        return n_bad, n_nonfinite


    # ----------------------------------------------------------------------
    # the fast kernel: K <= _KP, unweighted, 8 pixels per vector
    # ----------------------------------------------------------------------
    # Same algorithm and tiles as _nb_tiles, written with the vectors above,
    # by groups of up to 64 pixels (8 blocks of 8) of a tile. For each block
    # the band sums (b = A.T y and |y|^2, one vector per endmember, kept in
    # registers over the bands; two blocks at a time when they are full),
    # the unconstrained solution, and at the end the outputs and the
    # residual, are computed 8 pixels at a time ("across pixels"). The
    # active-set steps of a pixel with a negative unconstrained entry work
    # on one vector of its _KP variables ("within a pixel"; b broadcast from
    # the block's rows, x transposed to one row a pixel), in rounds over the
    # group's unfinished pixels, each round without data-dependent branches
    # so that the processor overlaps the pixels: the least squares on the
    # positive set of the unconstrained solution and its KKT check, then,
    # while needed, adding every active variable whose gradient is above the
    # tolerance (not only the largest: fewer rounds, and a feasible point
    # that meets the KKT conditions is the problem's unique minimum whichever
    # way it was reached), solving, checking again. On typical data a step
    # back to the feasible region almost never follows an addition: a pixel
    # that needs one goes, from before the additions, to the general
    # Lawson-Hanson loop (one variable at a time), as one that is not done
    # after max_outer steps does. Each passive solve is one product with the
    # table of restricted inverses T and, for the gradient b - G z, one with
    # I - G T (independent of the first; table8 holds both, transposed: a
    # vector a column).

    _njit_inline = _numba.njit(inline="always", **_NB_OPTS)

    @_numba.njit(cache=True, nogil=True, fastmath=True)
    def _nb_apply_gain(x, gain, gain_offset, out):
        """``out = gain_offset + gain * (x - gain_offset)``, band by band, one read of ``x``."""
        c, h, w = x.shape
        for b in range(c):
            o = gain_offset[b]
            for i in range(h):
                for j in range(w):
                    out[b, i, j] = o + (np.float32(x[b, i, j]) - o) * gain[i, j]


    #: Blocks of 8 pixels per group of the fast kernel (64 pixels: the bit
    #: masks of the group's pixels are int64; the kernel's stack buffers are
    #: sized for it).
    _GROUP = 8

    @_njit_inline
    def _nb_solve8(tp, code, bp, jb):
        """``z = T b`` and the gradient ``w = b - G z`` on the passive set ``code``.

        ``tp``: pointer to table8; ``b[r] = bp[jb + 8 r]``. Sums in a tree
        (short dependency chains).
        """
        base = code * 128
        b0, b1, b2, b3 = (_v_splat(bp[jb]), _v_splat(bp[jb + 8]), _v_splat(bp[jb + 16]),
                          _v_splat(bp[jb + 24]))
        b4, b5, b6, b7 = (_v_splat(bp[jb + 32]), _v_splat(bp[jb + 40]), _v_splat(bp[jb + 48]),
                          _v_splat(bp[jb + 56]))
        z = _v_add(_v_add(_v_fma(_v_loadp(tp, base + 8), b1, _v_mul(_v_loadp(tp, base), b0)),
                          _v_fma(_v_loadp(tp, base + 24), b3, _v_mul(_v_loadp(tp, base + 16), b2))),
                   _v_add(_v_fma(_v_loadp(tp, base + 40), b5, _v_mul(_v_loadp(tp, base + 32), b4)),
                          _v_fma(_v_loadp(tp, base + 56), b7, _v_mul(_v_loadp(tp, base + 48), b6))))
        w = _v_add(_v_add(_v_fma(_v_loadp(tp, base + 72), b1, _v_mul(_v_loadp(tp, base + 64), b0)),
                          _v_fma(_v_loadp(tp, base + 88), b3, _v_mul(_v_loadp(tp, base + 80), b2))),
                   _v_add(_v_fma(_v_loadp(tp, base + 104), b5, _v_mul(_v_loadp(tp, base + 96), b4)),
                          _v_fma(_v_loadp(tp, base + 120), b7, _v_mul(_v_loadp(tp, base + 112), b6))))
        return z, w

    @_njit_inline
    def _nb_argmax8(w, cand):
        """Bit of the first lane of ``w`` with the largest value among the bits of ``cand``."""
        wm = _v_select(cand, w, _v_splat(-np.inf))
        return _ctz(_v_eq(wm, _v_max(wm)) & cand)

    @_njit_inline
    def _nb_lh8(tp, okp, bp, jb, bv, d, w, code, solve, tol, kmask, max_outer):
        """Lawson-Hanson on one pixel's vectors, as in _nb_nnls_tile's pass 2.

        From ``d`` feasible on the passive set ``code``; ``solve`` False: d is
        the least squares on ``code`` and ``w`` its gradient. ``bv``: b.
        Returns the status (0 converged, 1 not positive definite, 2 not
        converged) and the solution.
        """
        zero = _v_splat(0.0)
        tolv = _v_splat(tol)
        status = 2
        for _outer in range(max_outer):
            if solve:
                # least squares on the passive set, stepping back to the
                # feasible region (each step drops at least one variable)
                for _inner in range(_KP + 1):
                    if code == 0:
                        d = zero
                        w = bv
                        break
                    if okp[code] == 0:
                        status = 1
                        break
                    z, w = _nb_solve8(tp, code, bp, jb)
                    neg = _v_le(z, zero) & code
                    if neg == 0:
                        d = z
                        break
                    ratio = _v_div(d, _v_sub(d, z))
                    neg &= _v_eq(ratio, ratio)  # 0 / 0: not a step
                    if neg == 0:
                        d = z
                        break
                    ratio = _v_select(neg, ratio, _v_splat(np.inf))
                    alpha = _v_min(ratio)
                    imin = _ctz(_v_eq(ratio, alpha) & neg)
                    v = _v_fma(alpha, _v_sub(z, d), d)
                    code &= ~(code & (_v_le(v, zero) | (np.int64(1) << imin)))
                    d = _v_select(code, v, zero)
                if status == 1:
                    break
            solve = True
            # KKT: the gradient of every active variable must be <= tol
            cand = _v_gt(w, tolv) & ~code & kmask
            if cand == 0:
                status = 0
                break
            code |= np.int64(1) << _nb_argmax8(w, cand)
        return status, d

    @_njit
    def _nb_tiles8(cube, a8, ginv8, gs8, table8, ok8, offset, k, max_outer, t0, t1,
                   abund, resid3, status):
        """``_nb_tiles`` for K <= _KP without weights, 8 pixels per vector.

        ``cube`` with a unit stride along X. ``a8`` (C, _KP), ``ginv8`` (the
        inverse of G padded with an identity block) and ``gs8`` (the upper
        triangle of padded G, off-diagonal doubled) flat; ``table8`` as
        above, ``ok8`` uint8; ``resid3`` (1, H, W).
        """
        c_n, _, w_n = cube.shape
        nt = _TILE
        ntx = (w_n + nt - 1) // nt
        # per block of the group, 8 x 8: endmember-major (a row: 8 pixels);
        # xx pixel-major (transposed) while the active-set steps run.
        # 512 = 64 _GROUP (the size must be a literal)
        bb = _numba.carray(_nb_stack_f8(512), 512)  # b
        xx = _numba.carray(_nb_stack_f8(512), 512)  # x
        ww = _numba.carray(_nb_stack_f8(512), 512)  # gradient, pixel-major
        yyg = _numba.carray(_nb_stack_f8(64), 64)  # |y|^2
        tols = _numba.carray(_nb_stack_f8(64), 64)  # KKT tolerances
        tmp = _numba.carray(_nb_stack_f8(8), 8)
        for q in range(512):
            bb[q] = 0.0
            xx[q] = 0.0
            ww[q] = 0.0
        codes = np.zeros(64, np.int64)  # passive sets; bit 16: solve first
        tp = _v_dataptr(table8)
        okp = _v_dataptr(ok8)
        bp = _v_dataptr(bb)
        zero = _v_splat(0.0)
        kmask = (np.int64(1) << k) - 1
        yy_in_s7 = k < _KP  # |y|^2 in the padding's accumulator
        n_bad = 0
        n_nonfinite = 0
        for t in range(t0, t1):
            y = t // ntx
            x0 = (t % ntx) * nt
            n = min(nt, w_n - x0)
            for g0 in range(0, n, 8 * _GROUP):
                nblk = min(_GROUP, (n - g0 + 7) // 8)
                negg = 0  # the group's pixels with a negative unconstrained entry
                for blk in range(nblk):
                    j0 = g0 + 8 * blk
                    nv = min(8, n - j0)
                    xs = x0 + j0
                    ob = blk * 64
                    # b = A.T y and |y|^2, offset subtracted, one pass over the bands
                    if blk & 1 and nv == 8 and yy_in_s7:  # done with the block before
                        s0 = _v_load(bb, ob)
                        s1 = _v_load(bb, ob + 8)
                        s2 = _v_load(bb, ob + 16)
                        s3 = _v_load(bb, ob + 24)
                        s4 = _v_load(bb, ob + 32)
                        s5 = _v_load(bb, ob + 40)
                        s6 = _v_load(bb, ob + 48)
                        s7 = zero
                        yy = _v_load(yyg, blk * 8)
                    elif blk + 1 < nblk and n - j0 >= 16 and yy_in_s7:  # two blocks
                        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = zero
                        u0 = u1 = u2 = u3 = u4 = u5 = u6 = u7 = zero
                        for c in range(c_n):
                            oc = _v_splat(offset[c])
                            yv = _v_sub(_v_load_row(cube, c, y, xs), oc)
                            yw = _v_sub(_v_load_row(cube, c, y, xs + 8), oc)
                            ac = c * _KP
                            al = _v_splat(a8[ac])
                            s0 = _v_fma(al, yv, s0)
                            u0 = _v_fma(al, yw, u0)
                            al = _v_splat(a8[ac + 1])
                            s1 = _v_fma(al, yv, s1)
                            u1 = _v_fma(al, yw, u1)
                            al = _v_splat(a8[ac + 2])
                            s2 = _v_fma(al, yv, s2)
                            u2 = _v_fma(al, yw, u2)
                            al = _v_splat(a8[ac + 3])
                            s3 = _v_fma(al, yv, s3)
                            u3 = _v_fma(al, yw, u3)
                            al = _v_splat(a8[ac + 4])
                            s4 = _v_fma(al, yv, s4)
                            u4 = _v_fma(al, yw, u4)
                            al = _v_splat(a8[ac + 5])
                            s5 = _v_fma(al, yv, s5)
                            u5 = _v_fma(al, yw, u5)
                            al = _v_splat(a8[ac + 6])
                            s6 = _v_fma(al, yv, s6)
                            u6 = _v_fma(al, yw, u6)
                            s7 = _v_fma(yv, yv, s7)
                            u7 = _v_fma(yw, yw, u7)
                        yy = s7
                        s7 = zero
                        _v_store(bb, ob + 64, u0)
                        _v_store(bb, ob + 72, u1)
                        _v_store(bb, ob + 80, u2)
                        _v_store(bb, ob + 88, u3)
                        _v_store(bb, ob + 96, u4)
                        _v_store(bb, ob + 104, u5)
                        _v_store(bb, ob + 112, u6)
                        _v_store(yyg, blk * 8 + 8, u7)
                    else:
                        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = yy = zero
                        for c in range(c_n):
                            if nv == 8:
                                yv = _v_load_row(cube, c, y, xs)
                            else:  # short last block of a row
                                for q in range(8):
                                    tmp[q] = np.float64(cube[c, y, xs + q]) if q < nv else 0.0
                                yv = _v_load(tmp, 0)
                            yv = _v_sub(yv, _v_splat(offset[c]))
                            ac = c * _KP
                            s0 = _v_fma(_v_splat(a8[ac]), yv, s0)
                            s1 = _v_fma(_v_splat(a8[ac + 1]), yv, s1)
                            s2 = _v_fma(_v_splat(a8[ac + 2]), yv, s2)
                            s3 = _v_fma(_v_splat(a8[ac + 3]), yv, s3)
                            s4 = _v_fma(_v_splat(a8[ac + 4]), yv, s4)
                            s5 = _v_fma(_v_splat(a8[ac + 5]), yv, s5)
                            s6 = _v_fma(_v_splat(a8[ac + 6]), yv, s6)
                            if yy_in_s7:
                                s7 = _v_fma(yv, yv, s7)
                            else:
                                yy = _v_fma(yv, yv, yy)
                                s7 = _v_fma(_v_splat(a8[ac + 7]), yv, s7)
                        if yy_in_s7:
                            yy = s7
                            s7 = zero
                    _v_store(bb, ob, s0)
                    _v_store(bb, ob + 8, s1)
                    _v_store(bb, ob + 16, s2)
                    _v_store(bb, ob + 24, s3)
                    _v_store(bb, ob + 32, s4)
                    _v_store(bb, ob + 40, s5)
                    _v_store(bb, ob + 48, s6)
                    _v_store(bb, ob + 56, s7)
                    _v_store(yyg, blk * 8, yy)
                    # unconstrained solution G^-1 b; pixels with a negative entry
                    negm = 0
                    for i in range(_KP):
                        s = zero
                        for q in range(_KP):
                            s = _v_fma(_v_splat(ginv8[i * _KP + q]), _v_load(bb, ob + q * 8), s)
                        _v_store(xx, ob + i * 8, s)
                        negm |= _v_lt(s, zero)
                    negm &= (np.int64(1) << nv) - 1
                    if negm != 0:
                        # KKT tolerance (A.T y units), relative to each pixel's scale, as in _fcnnls
                        scale = _v_abs(s0)
                        for i in range(1, _KP):
                            bi = _v_abs(_v_load(bb, ob + i * 8))
                            scale = _v_select(_v_gt(bi, scale), bi, scale)
                        scale = _v_select(_v_gt(scale, zero), scale, _v_splat(1.0))
                        _v_store(tols, blk * 8, _v_mul(_v_splat(_KKT_RTOL * k), scale))
                        _v_transpose(xx, ob)
                        negg |= negm << (8 * blk)
                if negg != 0:
                    # round 1: least squares on the positive set P of the
                    # unconstrained solution, KKT check
                    m = negg
                    pend = 0  # feasible, KKT not met: add a variable
                    gen = 0  # to the general loop
                    while m != 0:
                        p = _ctz(m)
                        m &= m - 1
                        o = (p >> 3) * 64 + (p & 7) * 8  # the pixel's row of xx, ww
                        jb = (p >> 3) * 64 + (p & 7)  # its column of bb
                        xu = _v_load(xx, o)
                        code = _v_gt(xu, zero) & kmask
                        z, w = _nb_solve8(tp, code, bp, jb)
                        feas = ((_v_le(z, zero) & code) == 0) & (okp[code] != 0)
                        kkt = (_v_gt(w, _v_splat(tols[p])) & ~code & kmask) == 0
                        _v_store(xx, o, _v_select(-np.int64(feas), z, _v_select(code, xu, zero)))
                        _v_store(ww, o, w)
                        codes[p] = code | (np.int64(not feas) << 16)
                        pend |= np.int64(feas & (not kkt)) << p
                        gen |= np.int64(not feas) << p
                    # further rounds: add every active variable whose gradient is
                    # above the tolerance
                    r = 1
                    while pend != 0 and r < max_outer:
                        m = pend
                        pend = 0
                        while m != 0:
                            p = _ctz(m)
                            m &= m - 1
                            o = (p >> 3) * 64 + (p & 7) * 8
                            jb = (p >> 3) * 64 + (p & 7)
                            w0 = _v_load(ww, o)
                            code0 = codes[p]
                            tolv = _v_splat(tols[p])
                            code = code0 | (_v_gt(w0, tolv) & ~code0 & kmask)
                            z, w = _nb_solve8(tp, code, bp, jb)
                            feas = ((_v_le(z, zero) & code) == 0) & (okp[code] != 0)
                            kkt = (_v_gt(w, tolv) & ~code & kmask) == 0
                            # not feasible: the general loop goes on from before the additions
                            fm = -np.int64(feas)
                            _v_store(xx, o, _v_select(fm, z, _v_load(xx, o)))
                            _v_store(ww, o, _v_select(fm, w, w0))
                            codes[p] = (code & fm) | (code0 & ~fm)
                            pend |= np.int64(feas & (not kkt)) << p
                            gen |= np.int64(not feas) << p
                        r += 1
                    gen |= pend
                    # the rest: Lawson-Hanson from there, then from the empty set
                    while gen != 0:
                        p = _ctz(gen)
                        gen &= gen - 1
                        o = (p >> 3) * 64 + (p & 7) * 8
                        jb = (p >> 3) * 64 + (p & 7)
                        for i in range(_KP):
                            tmp[i] = bb[jb + i * 8]
                        bv = _v_load(tmp, 0)
                        cf = codes[p]
                        st, d = _nb_lh8(tp, okp, bp, jb, bv, _v_load(xx, o), _v_load(ww, o), cf & 0xFFFF,
                                        (cf >> 16) != 0, tols[p], kmask, max_outer - r + 1)
                        if st != 0:
                            st, d = _nb_lh8(tp, okp, bp, jb, bv, zero, bv, 0, True, tols[p], kmask, max_outer)
                        _v_store(xx, o, d)
                        if st != 0:
                            status[y, x0 + g0 + p] = st
                            n_bad += 1
                for blk in range(nblk):
                    j0 = g0 + 8 * blk
                    nv = min(8, n - j0)
                    valid = (np.int64(1) << nv) - 1
                    xs = x0 + j0
                    ob = blk * 64
                    if (negg >> (8 * blk)) & 255:
                        _v_transpose(xx, ob)
                    # outputs; the residual is that of the abundances as returned (float32)
                    for i in range(k):
                        xi = _v_round_f4(_v_load(xx, ob + i * 8))
                        _v_store(xx, ob + i * 8, xi)
                        if nv == 8:
                            _v_store_row_f4(abund, i, y, xs, xi)
                        else:
                            _v_store(tmp, 0, xi)
                            for q in range(nv):
                                abund[i, y, xs + q] = np.float32(tmp[q])
                    # Gram form: |y - A x|^2 = |y|^2 + x.(G x - 2 b), G x by its
                    # upper triangle (off-diagonal doubled)
                    yy = _v_load(yyg, blk * 8)
                    rs = yy
                    for i in range(_KP):
                        xi = _v_load(xx, ob + i * 8)
                        gx = _v_mul(_v_splat(gs8[i * _KP + i]), xi)
                        for q in range(i + 1, _KP):
                            gx = _v_fma(_v_splat(gs8[i * _KP + q]), _v_load(xx, ob + q * 8), gx)
                        bi = _v_load(bb, ob + i * 8)
                        rs = _v_fma(xi, _v_sub(gx, _v_add(bi, bi)), rs)
                    redo = ~_v_gt(rs, _v_mul(_v_splat(_RSS_GRAM_MIN), yy)) & valid
                    if redo != 0:  # small (or NaN): band by band
                        _v_store(tmp, 0, rs)
                        while redo != 0:
                            jj = _ctz(redo)
                            redo &= redo - 1
                            r2 = 0.0
                            for c in range(c_n):
                                e = np.float64(cube[c, y, xs + jj]) - offset[c]
                                for i in range(k):
                                    e -= a8[c * _KP + i] * xx[ob + i * 8 + jj]
                                r2 += e * e
                            tmp[jj] = r2
                        rs = _v_load(tmp, 0)
                    rms = _v_sqrt(_v_mul(rs, _v_splat(1.0 / c_n)))
                    bad = valid & ~_v_lt(_v_abs(rms), _v_splat(np.inf))
                    while bad != 0:
                        bad &= bad - 1
                        n_nonfinite += 1
                    if nv == 8:
                        _v_store_row_f4(resid3, 0, y, xs, rms)
                    else:
                        _v_store(tmp, 0, rms)
                        for q in range(nv):
                            resid3[0, y, xs + q] = np.float32(tmp[q])
        return n_bad, n_nonfinite

    @_numba.njit(parallel=True, **_NB_OPTS)
    def _nb_tiles8_parallel(cube, a8, ginv8, gs8, table8, ok8, offset, k, max_outer, n_chunks,
                            abund, resid3, status):
        """``_nb_tiles8`` over all tiles: ``n_chunks`` contiguous ranges of tiles in parallel."""
        ntiles = cube.shape[1] * ((cube.shape[2] + _TILE - 1) // _TILE)
        n_bad = 0
        n_nonfinite = 0
        for ch in _numba.prange(n_chunks):
            t0 = ntiles * ch // n_chunks
            t1 = ntiles * (ch + 1) // n_chunks
            counts = _nb_tiles8(cube, a8, ginv8, gs8, table8, ok8, offset, k, max_outer, t0, t1,
                                abund, resid3, status)
            n_bad += counts[0]
            n_nonfinite += counts[1]
        return n_bad, n_nonfinite

    # ----------------------------------------------------------------------
    # the 16-lane kernel: _KP < K <= _K16_MAX, unweighted
    # ----------------------------------------------------------------------
    # _nb_tiles8's algorithm, step for step, for more endmembers: a pixel's
    # variables are one vector of 16 lanes (two registers; lanes K.. are 0),
    # the across-pixel parts (band sums, unconstrained solution, outputs,
    # residual) still 8 pixels a vector. K is a compile-time constant: the
    # kernel is a closure over K (_tiles16_kernel) around a body inlined
    # into it, so that every loop over the endmembers has a constant trip
    # count, LLVM unrolls it and keeps the band-sum accumulators (a stack
    # array) in registers, and the band sums, the passive solves and the
    # residual cost K rows, not 16.
    #
    # The table of restricted inverses has 2**K entries of 2 K columns of 16
    # doubles (T, then I - G T; lanes K.. zero): 1.2 MB for K = 9, 12.6 MB
    # for K = 12; a pixel reads one entry per solve, and the passive sets
    # that occur on a slide are few. At K = 9 an active pixel takes 1.6
    # solves on average, each about 60 cycles against 36 vector FMAs (twice
    # the 8-lane kernel's: the 16-lane vectors are two registers whatever K).
    # Beyond _K16_MAX the scalar kernel factorises each passive system.

    @_njit
    def _nb_table16(g, table, ok):
        """Fill ``table`` (2**K * 32 K, zeros) and ``ok`` for ``g`` (K x K), K <= 16.

        Entry ``code`` (bit i set: variable i passive) starts at ``code * 32 K``:
        the K columns of T, the inverse of ``g[p, p]`` embedded in zeros (16
        lanes each, column r at ``16 r``), then the K columns of ``I - g T``.
        ``ok[code]`` is False where ``g[p, p]`` is not numerically positive
        definite (Cholesky, as _nb_inverse_table). (Columns packed K doubles
        apart, read 16 lanes at a time, were no faster.)
        """
        k = g.shape[0]
        kw = 32 * k
        pidx = np.empty(k, np.intp)
        chol = np.empty((k, k))
        z = np.empty(k)
        e = np.zeros(k)
        for code in range(1 << k):
            base = code * kw
            m = 0
            for i in range(k):
                if (code >> i) & 1:
                    pidx[m] = i
                    m += 1
            ok[code] = 1
            for col in range(m):
                e[pidx[col]] = 1.0
                if not _nb_chol_solve(g, e, pidx, m, chol, z):
                    ok[code] = 0
                e[pidx[col]] = 0.0
                for q in range(m):
                    table[base + 16 * pidx[col] + pidx[q]] = z[q]
            wb = base + 16 * k
            for r in range(k):
                for i in range(k):
                    s = 1.0 if i == r else 0.0
                    for q in range(m):
                        s -= g[i, pidx[q]] * table[base + 16 * r + pidx[q]]
                    table[wb + 16 * r + i] = s

    @_njit_inline
    def _nb_solve16(tp, code, bp, jb, k):
        """``z = T b`` and the gradient ``w = b - G z`` on the passive set ``code``.

        ``tp``: pointer to the table of _nb_table16; ``b[r] = bp[jb + 8 r]``,
        r < k. Even and odd r in two sums each (shorter dependency chains).
        """
        base = code * (32 * k)
        wb = base + 16 * k
        b0 = _v16_splat(bp[jb])
        b1 = _v16_splat(bp[jb + 8])
        z0 = _v_mul(_v16_loadp(tp, base), b0)
        w0 = _v_mul(_v16_loadp(tp, wb), b0)
        z1 = _v_mul(_v16_loadp(tp, base + 16), b1)
        w1 = _v_mul(_v16_loadp(tp, wb + 16), b1)
        for r in range(2, k):
            br = _v16_splat(bp[jb + 8 * r])
            if r & 1:
                z1 = _v_fma(_v16_loadp(tp, base + 16 * r), br, z1)
                w1 = _v_fma(_v16_loadp(tp, wb + 16 * r), br, w1)
            else:
                z0 = _v_fma(_v16_loadp(tp, base + 16 * r), br, z0)
                w0 = _v_fma(_v16_loadp(tp, wb + 16 * r), br, w0)
        return _v_add(z0, z1), _v_add(w0, w1)

    @_njit_inline
    def _nb_lh16(tp, okp, bp, jb, bv, d, w, code, solve, tol, kmask, max_outer, k):
        """_nb_lh8 on a pixel's 16-lane vectors (K = k endmembers)."""
        zero = _v16_splat(0.0)
        tolv = _v16_splat(tol)
        status = 2
        for _outer in range(max_outer):
            if solve:
                # least squares on the passive set, stepping back to the
                # feasible region (each step drops at least one variable)
                for _inner in range(k + 1):
                    if code == 0:
                        d = zero
                        w = bv
                        break
                    if okp[code] == 0:
                        status = 1
                        break
                    z, w = _nb_solve16(tp, code, bp, jb, k)
                    neg = _v_le(z, zero) & code
                    if neg == 0:
                        d = z
                        break
                    ratio = _v_div(d, _v_sub(d, z))
                    neg &= _v_eq(ratio, ratio)  # 0 / 0: not a step
                    if neg == 0:
                        d = z
                        break
                    ratio = _v_select(neg, ratio, _v16_splat(np.inf))
                    alpha = _v_min(ratio)
                    imin = _ctz(_v_eq(ratio, alpha) & neg)
                    v = _v_fma(alpha, _v_sub(z, d), d)
                    code &= ~(code & (_v_le(v, zero) | (np.int64(1) << imin)))
                    d = _v_select(code, v, zero)
                if status == 1:
                    break
            solve = True
            # KKT: the gradient of every active variable must be <= tol
            cand = _v_gt(w, tolv) & ~code & kmask
            if cand == 0:
                status = 0
                break
            wm = _v_select(cand, w, _v16_splat(-np.inf))
            code |= np.int64(1) << _ctz(_v_eq(wm, _v_max(wm)) & cand)
        return status, d

    #: Most endmembers of the 16-lane kernel (the table: 12.6 MB at 12).
    _K16_MAX = 12
    #: Its stack buffers, for up to _K16_MAX endmembers and a group of 64
    #: pixels: b (8 K a block of 8 pixels), x and the gradient (16 x 8 a block).
    _BB16 = 8 * _K16_MAX * _GROUP
    _XX16 = 128 * _GROUP
    _ACC16 = 8 * _K16_MAX

    @_njit_inline
    def _nb_tiles16_body(cube, ak, ginvk, gsk, table, ok, offset, gain3, hk, ath, hh, k, gained, max_outer,
                         t0, t1, abund, resid3, status):
        """``_nb_tiles8`` for _KP < K = k <= _K16_MAX, a pixel's variables 16 lanes a vector.

        ``k`` and ``gained`` must be compile-time constants (see
        _tiles16_kernel). ``ak`` (C, K), ``ginvk`` (the inverse of G) and
        ``gsk`` (the upper triangle of G, off-diagonal doubled) flat;
        ``table``, ``ok`` from _nb_table16 (ok as uint8).

        With ``gained``, the pixel fitted is ``g y + (1 - g) o`` (:func:`apply_gain`,
        ``g`` from ``gain3`` (1, H, W), unit stride along X), offset
        subtracted: with ``d = y - offset`` and ``h = o - offset`` (``hk``,
        (C,)) that is ``g d + (1 - g) h``, so its band sums follow from the
        raw pixel's: ``A.T b = g A.T d + (1 - g) A.T h`` (``ath``) and
        ``|b|^2 = g^2 |d|^2 + 2 g (1 - g) d.h + (1 - g)^2 |h|^2`` (``hh``),
        one more accumulator (``d.h``) in the pass over the bands and no
        corrected copy of the cube.
        """
        c_n, _, w_n = cube.shape
        nt = _TILE
        ntx = (w_n + nt - 1) // nt
        # per block of 8 pixels: bb k rows of 8 pixels (block stride 8 k); xx
        # 16 rows of 8 (stride 128; rows k.. stay 0), pixel-major (a pixel's
        # 16 lanes a row) while the active-set steps run; ww pixel-major
        bb = _numba.carray(_nb_stack_f8(_BB16), _BB16)
        xx = _numba.carray(_nb_stack_f8(_XX16), _XX16)
        ww = _numba.carray(_nb_stack_f8(_XX16), _XX16)
        acc = _numba.carray(_nb_stack_f8(_ACC16), _ACC16)  # band sums, in registers
        yyg = _numba.carray(_nb_stack_f8(64), 64)  # |y|^2
        tols = _numba.carray(_nb_stack_f8(64), 64)  # KKT tolerances
        tmp = _numba.carray(_nb_stack_f8(8), 8)
        bvt = _numba.carray(_nb_stack_f8(16), 16)  # a pixel's b, 16 lanes
        codes = _numba.carray(_nb_stack_i8(64), 64)  # passive sets; bit 16: solve first
        for q in range(_BB16):
            bb[q] = 0.0
        for q in range(_XX16):
            xx[q] = 0.0
            ww[q] = 0.0
        for q in range(16):
            bvt[q] = 0.0
        tp = _v_dataptr(table)
        okp = _v_dataptr(ok)
        bp = _v_dataptr(bb)
        zero = _v_splat(0.0)
        zero16 = _v16_splat(0.0)
        kmask = (np.int64(1) << k) - 1
        n_bad = 0
        n_nonfinite = 0
        for t in range(t0, t1):
            y = t // ntx
            x0 = (t % ntx) * nt
            n = min(nt, w_n - x0)
            for g0 in range(0, n, 8 * _GROUP):
                nblk = min(_GROUP, (n - g0 + 7) // 8)
                negg = 0  # the group's pixels with a negative unconstrained entry
                for blk in range(nblk):
                    j0 = g0 + 8 * blk
                    nv = min(8, n - j0)
                    xs = x0 + j0
                    ob = blk * 8 * k  # the block's b in bb
                    ox = blk * 128  # its x in xx
                    # b = A.T y and |y|^2, offset subtracted, one pass over the bands
                    for i in range(k):
                        _v_store(acc, 8 * i, zero)
                    yy = zero
                    dh = zero
                    for c in range(c_n):
                        if nv == 8:
                            yv = _v_load_row(cube, c, y, xs)
                        else:  # short last block of a row
                            for q in range(8):
                                tmp[q] = np.float64(cube[c, y, xs + q]) if q < nv else 0.0
                            yv = _v_load(tmp, 0)
                        yv = _v_sub(yv, _v_splat(offset[c]))
                        for i in range(k):
                            _v_store(acc, 8 * i, _v_fma(_v_splat(ak[c * k + i]), yv, _v_load(acc, 8 * i)))
                        yy = _v_fma(yv, yv, yy)
                        if gained:
                            dh = _v_fma(_v_splat(hk[c]), yv, dh)
                    if gained:  # the sums of the gained pixel g d + (1 - g) h
                        if nv == 8:
                            gv = _v_load_row(gain3, 0, y, xs)
                        else:
                            for q in range(8):
                                tmp[q] = np.float64(gain3[0, y, xs + q]) if q < nv else 1.0
                            gv = _v_load(tmp, 0)
                        qv = _v_sub(_v_splat(1.0), gv)
                        for i in range(k):
                            _v_store(acc, 8 * i, _v_fma(gv, _v_load(acc, 8 * i), _v_mul(qv, _v_splat(ath[i]))))
                        yy = _v_fma(gv, _v_fma(gv, yy, _v_mul(_v_add(qv, qv), dh)),
                                    _v_mul(_v_mul(qv, qv), _v_splat(hh)))
                    for i in range(k):
                        _v_store(bb, ob + 8 * i, _v_load(acc, 8 * i))
                    _v_store(yyg, blk * 8, yy)
                    # unconstrained solution G^-1 b; pixels with a negative entry
                    negm = 0
                    for i in range(k):
                        s = zero
                        for q in range(k):
                            s = _v_fma(_v_splat(ginvk[i * k + q]), _v_load(acc, 8 * q), s)
                        _v_store(xx, ox + 8 * i, s)
                        negm |= _v_lt(s, zero)
                    negm &= (np.int64(1) << nv) - 1
                    if negm != 0:
                        # KKT tolerance (A.T y units), relative to each pixel's scale, as in _fcnnls
                        scale = _v_abs(_v_load(acc, 0))
                        for i in range(1, k):
                            bi = _v_abs(_v_load(acc, 8 * i))
                            scale = _v_select(_v_gt(bi, scale), bi, scale)
                        scale = _v_select(_v_gt(scale, zero), scale, _v_splat(1.0))
                        _v_store(tols, blk * 8, _v_mul(_v_splat(_KKT_RTOL * k), scale))
                        _v_transpose16x8(xx, ox)
                        negg |= negm << (8 * blk)
                if negg != 0:
                    # round 1: least squares on the positive set P of the
                    # unconstrained solution, KKT check
                    m = negg
                    pend = 0  # feasible, KKT not met: add a variable
                    gen = 0  # to the general loop
                    while m != 0:
                        p = _ctz(m)
                        m &= m - 1
                        o = (p >> 3) * 128 + (p & 7) * 16  # the pixel's row of xx, ww
                        jb = (p >> 3) * 8 * k + (p & 7)  # its column of bb
                        xu = _v16_load(xx, o)
                        code = _v_gt(xu, zero16) & kmask
                        z, w = _nb_solve16(tp, code, bp, jb, k)
                        feas = ((_v_le(z, zero16) & code) == 0) & (okp[code] != 0)
                        kkt = (_v_gt(w, _v16_splat(tols[p])) & ~code & kmask) == 0
                        _v_store(xx, o, _v_select(-np.int64(feas), z, _v_select(code, xu, zero16)))
                        _v_store(ww, o, w)
                        codes[p] = code | (np.int64(not feas) << 16)
                        pend |= np.int64(feas & (not kkt)) << p
                        gen |= np.int64(not feas) << p
                    # further rounds: add every active variable whose gradient is
                    # above the tolerance
                    r = 1
                    while pend != 0 and r < max_outer:
                        m = pend
                        pend = 0
                        while m != 0:
                            p = _ctz(m)
                            m &= m - 1
                            o = (p >> 3) * 128 + (p & 7) * 16
                            jb = (p >> 3) * 8 * k + (p & 7)
                            w0 = _v16_load(ww, o)
                            code0 = codes[p]
                            tolv = _v16_splat(tols[p])
                            code = code0 | (_v_gt(w0, tolv) & ~code0 & kmask)
                            z, w = _nb_solve16(tp, code, bp, jb, k)
                            feas = ((_v_le(z, zero16) & code) == 0) & (okp[code] != 0)
                            kkt = (_v_gt(w, tolv) & ~code & kmask) == 0
                            # not feasible: the general loop goes on from before the additions
                            fm = -np.int64(feas)
                            _v_store(xx, o, _v_select(fm, z, _v16_load(xx, o)))
                            _v_store(ww, o, _v_select(fm, w, w0))
                            codes[p] = (code & fm) | (code0 & ~fm)
                            pend |= np.int64(feas & (not kkt)) << p
                            gen |= np.int64(not feas) << p
                        r += 1
                    gen |= pend
                    # the rest: Lawson-Hanson from there, then from the empty set
                    while gen != 0:
                        p = _ctz(gen)
                        gen &= gen - 1
                        o = (p >> 3) * 128 + (p & 7) * 16
                        jb = (p >> 3) * 8 * k + (p & 7)
                        for i in range(k):
                            bvt[i] = bb[jb + 8 * i]
                        bv = _v16_load(bvt, 0)
                        cf = codes[p]
                        st, d = _nb_lh16(tp, okp, bp, jb, bv, _v16_load(xx, o), _v16_load(ww, o),
                                         cf & 0xFFFF, (cf >> 16) != 0, tols[p], kmask, max_outer - r + 1, k)
                        if st != 0:
                            st, d = _nb_lh16(tp, okp, bp, jb, bv, zero16, bv, 0, True, tols[p], kmask,
                                             max_outer, k)
                        _v_store(xx, o, d)
                        if st != 0:
                            status[y, x0 + g0 + p] = st
                            n_bad += 1
                for blk in range(nblk):
                    j0 = g0 + 8 * blk
                    nv = min(8, n - j0)
                    valid = (np.int64(1) << nv) - 1
                    xs = x0 + j0
                    ob = blk * 8 * k
                    ox = blk * 128
                    if (negg >> (8 * blk)) & 255:
                        _v_transpose8x16(xx, ox)
                    # outputs; the residual is that of the abundances as returned (float32)
                    for i in range(k):
                        xi = _v_round_f4(_v_load(xx, ox + 8 * i))
                        _v_store(xx, ox + 8 * i, xi)
                        if nv == 8:
                            _v_store_row_f4(abund, i, y, xs, xi)
                        else:
                            _v_store(tmp, 0, xi)
                            for q in range(nv):
                                abund[i, y, xs + q] = np.float32(tmp[q])
                    # Gram form: |y - A x|^2 = |y|^2 + x.(G x - 2 b), G x by its
                    # upper triangle (off-diagonal doubled)
                    yy = _v_load(yyg, blk * 8)
                    rs = yy
                    for i in range(k):
                        xi = _v_load(xx, ox + 8 * i)
                        gx = _v_mul(_v_splat(gsk[i * k + i]), xi)
                        for q in range(i + 1, k):
                            gx = _v_fma(_v_splat(gsk[i * k + q]), _v_load(xx, ox + 8 * q), gx)
                        bi = _v_load(bb, ob + 8 * i)
                        rs = _v_fma(xi, _v_sub(gx, _v_add(bi, bi)), rs)
                    redo = ~_v_gt(rs, _v_mul(_v_splat(_RSS_GRAM_MIN), yy)) & valid
                    if redo != 0:  # small (or NaN): band by band
                        _v_store(tmp, 0, rs)
                        while redo != 0:
                            jj = _ctz(redo)
                            redo &= redo - 1
                            r2 = 0.0
                            gj = np.float64(gain3[0, y, xs + jj]) if gained else 1.0
                            for c in range(c_n):
                                e = np.float64(cube[c, y, xs + jj]) - offset[c]
                                if gained:
                                    e = gj * e + (1.0 - gj) * hk[c]
                                for i in range(k):
                                    e -= ak[c * k + i] * xx[ox + 8 * i + jj]
                                r2 += e * e
                            tmp[jj] = r2
                        rs = _v_load(tmp, 0)
                    rms = _v_sqrt(_v_mul(rs, _v_splat(1.0 / c_n)))
                    bad = valid & ~_v_lt(_v_abs(rms), _v_splat(np.inf))
                    while bad != 0:
                        bad &= bad - 1
                        n_nonfinite += 1
                    if nv == 8:
                        _v_store_row_f4(resid3, 0, y, xs, rms)
                    else:
                        _v_store(tmp, 0, rms)
                        for q in range(nv):
                            resid3[0, y, xs + q] = np.float32(tmp[q])
        return n_bad, n_nonfinite

    _TILES16 = {}

    def _tiles16_kernel(k, gained=False):
        """The 16-lane kernel for ``k`` endmembers (compiled on first use, cached on disk),
        with a per-pixel gain when ``gained``.

        A closure over ``k`` and ``gained`` (numba's cache key of a closure
        adds the values it closes over), so that both are constants of the
        compiled code, around the inlined _nb_tiles16_body. There is no numba-parallel
        twin: its compilation (parfor passes over the inlined body) took
        10 s; _unmix_into_numba runs this one, which releases the GIL, on
        chunks of tiles from a thread pool instead.
        """
        gained = bool(gained)
        kern = _TILES16.get((k, gained))
        if kern is None:
            def nb_tiles16(cube, ak, ginvk, gsk, table, ok, offset, gain3, hk, ath, hh, max_outer, t0, t1,
                           abund, resid3, status):
                return _nb_tiles16_body(cube, ak, ginvk, gsk, table, ok, offset, gain3, hk, ath, hh, k, gained,
                                        max_outer, t0, t1, abund, resid3, status)

            kern = _TILES16[(k, gained)] = _njit(nb_tiles16)
        return kern


def _flat_plane(arr):
    """``arr`` (..., H, W) as a (..., 1, H*W) view when that needs no copy, else ``arr``."""
    h, w = arr.shape[-2:]
    if h > 1 and arr.strides[-2] == arr.strides[-1] * w:
        return arr.reshape(arr.shape[:-2] + (1, h * w))
    return arr


def _fast8_args(a, g8, table, ok):
    """Arrays of ``_nb_tiles8``: a8, ginv8, gs8, table8, ok8 (see there).

    ``g8``: G padded to _KP x _KP (flat), ``table``, ``ok``: its
    ``_nb_inverse_table``.
    """
    c, k = a.shape
    g8 = g8.reshape(_KP, _KP)
    a8 = np.zeros((c, _KP))
    a8[:, :k] = a
    ginv8 = np.linalg.inv(g8)
    gs8 = np.triu(g8) * (2.0 - np.eye(_KP))
    inv = table.reshape(-1, _KP, _KP)
    grad = np.eye(_KP) - g8 @ inv  # b -> b - G z
    table8 = np.concatenate([inv.transpose(0, 2, 1), grad.transpose(0, 2, 1)], axis=1)
    return (a8.ravel(), ginv8.ravel(), gs8.ravel(), np.ascontiguousarray(table8).ravel(),
            ok.astype(np.uint8))


_POOLS = {}


def _thread_pool(n):
    """A pool of ``n`` threads (made once per ``n``) for the kernels that release the GIL."""
    pool = _POOLS.get(n)
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor

        pool = _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="qdquant-unmix")
    return pool


#: Pixels per contiguous copy of an X-strided cube for the vector kernels.
_STRIDED_SLAB_PX = 1 << 18

#: ``[(key, arrays)]``, the last _fast16_args result (one item, replaced
#: whole: dask threads may read it while another replaces it), reused for
#: the blocks of a dask cube and the slabs of a strided one (the table of
#: K = 12 takes 8 ms).
_FAST16_LAST = [None]


def _fast16_args(a, gram, ginv):
    """Arrays of the 16-lane kernel: ak, ginvk, gsk, table, ok (see _nb_tiles16_body).

    The arrays are only read by the kernel; the last result is kept.
    """
    key = (a.shape, a.tobytes())
    last = _FAST16_LAST[0]
    if last is not None and last[0] == key:
        return last[1]
    k = a.shape[1]
    gs = np.triu(gram) * (2.0 - np.eye(k))
    n = (1 << k) * 32 * k
    buf = np.zeros(n + 8)
    off = (-buf.ctypes.data % 64) // 8  # 64-byte aligned: a table column is two cache lines
    table = buf[off:off + n]
    ok = np.zeros(1 << k, np.uint8)
    _nb_table16(gram, table, ok)
    out = (a.ravel(), ginv.ravel(), gs.ravel(), table, ok)
    _FAST16_LAST[0] = (key, out)
    return out


def _unmix_into_numba(cube, a, offset, weights, abund, resid, parallel=True, gain=None, gain_offset=None):
    """Unmix a numpy (C, Y, X) cube into preallocated outputs with the numba kernel.

    ``gain`` (Y, X), ``gain_offset`` (C,) (not None with a gain): fit
    ``apply_gain(cube, gain, gain_offset)``; the 16-lane kernel applies it in its pass over the
    bands, the others fit corrected slabs (:func:`_unmix_into_gained`).
    """
    c, h, w = cube.shape
    k = a.shape[1]
    lanes16 = _FAST_LH and _KP < k <= _K16_MAX and weights is None
    if gain is not None and not lanes16:
        _unmix_into_gained(cube, gain, gain_offset, a, offset, weights, abund, resid)
        return
    if np.dtype(cube.dtype) not in _NB_SUPPORTED or not cube.dtype.isnative:
        cube = cube.astype(_work_dtype(cube.dtype))
    if (cube.strides[-1] != cube.itemsize and weights is None and _FAST_LH and k <= _K16_MAX
            and h > 0 and w > 1):  # (for w = 1 numpy's contiguous copy may keep the stride)
        # The vector kernels load 8 neighbouring pixels at once. A copy of a
        # slab of rows costs a few ns a pixel, the scalar kernel (which reads
        # any strides) 4-5 times the 8-lane kernel's time and 10-12 times the
        # 16-lane one's; and such cubes are common: the pixels picked by
        # advanced indexing, b[:, idx] (library refinement), lie strided along X.
        rows = max(1, _STRIDED_SLAB_PX // w)
        for y0 in range(0, h, rows):
            y1 = min(h, y0 + rows)
            _unmix_into_numba(np.ascontiguousarray(cube[:, y0:y1]), a, offset, weights,
                              abund[:, y0:y1], resid[y0:y1], parallel=parallel,
                              gain=None if gain is None else gain[y0:y1], gain_offset=gain_offset)
        return
    gram = np.ascontiguousarray(a.T @ a)
    ginv = np.ascontiguousarray(np.linalg.inv(gram))
    fast = bool(_FAST_LH and k <= _KP)
    g8 = np.eye(_KP)
    if fast:
        g8[:k, :k] = gram
        table, ok = _nb_inverse_table(g8)
    else:
        table, ok = np.zeros(0), np.zeros(0, np.bool_)
    g8 = g8.ravel()
    off = np.zeros(c) if offset is None else np.ascontiguousarray(offset, dtype=np.float64)
    status = np.zeros((h, w), np.int8)
    args = (a, gram, ginv, table, ok, g8, fast, off, weights == "poisson", _LH_ITER_FACTOR * k + 1)
    raw = cube
    if w < _TILE // 4 and _flat_plane(cube).shape[-2] != 1:
        cube = np.ascontiguousarray(cube)  # narrow rows would make tiny tiles
    # the gain (1, H, W) and what the kernel adds for the gain's offset; inert without a gain
    if gain is None:
        gain3, hk = np.ones((1, 1, 1), np.float32), np.zeros(c)
    else:
        gain3 = np.ascontiguousarray(gain, dtype=np.float32)[None]
        hk = np.asarray(gain_offset, dtype=np.float64) - off
    views = [_flat_plane(v) for v in (cube, abund, resid[None], status[None], gain3)]
    if all(v.shape[-2] == 1 for v in views):  # one long row of pixels: full tiles
        cube_v, abund_v, resid_v, status_v, gain_v = views[0], views[1], views[2][0], views[3][0], views[4]
    else:  # tiles along each row, the last one short
        cube_v, abund_v, resid_v, status_v, gain_v = cube, abund, resid, status, gain3
    ntiles = cube_v.shape[1] * (-(-cube_v.shape[2] // _TILE))
    n_threads = _numba.get_num_threads() if parallel else 1
    n_chunks = min(ntiles, 4 * n_threads) if n_threads > 1 else 1
    unit = [v.strides[-1] == v.itemsize for v in (cube_v, abund_v, resid_v)]
    outs = (abund_v, resid_v[None], status_v)
    if gain is not None and not all(unit):  # (outputs that no caller of ours passes)
        _unmix_into_gained(raw, gain, gain_offset, a, offset, weights, abund, resid)
        return
    if fast and weights is None and all(unit):  # the vector kernel
        args8 = _fast8_args(a, g8, table, ok) + (off, k, _LH_ITER_FACTOR * k + 1)
        if n_chunks > 1:
            n_bad, n_nonfinite = _nb_tiles8_parallel(cube_v, *args8, n_chunks, *outs)
        else:
            n_bad, n_nonfinite = _nb_tiles8(cube_v, *args8, 0, ntiles, *outs)
    elif lanes16 and all(unit):  # the 16-lane one
        args16 = _fast16_args(a, gram, ginv) + (off, gain_v, hk, a.T @ hk, float(hk @ hk),
                                                _LH_ITER_FACTOR * k + 1)
        kern = _tiles16_kernel(k, gain is not None)
        if n_chunks > 1:
            bounds = [ntiles * ch // n_chunks for ch in range(n_chunks + 1)]
            counts = _thread_pool(n_threads).map(
                lambda t01: kern(cube_v, *args16, t01[0], t01[1], *outs), zip(bounds[:-1], bounds[1:]))
            n_bad, n_nonfinite = (sum(v) for v in zip(*counts))
        else:
            n_bad, n_nonfinite = kern(cube_v, *args16, 0, ntiles, *outs)
    elif n_chunks > 1:
        n_bad, n_nonfinite = _nb_tiles_parallel(cube_v, *args, n_chunks, abund_v, resid_v, status_v)
    else:
        n_bad, n_nonfinite = _nb_tiles(cube_v, *args, 0, ntiles, abund_v, resid_v, status_v)
    if n_nonfinite:
        raise _NonFiniteCube("cube contains NaN or inf pixel values")
    if n_bad:  # rare: not converged or not positive definite; numpy FC-NNLS
        bad = np.nonzero(status)
        b = np.asarray(cube[:, bad[0], bad[1]], dtype=np.float64)
        if gain is not None:
            go = np.asarray(gain_offset, dtype=np.float64)[:, None]
            b = go + np.asarray(gain, dtype=np.float64)[bad] * (b - go)
        x, rms = _unmix_slab(b, a, a, _SharedGram(gram), offset, weights)
        abund[:, bad[0], bad[1]] = x
        resid[bad] = rms


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def unmix(cube, spectra, *, offset=None, weights=None, gain=None, gain_offset=None):
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
    gain : None or (Y, X) array_like, optional
        A per-pixel multiplier of the signal (e.g. the inverse of a field-of-view
        shading profile): the cube fitted is ``gain_offset + gain * (cube -
        gain_offset)`` (:func:`apply_gain`), never as a corrected copy of the
        cube: the 16-lane kernel (9 to 12 endmembers) folds the gain into its
        band sums, the other kernels fit corrected slabs of rows made as the
        fit goes. A dask array for a dask cube is rechunked to the cube's
        chunks.
    gain_offset : None or (C,) array_like, optional
        The part of each band the gain leaves alone (the dark offset, which
        shading does not scale), counts; default zeros.

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
    The result equals ``scipy.optimize.nnls`` per pixel. With numba (the
    default), a compiled kernel reads each pixel once, computes ``A.T @ b``,
    the unconstrained solution and, where that has a negative entry, runs the
    Lawson-Hanson active-set algorithm [2]_ warm-started from its positive
    entries; everything in float64, the residual from the same pass. It runs
    on numba's threads for a numpy cube (on one thread per block for a dask
    cube). The first call for a cube dtype compiles the kernel (seconds;
    cached on disk by numba afterwards). Without numba: the fast combinatorial
    NNLS [1]_ in numpy (all pixels at once, pixels that share a passive set
    solved together; band sums in float32 for a non-float64 cube).
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
    if gain is not None:
        if tuple(gain.shape) != tuple(cube.shape[1:]):
            raise InputError(f"gain must have the cube's (Y, X) shape {cube.shape[1:]}, got {gain.shape}")
        gain_offset = np.zeros(c) if gain_offset is None else _as_offset(gain_offset, c)

    if isinstance(cube, da.Array):
        cube = cube.rechunk({0: -1})
        if gain is None:
            extra = ()
        else:
            extra = (da.asarray(gain).astype(np.float32)[None].rechunk(((1,),) + cube.chunks[1:]), gain_offset)
        out = da.map_blocks(
            _unmix_block, cube, a, offset, weights, *extra,
            dtype=np.float32,
            chunks=((k + 1,),) + cube.chunks[1:],
            meta=np.empty((0, 0, 0), np.float32),
        )
        return out[:k], out[k]

    cube = np.asarray(cube)
    _, h, w = cube.shape
    abund = np.empty((k, h, w), np.float32)
    resid = np.empty((h, w), np.float32)
    try:
        # NaN and inf are found in the pass (a non-finite residual), not by
        # a read of the cube of their own
        _unmix_into(cube, a, offset, weights, abund, resid,
                    gain=None if gain is None else np.asarray(gain, dtype=np.float32), gain_offset=gain_offset)
    except _NonFiniteCube:
        bad = np.argwhere(~np.isfinite(cube)) if np.issubdtype(cube.dtype, np.floating) else ()
        if len(bad):
            raise InputError(
                f"cube contains NaN or inf (first at band {bad[0][0]}, y {bad[0][1]}, x {bad[0][2]}); "
                f"shape {cube.shape}"
            ) from None
        _raise_if_overflows(cube)
        raise
    return abund, resid


def _raise_if_overflows(cube):
    """A clear error for finite values whose fit overflows float32 (abundances are float32)."""
    if not np.issubdtype(cube.dtype, np.floating):
        return
    huge = np.argwhere(np.abs(cube) > np.finfo(np.float32).max / 1e3)
    if len(huge):
        b, y, x = huge[0]
        raise InputError(
            f"cube value {float(cube[b, y, x]):.3g} at band {b}, y {y}, x {x} overflows the fit "
            f"(abundances are float32, at most {np.finfo(np.float32).max:.3g}); shape {cube.shape}"
        ) from None


def flat_columns(spectra):
    """(K,) bool: the columns of a (C, K) library that are flat (a dark offset, not an emitter)."""
    a = np.asarray(spectra, dtype=np.float64)
    return np.ptp(a, axis=0) <= 1e-9 * np.abs(a).max(axis=0)


def evenly_spaced(n, count):
    """``count`` (at most ``n``) evenly spaced indices of ``0 .. n - 1``, first and last included."""
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))


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
        picks = evenly_spaced(nby * nbx, 16)
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
    sample = np.asarray(sample)
    if sample.shape[1] == 0:
        raise InputError(f"cube has no pixels; shape {cube.shape}")
    if sample.dtype.kind == "f" and not np.isfinite(sample).all():
        raise InputError(f"cube contains NaN or inf; shape {cube.shape}")
    # np.percentile's linear interpolation between the two order statistics
    # around the rank, from one partition of the samples in their own dtype
    pos = percentile / 100.0 * (sample.shape[1] - 1)
    k = int(math.floor(pos))
    kth = sorted({k, min(k + 1, sample.shape[1] - 1)})
    if sample.dtype.kind in "ui" and sample.dtype.itemsize <= 2:  # a histogram: faster than a partition
        order = np.empty((c, len(kth)))
        for band, row in enumerate(sample):
            low = int(row.min()) if row.dtype.kind == "i" else 0
            ranks = np.cumsum(np.bincount(row.astype(np.int32) - low if low else row))
            order[band] = np.searchsorted(ranks, kth, side="right") + low
        lo, hi = order[:, 0], order[:, -1]
    else:
        part = np.partition(sample, kth, axis=1)
        lo, hi = part[:, kth[0]].astype(np.float64), part[:, kth[-1]].astype(np.float64)
    return lo + (pos - k) * (hi - lo)


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


def _shifted_many(spectrum, wl, shifts, widen=1.0, spline=None):
    """:func:`_shifted` for several shifts (and widening factors) at once, (T, C).

    One spline for all of them (``spline``: the spectrum's ``CubicSpline``
    over ``wl``, when the caller keeps one); a row with shift 0 and
    widening 1 is the spectrum itself.
    """
    if spline is None:
        from scipy.interpolate import CubicSpline

        spline = CubicSpline(wl, spectrum)
    shifts = np.atleast_1d(np.asarray(shifts, dtype=np.float64))
    widen = np.broadcast_to(np.asarray(widen, dtype=np.float64), shifts.shape)
    peak = wl[np.argmax(spectrum)]
    src = peak + (wl[None, :] - peak - shifts[:, None]) / widen[:, None]
    out = spline(np.clip(src, wl[0], wl[-1]))
    # beyond the band grid the end bands' slope continues (see _shifted)
    lo = spectrum[0] + (src - wl[0]) * (spectrum[1] - spectrum[0]) / (wl[1] - wl[0])
    hi = spectrum[-1] + (src - wl[-1]) * (spectrum[-1] - spectrum[-2]) / (wl[-1] - wl[-2])
    out = np.clip(np.where(src < wl[0], lo, np.where(src > wl[-1], hi, out)), 0.0, None)
    m = out.max(axis=1, keepdims=True)
    out = np.where(m > 0, out * (spectrum.max() / np.where(m > 0, m, 1.0)), spectrum[None, :])
    out[(shifts == 0) & (widen == 1.0)] = spectrum
    return out


def _shifted(spectrum, wl, shift, widen=1.0):
    """``spectrum`` (sampled at ``wl``) moved by ``shift`` nm and widened about its peak.

    Cubic-spline interpolation inside the band grid; beyond it (light that
    a shift brings in from outside the first or last band) the end bands'
    slope is continued linearly, since holding the edge value would make a
    steep edge, such as DAPI's at the blue end, several per cent too bright
    in the end band. Negative values are clipped; the column keeps its
    original maximum.
    """
    return _shifted_many(spectrum, wl, [shift], widen)[0]


class _OneColumnResidual:
    """Residual of pixels as one library column varies, their passive sets held.

    For pixels ``pixels`` (n, C), pixel-major, unmixed with library ``a``
    (C, K) into ``x`` (K, n), every pixel keeps its passive set P (its nonzero abundances,
    which include column ``j``) and is fitted by least squares on P. With
    Q = P without j, the residual of a pixel is its residual on Q less
    ``(y . a_perp)^2 / |a_perp|^2``, where ``a_perp`` is the trial column's
    part orthogonal to the other passive columns (Gram-Schmidt). Summed
    over the pixels sharing a passive set, that takes their scatter matrix
    ``S`` alone: ``a_perp' S a_perp``. So a trial costs O(groups x C^2),
    whatever the number of pixels. Near the NNLS solution the passive sets
    do not change with a small move of one column, and this is the NNLS
    residual; :func:`refine_library` re-solves NNLS between rounds.
    """

    def __init__(self, pixels, x, a, j):
        c, k = a.shape
        bits = np.int64(1) << np.arange(k, dtype=np.int64)
        code = bits @ (x > 0)
        if k <= 16:  # a radix sort
            code = code.astype(np.uint16)
        order = np.argsort(code, kind="stable")
        sorted_code = code[order]
        edges = np.flatnonzero(np.r_[True, sorted_code[1:] != sorted_code[:-1], True])
        codes = sorted_code[edges[:-1]]
        rows = pixels[order]  # a group's pixels: consecutive rows
        scatter = np.stack([rows[e0:e1].T @ rows[e0:e1] for e0, e1 in zip(edges[:-1], edges[1:])])
        others = (codes.astype(np.int64)[:, None] & bits) != 0  # (G, K): the passive set without j
        others[:, j] = False
        aq = a[None, :, :] * others[:, None, :]  # (G, C, K), columns outside Q zeroed
        gram = (a.T @ a) * (others[:, :, None] & others[:, None, :]) + np.eye(k) * ~others[:, None, :]
        # the projector on the complement of span(A_Q), per group
        self._proj = np.eye(c) - aq @ np.linalg.solve(gram, aq.transpose(0, 2, 1))
        self._scatter = scatter

    def __call__(self, columns):
        """Change of the summed residual for each trial column (T, C): a (T,) array, up to a constant."""
        perp = self._proj @ np.ascontiguousarray(columns.T)  # (G, C, T): M a
        explained = np.einsum("gct,gct->gt", perp, self._scatter @ perp)  # a' M S M a
        norm = np.einsum("gct,gct->gt", perp, perp)  # |M a|^2
        return -(explained / np.maximum(norm, 1e-300)).sum(axis=0)


def _argmin_fine(cost, lo, hi, n=41):
    """The minimiser of ``cost`` (vectorised over trial points) on [lo, hi]: a grid, then a parabola."""
    grid = np.linspace(lo, hi, n)
    values = cost(grid)
    i = int(np.argmin(values))
    if 0 < i < n - 1:  # vertex of the parabola through the best point and its neighbours
        y0, y1, y2 = values[i - 1 : i + 2]
        curv = y0 - 2 * y1 + y2
        if curv > 0:
            step = grid[1] - grid[0]
            return float(grid[i] + 0.5 * step * (y0 - y2) / curv)
    return float(grid[i])


def _sample_pixels(cube, n_pixels):
    """A strided subsample of at most about ``n_pixels`` pixels, (C, n) float64."""
    c, h, w = cube.shape
    stride = max(1, int(math.ceil(math.sqrt(h * w / n_pixels))))
    sub = cube[:, ::stride, ::stride]
    if isinstance(sub, da.Array):
        sub = sub.compute()
    return np.asarray(sub, dtype=np.float64).reshape(c, -1)


#: A fitted shift within this of ``max_shift_nm`` counts as on the bound, nm.
_AT_BOUND_NM = 0.05
#: Most pixels an endmember's shift is fitted on, per round.
_FIT_PIXELS = 8000


def refine_library(
    cube_sample,
    spectra,
    wavelengths_nm,
    *,
    max_shift_nm=6.0,
    max_widen=0.0,
    n_iter=2,
    offset=None,
    n_pixels=20000,
    min_share=0.5,
    min_pixels=200,
):
    """Adjust each endmember's spectrum to the slide, within a small shift.

    Each (non-flat) endmember k is modelled as its library spectrum moved by
    ``s_k`` nm (``|s_k| <= max_shift_nm``) and, optionally, widened by a
    factor ``w_k`` (``|w_k - 1| <= max_widen``) about its peak. The fit
    alternates NNLS unmixing of a subsample of pixels with, for each
    endmember in turn, a search of ``s_k`` (then ``w_k``) that minimises
    the residual of the pixels that endmember dominates: a 13-point grid
    over the bound (1 nm apart at 6 nm), then a fine grid and a parabola about its best point. Each
    trial keeps the pixels' passive sets from the round's NNLS, so its
    residual comes from the pixels' scatter matrices alone
    (:class:`_OneColumnResidual`, microseconds a trial), and the next
    round's NNLS updates them. An
    endmember whose best shift lies on the bound keeps its library spectrum:
    a real drift lies within the bound, and a fit pressed against it is the
    spectrum absorbing other light (a stain absent from the slide fitting
    leakage, an autofluorescence unlike the library's).

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
        Alternations of unmixing and per-endmember fits. Default 2 (a third
        moves no shift by more than ~0.1 nm on the messy cohort).
    offset : None, float, (C,) array or "auto", optional
        Dark offset, as for :func:`unmix`.
    n_pixels : int, optional
        Pixels in the (strided) subsample. Default 20000.
    min_share : float, optional
        A pixel is dominated by endmember k when k's share of its modelled
        signal is at least this. Default 0.5.
    min_pixels : int, optional
        An endmember is refined only when it dominates at least this many
        pixels of the subsample (default 200): a shift fitted on a handful
        of pixels (a HER2-null slide's few HER2-dominated pixels are noise
        and stray objects) moves the spectrum anywhere within the bound.

    Returns
    -------
    refined : (C, K) array or DataFrame
        The refined library, same kind as ``spectra``; flat endmembers and
        endmembers that dominate fewer than ``min_pixels`` pixels are unchanged.
    report : pandas.DataFrame
        Per endmember: ``endmember``, ``shift_nm``, ``widen``, ``at_bound``
        (its best shift was on the bound, so it kept the library's), ``n_pixels``
        (dominated pixels used), ``residual_before`` and ``residual_after``
        (RMS residual over those pixels, counts, with the library and with
        the refined spectra). ``report.attrs`` has ``residual_before`` and
        ``residual_after`` over the whole subsample.
    """
    import pandas as pd
    from scipy.interpolate import CubicSpline

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
    pixels = np.ascontiguousarray(b.T)  # pixel-major: the pixels of a fit are gathered as rows
    flat = flat_columns(a0)
    shift, widen = np.zeros(k), np.ones(k)
    at_bound = np.zeros(k, dtype=bool)
    a = a0.copy()

    def dominance(x, spectra):
        """(K, n) bool: endmember k gives at least min_share of the pixel's stain signal."""
        # flat (offset) endmembers are not signal
        contrib = x * np.where(flat, 0.0, spectra.sum(axis=0))[:, None]
        return (contrib >= min_share * np.maximum(contrib.sum(axis=0), 1e-300)) & (x > 0)

    splines = [CubicSpline(wl, a0[:, j]) for j in range(k)]

    def moved(j, shifts, widens):
        return _shifted_many(a0[:, j], wl, shifts, widens, spline=splines[j])

    for it in range(max(1, int(n_iter))):
        x, r = unmix(b[:, None, :], a)
        x = x[:, 0, :].astype(np.float64)
        if it == 0:  # the library's own fit, for the report
            x0, sq0 = x, r[0].astype(np.float64) ** 2 * c
        shares = dominance(x, a)
        for j in range(k):
            if flat[j]:
                continue
            sel = np.flatnonzero(shares[j])
            if sel.size < min_pixels:
                continue
            # A regular subset is enough to place the minimum (the residual is a
            # smooth function of the shift).
            sel = sel[:: -(-sel.size // _FIT_PIXELS)]
            residual = _OneColumnResidual(pixels[sel], x[:, sel], a, j)
            if max_shift_nm > 0:
                # a coarse grid finds the basin, a fine one about its best point the minimum
                grid = np.linspace(-max_shift_nm, max_shift_nm, 13)
                i = int(np.argmin(residual(moved(j, grid, widen[j]))))
                step = grid[1] - grid[0]
                lo, hi = max(-max_shift_nm, grid[i] - step), min(max_shift_nm, grid[i] + step)
                shift[j] = min(max(_argmin_fine(lambda s: residual(moved(j, s, widen[j])), lo, hi), lo), hi)
                # A best fit on the bound is not a drift the bound allows: the
                # spectrum is absorbing light of another kind (leakage on a
                # slide without the stain, off-library emitters), so keep the
                # library's.
                at_bound[j] = abs(shift[j]) >= max_shift_nm - min(_AT_BOUND_NM, 0.1 * max_shift_nm)
                if at_bound[j]:
                    shift[j], widen[j] = 0.0, 1.0
                    a[:, j] = a0[:, j]
                    continue
            if max_widen > 0:
                w = _argmin_fine(lambda w: residual(moved(j, np.full(len(w), shift[j]), w)),
                                 1 - max_widen, 1 + max_widen)
                widen[j] = min(max(w, 1 - max_widen), 1 + max_widen)
            a[:, j] = moved(j, shift[j], widen[j])[0]

    # report: the NNLS residual of every pixel with either library
    sq1 = unmix(b[:, None, :], a)[1][0].astype(np.float64) ** 2 * c
    shares0 = dominance(x0, a0)
    rows = []
    for j in range(k):
        sel = np.flatnonzero(shares0[j])
        if sel.size:
            before = math.sqrt(sq0[sel].sum() / (c * sel.size))
            after = math.sqrt(sq1[sel].sum() / (c * sel.size))
        else:
            before = after = float("nan")
        rows.append(dict(endmember=names[j], shift_nm=float(shift[j]), widen=float(widen[j]),
                         at_bound=bool(at_bound[j]), n_pixels=int(sel.size), residual_before=before,
                         residual_after=after))
    report = pd.DataFrame(rows)
    n = b.shape[1]
    report.attrs["residual_before"] = math.sqrt(sq0.sum() / (c * n))
    report.attrs["residual_after"] = math.sqrt(sq1.sum() / (c * n))
    if isinstance(spectra, pd.DataFrame):
        refined = frame.copy()
        refined[names] = a
        return refined, report
    return a, report


# ----------------------------------------------------------------------------
# residual QC: pixels the library cannot explain


def noise_model(cube, residual, *, n_bins: int = 32) -> tuple[float, float]:
    """Fit the residual expected from photon and read noise: ``residual² ≈ a·m + b``.

    ``m`` is a pixel's mean count over the bands. Shot noise makes the
    variance of each band grow linearly with its counts (``a`` = 1 / electrons
    per count, up to the fit's degrees of freedom) and read noise adds a
    constant ``b``. The line is fitted through the medians of residual² in
    quantile bins of ``m`` (robust to the pixels that fit badly) by the
    Theil–Sen estimator (robust to bins that are all poorly fitted, such as
    the brightest bins when an off-library object is the brightest thing on
    the slide).

    Parameters
    ----------
    cube : (C, Y, X) array
        Raw counts (a sample of the slide is enough).
    residual : (Y, X) array
        RMS residual of the fit of ``cube``, counts.

    Returns
    -------
    a, b : float
        Slope (counts) and intercept (counts²), both >= 0 (b > 0).
    """
    cube = np.asarray(cube, dtype=np.float64)
    residual = np.asarray(residual, dtype=np.float64)
    if cube.ndim != 3 or residual.shape != cube.shape[1:]:
        raise InputError(f"cube (C, Y, X) and residual (Y, X) must match, got {cube.shape} and {residual.shape}")
    mean = cube.reshape(cube.shape[0], -1).mean(axis=0)
    r2 = residual.ravel() ** 2
    edges = np.unique(np.quantile(mean, np.linspace(0, 1, n_bins + 1)))
    if len(edges) < 3:
        return 0.0, max(float(np.median(r2)), 1e-12)
    which = np.clip(np.searchsorted(edges, mean, side="right") - 1, 0, len(edges) - 2)
    order = np.argsort(which, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(which, minlength=len(edges) - 1))[:-1])
    groups = [g for g in groups if len(g) >= 20]
    centres = np.array([np.median(mean[g]) for g in groups])
    medians = np.array([np.median(r2[g]) for g in groups])
    if len(groups) < 2:
        return 0.0, max(float(medians.mean()), 1e-12)
    from scipy.stats import theilslopes

    a, b, _, _ = theilslopes(medians, centres)
    return max(float(a), 0.0), max(float(b), 1e-12)


def flag_poor_fit(cube, residual, noise: tuple[float, float], *, factor: float = 5.0):
    """Pixels whose residual is far above the noise expected from their counts.

    A pixel is flagged when ``residual > factor · sqrt(a·m + b)`` (see
    :func:`noise_model`): light the library cannot explain, such as red blood
    cells, lipofuscin or elastin with spectra outside the library. Such pixels
    are left out of every per-cell mean.

    Parameters
    ----------
    cube : (C, Y, X) numpy or dask array
        Raw counts.
    residual : (Y, X) numpy or dask array
        RMS residual, counts.
    noise : (float, float)
        ``(a, b)`` from :func:`noise_model`.
    factor : float
        How many expected standard deviations make a pixel poorly fitted.

    Returns
    -------
    flagged : (Y, X) bool array (dask when ``cube`` is dask)
    """
    a, b = noise

    def block(c, r):
        mean = np.asarray(c, dtype=np.float32).mean(axis=0)
        return np.asarray(r, dtype=np.float32) ** 2 > factor**2 * (a * mean + b)

    if isinstance(cube, da.Array) or isinstance(residual, da.Array):
        cube = da.asarray(cube)
        residual = da.asarray(residual).rechunk(cube.chunks[1:])
        return da.map_blocks(block, cube.rechunk({0: -1}), residual, drop_axis=0, dtype=bool)
    return block(cube, residual)


def broadband_probes(spectra, wavelengths_nm, *, width_nm: float = 45.0, spacing_nm: float = 40.0,
                     min_novelty: float = 0.05) -> np.ndarray:
    """Directions of broad emission that the library cannot reproduce.

    A bank of Gaussian emission spectra (standard deviation ``width_nm``,
    centres every ``spacing_nm`` across the bands), each with its part in
    the span of the library and of a flat spectrum (a dark offset) removed,
    scaled to unit norm. Light from a broad off-library emitter (lipofuscin,
    red blood cells, elastin) has a component along them; the library's own
    endmembers, whatever their abundances, have none.

    Parameters
    ----------
    spectra : (C, K) array_like
        The library.
    wavelengths_nm : (C,) array_like
        Band centres, nm.
    width_nm, spacing_nm : float
        Standard deviation and spacing of the probe spectra, nm (QD emission
        is about 10 nm wide in standard deviation; tissue emitters 40-100 nm).
    min_novelty : float
        Probes whose norm outside the library's span is below this fraction
        of their norm are dropped (the library already describes them).

    Returns
    -------
    (C, J) float64 array
        Unit-norm probe directions orthogonal to the library and to a flat
        spectrum; J may be 0.
    """
    a = _as_spectra(spectra)
    wl = np.asarray(wavelengths_nm, dtype=np.float64)
    if wl.shape != (a.shape[0],):
        raise InputError(f"wavelengths_nm must have one value per band ({a.shape[0]}), got shape {wl.shape}")
    centres = np.arange(wl.min(), wl.max() + 1e-9, spacing_nm)
    probes = np.exp(-0.5 * ((wl[:, None] - centres[None, :]) / width_nm) ** 2)
    basis, _ = np.linalg.qr(np.column_stack([a, np.ones(len(wl))]))
    novel = probes - basis @ (basis.T @ probes)
    norm = np.linalg.norm(novel, axis=0)
    keep = norm >= min_novelty * np.linalg.norm(probes, axis=0)
    return novel[:, keep] / norm[keep]


def flag_broadband(cube, probes, noise: tuple[float, float], *, n_endmembers: int, factor: float = 5.0):
    """Pixels holding broad light that no combination of the library explains.

    The projection ``t_j = p_j . y`` of a pixel's spectrum ``y`` on each
    probe of :func:`broadband_probes` is zero, up to noise, for any mixture
    of the library's endmembers and a dark offset. Its noise variance
    follows from the photon and read noise of each band,
    ``var(y_c) = s (a y_c + b)`` with ``s = C / (C - K)`` (the noise model of
    :func:`noise_model` is fitted on the RMS residual, which has ``C - K``
    degrees of freedom, not ``C``). A pixel is flagged when some
    ``t_j > factor sqrt(var(t_j))``: only extra light counts, and a bright
    pixel of the library's own dyes is not flagged however bright it is.

    This finds off-library emitters whose light the unmixing spreads over
    the QD channels and autofluorescence while the RMS residual stays within
    the noise (broad 500-700 nm lipofuscin: :func:`flag_poor_fit` misses
    most of it).

    Parameters
    ----------
    cube : (C, Y, X) numpy or dask array
        The counts that were unmixed.
    probes : (C, J) array
        From :func:`broadband_probes`.
    noise : (float, float)
        ``(a, b)`` from :func:`noise_model`.
    n_endmembers : int
        K, the library's endmembers (for the degrees of freedom).
    factor : float
        Detection threshold in noise standard deviations.

    Returns
    -------
    flagged : (Y, X) bool array (dask when ``cube`` is dask)
    """
    a, b = noise
    c = cube.shape[0]
    probes = np.asarray(probes, dtype=np.float32)
    squared = probes**2
    scale = c / max(c - n_endmembers, 1)

    def block(y):
        flat = np.asarray(y, dtype=np.float32).reshape(c, -1)
        if probes.shape[1] == 0:
            return np.zeros(y.shape[1:], bool)
        t = probes.T @ flat
        var = scale * (a * (squared.T @ np.maximum(flat, 0)) + b)  # unit-norm probes: sum p^2 = 1
        return ((t > 0) & (t * t > factor**2 * var)).any(axis=0).reshape(y.shape[1:])

    if isinstance(cube, da.Array):
        return da.map_blocks(block, cube.rechunk({0: -1}), drop_axis=0, dtype=bool)
    return block(cube)


def grow_mask(mask, radius_px: int):
    """``mask`` dilated by a disc of ``radius_px`` pixels (numpy or dask, seam-free across chunks).

    Parameters
    ----------
    mask : (Y, X) bool numpy or dask array
    radius_px : int
        Radius, pixels; 0 returns ``mask`` unchanged.

    Returns
    -------
    (Y, X) bool array of the same kind
    """
    if radius_px <= 0:
        return mask
    from scipy import ndimage as ndi
    from skimage.morphology import disk

    footprint = disk(radius_px).astype(bool)

    def block(m):
        return ndi.binary_dilation(m, footprint)

    if isinstance(mask, da.Array):
        return mask.map_overlap(block, depth=radius_px, boundary=False, dtype=bool)
    return block(np.asarray(mask))
