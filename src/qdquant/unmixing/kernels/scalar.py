"""The scalar numba kernel: any K, any strides, unweighted or Poisson-weighted.

For K <= ``KP`` endmembers (the table path) the problem is padded to ``KP``
variables (G with an identity block, b = 0: the padding variables never
enter the passive set) and the inverse of G restricted to each of the
``2**KP`` passive sets, computed once per call by Cholesky on the
sub-matrix (:func:`inverse_table`), is looked up; every loop of the
per-pixel algorithm then has a fixed trip count and the data-dependent
choices are mostly selects, not branches (mispredicted branches cost more
than the arithmetic here). A first pass, without branches, solves every
such pixel on its warm-start passive set and checks the KKT conditions
(done for about 2/3 of them on typical data); a second pass runs the
Lawson-Hanson loop for the rest. Beyond ``KP`` endmembers, and for the
per-pixel Gram matrices of the Poisson refit, each passive system is
factorised (Cholesky) when it comes.

Hot loops index flat arrays directly: numba reference-counts array views
and the arrays passed to a call with atomic operations, which would cost
more than the arithmetic of one pixel. :func:`nnls_tile` and :func:`tiles`
are long numeric kernels kept whole for that reason (a call per pixel, or
per tile stage, would pass arrays).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from qdquant.unmixing.kernels import CHOL_RTOL, KKT_RTOL, KP, NB_OPTS, RSS_GRAM_MIN, TILE
from qdquant.unmixing.kernels.vectors import stack_f8
from qdquant.unmixing.nnls import POISSON_FLOOR_COUNTS, POISSON_FLOOR_FRACTION

njit = numba.njit(**NB_OPTS)


@njit
def chol_solve(g, b, pidx, m, chol, z):
    """Solve ``g[p, p] z = b[p]`` (p = pidx[:m]) by Cholesky; False if not PD."""
    for i in range(m):
        pi = pidx[i]
        for j in range(i + 1):
            pj = pidx[j]
            s = g[pi, pj]
            for q in range(j):
                s -= chol[i, q] * chol[j, q]
            if i == j:
                if not s > CHOL_RTOL * g[pi, pi]:  # also catches NaN
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


@njit
def restricted_inverse(g, code, pidx, chol, z, e, inv):
    """The inverse of ``g[p, p]`` into ``inv[p, p]``, p the variables of ``code`` (bit i: variable i).

    Column by column, by Cholesky (:func:`chol_solve`). Returns the size m
    of p (in ``pidx[:m]``) and whether ``g[p, p]`` is numerically positive
    definite (where it is not, the columns hold what the failed solve left
    in ``z``; they are never used). ``chol``, ``z`` and ``e`` (zeros) are
    work arrays; entries of ``inv`` outside ``p x p`` are left alone.
    """
    m = 0
    for i in range(g.shape[0]):
        if (code >> i) & 1:
            pidx[m] = i
            m += 1
    good = True
    for col in range(m):
        e[pidx[col]] = 1.0
        if not chol_solve(g, e, pidx, m, chol, z):
            good = False
        e[pidx[col]] = 0.0
        for q in range(m):
            inv[pidx[q], pidx[col]] = z[q]
    return m, good


@njit
def inverse_table(g):
    """Inverse of ``g`` (KP x KP) restricted to every passive set, by Cholesky.

    ``table[code * KP**2:][:KP**2]`` is, for the passive set ``code``
    (bit i set: variable i passive), the inverse of ``g[p, p]`` embedded
    in a KP x KP matrix of zeros, row-major; ``ok[code]`` is False when
    ``g[p, p]`` is not numerically positive definite.
    """
    kp = KP
    n = 1 << kp
    table = np.zeros(n * kp * kp)
    ok = np.ones(n, np.bool_)
    pidx = np.empty(kp, np.intp)
    chol = np.empty((kp, kp))
    z = np.empty(kp)
    e = np.zeros(kp)
    inv = np.zeros((kp, kp))
    for code in range(1, n):
        m, good = restricted_inverse(g, code, pidx, chol, z, e, inv)
        ok[code] = good
        for col in range(m):
            for q in range(m):
                table[code * kp * kp + pidx[q] * kp + pidx[col]] = inv[pidx[q], pidx[col]]
    return table, ok


@njit
def lh_generic(g, b, d, code, tol, max_outer, pidx, chol, z):
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
            if not chol_solve(g, b, pidx, m, chol, z):
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


@njit
def nnls_generic(g, b, xu, x, max_outer, pidx, chol, z):
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
    tol = KKT_RTOL * k * (scale if scale > 0.0 else 1.0)
    status = lh_generic(g, b, x, code, tol, max_outer, pidx, chol, z)
    if status != 0:
        for i in range(k):
            x[i] = 0.0
        status = lh_generic(g, b, x, np.int64(0), tol, max_outer, pidx, chol, z)
    return status


@njit
def nnls_tile(table, ok, g8, g, bt, xt, nt, n, neg, fast, max_outer, st, codes,
                  b, d, z, xu, pidx, chol):
    """NNLS of the pixels j < n of a tile with ``neg[j] > 0``.

    ``bt`` and ``xt`` are (rows, nt) flattened, rows >= K (and >= KP on
    the fast path, padding rows zero): ``A.T @ y`` and, on entry, the
    unconstrained solutions, replaced by the NNLS solutions. ``st[j]``
    gets the status (0 converged, 1 not positive definite, 2 not
    converged; 0 for pixels not solved here). ``fast``: the table path
    (``table``, ``ok``, ``g8`` = G padded to KP x KP, flat); else
    :func:`nnls_generic` with ``g``. ``codes`` (nt,) int64 and
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
                st[j] = nnls_generic(g, b, xu, d, max_outer, pidx, chol, z)
                for i in range(k):
                    xt[i * nt + j] = d[i]
        return
    kp = KP
    kk = kp * kp
    bs = numba.carray(stack_f8(KP), KP)  # b, d, z of the pixel, in registers
    ds = numba.carray(stack_f8(KP), KP)
    zs = numba.carray(stack_f8(KP), KP)
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
        tol = KKT_RTOL * k * (scale if scale > 0.0 else 1.0)
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
        tol = KKT_RTOL * k * (scale if scale > 0.0 else 1.0)
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


