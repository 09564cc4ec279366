"""The numpy NNLS engine: fast combinatorial NNLS (FC-NNLS) of many pixels at once.

The Lawson-Hanson active-set algorithm [2]_ runs on all pixels together as in
[1]_: in each step the pixels that share a passive set are grouped and solved
with one normal-equations solve. It is the engine of :func:`~qdquant.unmixing.unmix`
without numba, and the fallback of the numba engine for the rare pixels its
kernel flags.

References
----------
.. [1] M. H. Van Benthem and M. R. Keenan, "Fast algorithm for the solution of
   large-scale non-negativity-constrained least squares problems",
   J. Chemometrics 18 (2004) 441-450. :doi:`10.1002/cem.889`
.. [2] C. L. Lawson and R. J. Hanson, "Solving Least Squares Problems",
   Prentice-Hall, 1974, chapter 23.
"""

from __future__ import annotations

import numpy as np

from qdquant.unmixing.validation import NonFiniteCube

#: Poisson weights: the expected count of a band is floored at
#: max(POISSON_FLOOR_COUNTS, POISSON_FLOOR_FRACTION x the pixel's largest
#: expected band), standing in for read noise.
POISSON_FLOOR_COUNTS = 1.0
POISSON_FLOOR_FRACTION = 0.01


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


class SharedGram:
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


def work_dtype(dtype):
    """float64 for a float64 cube, else float32: the dtype the band sums are taken in."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def unmix_slab(b, a, a_w, solver, offset, weights):
    """Unmix pixels ``b`` (C, n), work dtype. Returns x (K, n) f64, rms (n,) f64."""
    if offset is not None:  # b is a private copy then
        b -= offset.astype(b.dtype)[:, None]
    atb = (a_w.T @ b).astype(np.float64)
    if not np.isfinite(atb).all():
        raise NonFiniteCube("cube contains NaN or inf pixel values")
    x = _fcnnls(solver, atb)
    if weights == "poisson":
        expected = a @ x  # (C, n) float64
        floor = np.maximum(POISSON_FLOOR_COUNTS, POISSON_FLOOR_FRACTION * expected.max(axis=0))
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
        raise NonFiniteCube("cube contains NaN or inf pixel values")
    return x, rms


def unmix_into(cube, a, offset, weights, abund, resid, *, block_px=65536):
    """Unmix a numpy (C, Y, X) cube into preallocated ``abund`` (K, Y, X) and ``resid`` (Y, X).

    By slabs of rows of about ``block_px`` pixels (memory per slab is about
    60 bytes x bands x ``block_px``); band sums in float32 for a cube that is
    not float64. ``offset``: None or (C,) float64; ``weights``: None or
    "poisson". Raises :class:`~qdquant.unmixing.validation.NonFiniteCube`
    for a NaN or inf.
    """
    c, h, w = cube.shape
    wd = work_dtype(cube.dtype)
    a_w = a.astype(wd)
    solver = SharedGram(a.T @ a)
    rows = max(1, block_px // max(w, 1))
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        slab = cube[:, y0:y1, :]
        if offset is None and slab.dtype == wd:
            b = slab.reshape(c, -1)  # a view when the cube is C-contiguous; never written
        else:
            b = np.array(slab, dtype=wd, copy=True).reshape(c, -1)
        x, rms = unmix_slab(b, a, a_w, solver, offset, weights)
        abund[:, y0:y1, :] = x.reshape(-1, y1 - y0, w)
        resid[y0:y1, :] = rms.reshape(y1 - y0, w)