@njit
def tiles(cube, a, gram, ginv, table, ok, g8, fast, offset, poisson, max_outer, t0, t1,
              abund, resid, status):
    """Unmix tiles ``t0:t1`` of ``cube`` (C, H, W) into abund, resid, status.

    Tile t covers row ``t // ntx`` (ntx tiles a row), columns from
    ``(t % ntx) * TILE``. Per-tile buffers are flat (rows of TILE
    pixels), pixel loops innermost; a short tile is padded with zero
    pixels. Returns the number of pixels with a nonzero status and the
    number with a residual that is not finite (NaN or inf in the cube).
    """
    c_n, _, w_n = cube.shape
    k = a.shape[1]
    nt = TILE
    ntx = (w_n + nt - 1) // nt
    rows = max(k, KP)
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
        nnls_tile(table, ok, g8, gram, bt, xt, nt, n, neg, fast, max_outer, st, codes,
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
                floor = max(POISSON_FLOOR_COUNTS, POISSON_FLOOR_FRACTION * emax)
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
                if chol_solve(gp, bp, pidx, k, chol, xp):
                    negp = False
                    for i in range(k):
                        xo[i] = xp[i]
                        negp |= xp[i] < 0.0
                    if negp:
                        st[j] = nnls_generic(gp, bp, xp, xo, max_outer, pidx, chol, z)
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
            if not r > RSS_GRAM_MIN * yy[j]:  # small (or NaN): band by band
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


@numba.njit(parallel=True, **NB_OPTS)
def tiles_parallel(cube, a, gram, ginv, table, ok, g8, fast, offset, poisson, max_outer,
                       n_chunks, abund, resid, status):
    """``tiles`` over all tiles: ``n_chunks`` contiguous ranges of tiles in parallel."""
    ntiles = cube.shape[1] * ((cube.shape[2] + TILE - 1) // TILE)
    n_bad = 0
    n_nonfinite = 0
    for ch in numba.prange(n_chunks):
        t0 = ntiles * ch // n_chunks
        t1 = ntiles * (ch + 1) // n_chunks
        counts = tiles(cube, a, gram, ginv, table, ok, g8, fast, offset, poisson, max_outer,
                           t0, t1, abund, resid, status)
        n_bad += counts[0]
        n_nonfinite += counts[1]
    return n_bad, n_nonfinite
