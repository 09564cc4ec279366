"""The vector kernel: unweighted, K <= ``K16_MAX``, one kernel for 8 and 16 lanes.

Same algorithm and tiles as :func:`qdquant.unmixing.kernels.scalar.tiles`,
written with the vectors of :mod:`.vectors`, by groups of up to 64 pixels
(``GROUP`` blocks of 8) of a tile. For each block the band sums (b = A.T y
and |y|^2, one vector per endmember, kept in registers over the bands), the
unconstrained solution, and at the end the outputs and the residual, are
computed 8 pixels at a time ("across pixels"). The active-set steps of a
pixel with a negative unconstrained entry work on one vector of its ``kr``
variables ("within a pixel"; b broadcast from the block's rows, x
transposed to one row a pixel): 8 lanes for K <= ``KP`` (the problem padded
to ``kr = KP`` variables), 16 lanes (two registers; lanes K.. are 0) for
``KP`` < K = ``kr`` <= ``K16_MAX``.

The steps run in rounds over the group's unfinished pixels, each round
without data-dependent branches so that the processor overlaps the pixels:
the least squares on the positive set of the unconstrained solution and its
KKT check, then, while needed, adding every active variable whose gradient
is above the tolerance (not only the largest: fewer rounds, and a feasible
point that meets the KKT conditions is the problem's unique minimum
whichever way it was reached), solving, checking again. On typical data a
step back to the feasible region almost never follows an addition: a pixel
that needs one goes, from before the additions, to the general
Lawson-Hanson loop (one variable at a time), as one that is not done after
``max_outer`` steps does. Each passive solve is one product with the table
of restricted inverses T and, for the gradient b - G z, one with I - G T
(independent of the first): entry ``code`` of the table holds ``kr``
columns of T, then ``kr`` of I - G T, ``lanes`` doubles each.

The lane count, ``kr`` and the gain switch are compile-time constants: the
kernel is a closure over them (:func:`lane_kernel`) around a body inlined
into it, so that every loop over the variables has a constant trip count,
LLVM unrolls it and keeps the band-sum accumulators (a stack array) in
registers. At K = 9 the table is 1.2 MB, at K = 12 12.6 MB; a pixel reads one
entry per solve, and the passive sets that occur on a slide are few.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from qdquant.unmixing.kernels import GROUP, K16_MAX, KKT_RTOL, NB_OPTS, RSS_GRAM_MIN, TILE
from qdquant.unmixing.kernels.scalar import restricted_inverse
from qdquant.unmixing.kernels.vectors import (
    ctz,
    stack_f8,
    stack_i8,
    v_abs,
    v_add,
    v_dataptr,
    v_div,
    v_eq,
    v_fma,
    v_gt,
    v_le,
    v_load,
    v_load_row,
    v_loadp,
    v_lt,
    v_max,
    v_min,
    v_mul,
    v_round_f4,
    v_select,
    v_splat,
    v_sqrt,
    v_store,
    v_store_row_f4,
    v_sub,
    v_transpose,
    v_transpose8x16,
    v_transpose16x8,
)

njit = numba.njit(**NB_OPTS)
njit_inline = numba.njit(inline="always", **NB_OPTS)

#: Stack buffers for up to K16_MAX variables and a group of 64 pixels: b
#: (8 kr a block of 8 pixels), x and the gradient (8 x 16 a block).
_BB = 8 * K16_MAX * GROUP
_XX = 128 * GROUP
_ACC = 8 * K16_MAX


@njit
def table16(g, table, ok):
    """Fill ``table`` (2**K * 32 K, zeros) and ``ok`` for ``g`` (K x K), K <= 16.

    Entry ``code`` (bit i set: variable i passive) starts at ``code * 32 K``:
    the K columns of T, the inverse of ``g[p, p]`` embedded in zeros (16
    lanes each, column r at ``16 r``), then the K columns of ``I - g T``.
    ``ok[code]`` is False where ``g[p, p]`` is not numerically positive
    definite (Cholesky, as :func:`~qdquant.unmixing.kernels.scalar.inverse_table`).
    (Columns packed K doubles apart, read 16 lanes at a time, were no faster.)
    """
    k = g.shape[0]
    kw = 32 * k
    pidx = np.empty(k, np.intp)
    chol = np.empty((k, k))
    z = np.empty(k)
    e = np.zeros(k)
    inv = np.zeros((k, k))
    for code in range(1 << k):
        base = code * kw
        m, good = restricted_inverse(g, code, pidx, chol, z, e, inv)
        ok[code] = good
        for col in range(m):
            for q in range(m):
                table[base + 16 * pidx[col] + pidx[q]] = inv[pidx[q], pidx[col]]
        wb = base + 16 * k
        for r in range(k):
            for i in range(k):
                s = 1.0 if i == r else 0.0
                for q in range(m):
                    s -= g[i, pidx[q]] * table[base + 16 * r + pidx[q]]
                table[wb + 16 * r + i] = s


@njit_inline
def _solve(tp, code, bp, jb, kr, lanes):
    """``z = T b`` and the gradient ``w = b - G z`` on the passive set ``code``.

    ``tp``: pointer to the table; ``b[r] = bp[jb + 8 r]``, r < kr. With 8
    lanes (kr = 8) the sums run in a tree; with 16, even and odd r in two
    sums each (short dependency chains both). The order of the sums is part
    of the results (their last bits). Every vector is ``lanes`` wide in both
    branches, so that the one not taken type-checks too.
    """
    base = code * (2 * kr * lanes)
    wb = base + kr * lanes
    if lanes == 8:
        b0, b1, b2, b3 = (v_splat(bp[jb], lanes), v_splat(bp[jb + 8], lanes), v_splat(bp[jb + 16], lanes),
                          v_splat(bp[jb + 24], lanes))
        b4, b5, b6, b7 = (v_splat(bp[jb + 32], lanes), v_splat(bp[jb + 40], lanes), v_splat(bp[jb + 48], lanes),
                          v_splat(bp[jb + 56], lanes))
        z = v_add(v_add(v_fma(v_loadp(tp, base + 8, lanes), b1, v_mul(v_loadp(tp, base, lanes), b0)),
                        v_fma(v_loadp(tp, base + 24, lanes), b3, v_mul(v_loadp(tp, base + 16, lanes), b2))),
                  v_add(v_fma(v_loadp(tp, base + 40, lanes), b5, v_mul(v_loadp(tp, base + 32, lanes), b4)),
                        v_fma(v_loadp(tp, base + 56, lanes), b7, v_mul(v_loadp(tp, base + 48, lanes), b6))))
        w = v_add(v_add(v_fma(v_loadp(tp, wb + 8, lanes), b1, v_mul(v_loadp(tp, wb, lanes), b0)),
                        v_fma(v_loadp(tp, wb + 24, lanes), b3, v_mul(v_loadp(tp, wb + 16, lanes), b2))),
                  v_add(v_fma(v_loadp(tp, wb + 40, lanes), b5, v_mul(v_loadp(tp, wb + 32, lanes), b4)),
                        v_fma(v_loadp(tp, wb + 56, lanes), b7, v_mul(v_loadp(tp, wb + 48, lanes), b6))))
        return z, w
    b0 = v_splat(bp[jb], lanes)
    b1 = v_splat(bp[jb + 8], lanes)
    z0 = v_mul(v_loadp(tp, base, lanes), b0)
    w0 = v_mul(v_loadp(tp, wb, lanes), b0)
    z1 = v_mul(v_loadp(tp, base + lanes, lanes), b1)
    w1 = v_mul(v_loadp(tp, wb + lanes, lanes), b1)
    for r in range(2, kr):
        br = v_splat(bp[jb + 8 * r], lanes)
        if r & 1:
            z1 = v_fma(v_loadp(tp, base + lanes * r, lanes), br, z1)
            w1 = v_fma(v_loadp(tp, wb + lanes * r, lanes), br, w1)
        else:
            z0 = v_fma(v_loadp(tp, base + lanes * r, lanes), br, z0)
            w0 = v_fma(v_loadp(tp, wb + lanes * r, lanes), br, w0)
    return v_add(z0, z1), v_add(w0, w1)


@njit_inline
def _lawson_hanson(tp, okp, bp, jb, bv, d, w, code, solve, tol, kmask, max_outer, kr, lanes):
    """Lawson-Hanson on one pixel's vectors, as in the scalar kernel's second pass.

    From ``d`` feasible on the passive set ``code``; ``solve`` False: d is
    the least squares on ``code`` and ``w`` its gradient. ``bv``: b.
    Returns the status (0 converged, 1 not positive definite, 2 not
    converged) and the solution.
    """
    zero = v_splat(0.0, lanes)
    tolv = v_splat(tol, lanes)
    status = 2
    for _outer in range(max_outer):
        if solve:
            # least squares on the passive set, stepping back to the
            # feasible region (each step drops at least one variable)
            for _inner in range(kr + 1):
                if code == 0:
                    d = zero
                    w = bv
                    break
                if okp[code] == 0:
                    status = 1
                    break
                z, w = _solve(tp, code, bp, jb, kr, lanes)
                neg = v_le(z, zero) & code
                if neg == 0:
                    d = z
                    break
                ratio = v_div(d, v_sub(d, z))
                neg &= v_eq(ratio, ratio)  # 0 / 0: not a step
                if neg == 0:
                    d = z
                    break
                ratio = v_select(neg, ratio, v_splat(np.inf, lanes))
                alpha = v_min(ratio)
                imin = ctz(v_eq(ratio, alpha) & neg)
                v = v_fma(alpha, v_sub(z, d), d)
                code &= ~(code & (v_le(v, zero) | (np.int64(1) << imin)))
                d = v_select(code, v, zero)
            if status == 1:
                break
        solve = True
        # KKT: the gradient of every active variable must be <= tol
        cand = v_gt(w, tolv) & ~code & kmask
        if cand == 0:
            status = 0
            break
        wm = v_select(cand, w, v_splat(-np.inf, lanes))
        code |= np.int64(1) << ctz(v_eq(wm, v_max(wm)) & cand)
    return status, d


@njit_inline
def _tiles_body(cube, ak, ginvk, gsk, table, ok, offset, gain3, hk, ath, hh, k, kr, lanes, gained, max_outer,
                t0, t1, abund, resid3, status):
    """Unmix tiles ``t0:t1`` of ``cube`` (C, H, W) into abund, resid3 (1, H, W), status.

    ``lanes``, ``kr`` and ``gained`` must be compile-time constants (see
    :func:`lane_kernel`); ``k`` is the number of endmembers (``kr`` when
    ``lanes`` is 16). ``cube`` has a unit stride along X. ``ak`` (C, kr),
    ``ginvk`` (the inverse of G, padded with an identity block to kr x kr)
    and ``gsk`` (the upper triangle of padded G, off-diagonal doubled) flat;
    ``table`` as in the module's description and ``ok`` (uint8, per
    passive set: its system is positive definite). Returns the number of
    pixels with a nonzero status and the number with a residual that is not
    finite (NaN or inf in the cube).

    With ``gained``, the pixel fitted is ``g y + (1 - g) o``
    (:func:`qdquant.unmixing.apply_gain`, ``g`` from ``gain3`` (1, H, W),
    unit stride along X), offset subtracted: with ``d = y - offset`` and
    ``h = o - offset`` (``hk``, (C,)) that is ``g d + (1 - g) h``, so its
    band sums follow from the raw pixel's: ``A.T b = g A.T d + (1 - g) A.T
    h`` (``ath``) and ``|b|^2 = g^2 |d|^2 + 2 g (1 - g) d.h + (1 - g)^2
    |h|^2`` (``hh``), one more accumulator (``d.h``) in the pass over the
    bands and no corrected copy of the cube.

    One long numeric kernel: its parts share stack buffers that stay in
    registers and cache, and a call between them would reference-count the
    arrays it passes.
    """
    c_n, _, w_n = cube.shape
    nt = TILE
    ntx = (w_n + nt - 1) // nt
    # per block of 8 pixels: bb kr rows of 8 pixels (block stride 8 kr); xx
    # kr rows of 8 (block stride 8 lanes; rows kr.. stay 0), pixel-major (a
    # pixel's lanes a row) while the active-set steps run; ww pixel-major
    bb = numba.carray(stack_f8(_BB), _BB)
    xx = numba.carray(stack_f8(_XX), _XX)
    ww = numba.carray(stack_f8(_XX), _XX)
    acc = numba.carray(stack_f8(_ACC), _ACC)  # band sums, in registers
    yyg = numba.carray(stack_f8(64), 64)  # |y|^2
    tols = numba.carray(stack_f8(64), 64)  # KKT tolerances
    tmp = numba.carray(stack_f8(8), 8)
    bvt = numba.carray(stack_f8(16), 16)  # a pixel's b, one vector
    codes = numba.carray(stack_i8(64), 64)  # passive sets; bit 16: solve first
    for q in range(_BB):
        bb[q] = 0.0
    for q in range(_XX):
        xx[q] = 0.0
        ww[q] = 0.0
    for q in range(16):
        bvt[q] = 0.0
    tp = v_dataptr(table)
    okp = v_dataptr(ok)
    bp = v_dataptr(bb)
    zero = v_splat(0.0, 8)
    zerol = v_splat(0.0, lanes)
    kmask = (np.int64(1) << k) - 1
    n_bad = 0
    n_nonfinite = 0
    for t in range(t0, t1):
        y = t // ntx
        x0 = (t % ntx) * nt
        n = min(nt, w_n - x0)
        for g0 in range(0, n, 8 * GROUP):
            nblk = min(GROUP, (n - g0 + 7) // 8)
            negg = 0  # the group's pixels with a negative unconstrained entry
            for blk in range(nblk):
                j0 = g0 + 8 * blk
                nv = min(8, n - j0)
                xs = x0 + j0
                ob = blk * 8 * kr  # the block's b in bb
                ox = blk * 8 * lanes  # its x in xx
                # b = A.T y and |y|^2, offset subtracted, one pass over the bands
                for i in range(kr):
                    v_store(acc, 8 * i, zero)
                yy = zero
                dh = zero
                for c in range(c_n):
                    if nv == 8:
                        yv = v_load_row(cube, c, y, xs)
                    else:  # short last block of a row
                        for q in range(8):
                            tmp[q] = np.float64(cube[c, y, xs + q]) if q < nv else 0.0
                        yv = v_load(tmp, 0, 8)
                    yv = v_sub(yv, v_splat(offset[c], 8))
                    for i in range(kr):
                        v_store(acc, 8 * i, v_fma(v_splat(ak[c * kr + i], 8), yv, v_load(acc, 8 * i, 8)))
                    yy = v_fma(yv, yv, yy)
                    if gained:
                        dh = v_fma(v_splat(hk[c], 8), yv, dh)
                if gained:  # the sums of the gained pixel g d + (1 - g) h
                    if nv == 8:
                        gv = v_load_row(gain3, 0, y, xs)
                    else:
                        for q in range(8):
                            tmp[q] = np.float64(gain3[0, y, xs + q]) if q < nv else 1.0
                        gv = v_load(tmp, 0, 8)
                    qv = v_sub(v_splat(1.0, 8), gv)
                    for i in range(kr):
                        v_store(acc, 8 * i, v_fma(gv, v_load(acc, 8 * i, 8), v_mul(qv, v_splat(ath[i], 8))))
                    yy = v_fma(gv, v_fma(gv, yy, v_mul(v_add(qv, qv), dh)),
                               v_mul(v_mul(qv, qv), v_splat(hh, 8)))
                for i in range(kr):
                    v_store(bb, ob + 8 * i, v_load(acc, 8 * i, 8))
                v_store(yyg, blk * 8, yy)
                # unconstrained solution G^-1 b; pixels with a negative entry
                negm = 0
                for i in range(kr):
                    s = zero
                    for q in range(kr):
                        s = v_fma(v_splat(ginvk[i * kr + q], 8), v_load(acc, 8 * q, 8), s)
                    v_store(xx, ox + 8 * i, s)
                    negm |= v_lt(s, zero)
                negm &= (np.int64(1) << nv) - 1
                if negm != 0:
                    # KKT tolerance (A.T y units), relative to each pixel's scale, as in the numpy FC-NNLS
                    scale = v_abs(v_load(acc, 0, 8))
                    for i in range(1, kr):
                        bi = v_abs(v_load(acc, 8 * i, 8))
                        scale = v_select(v_gt(bi, scale), bi, scale)
                    scale = v_select(v_gt(scale, zero), scale, v_splat(1.0, 8))
                    v_store(tols, blk * 8, v_mul(v_splat(KKT_RTOL * k, 8), scale))
                    if lanes == 8:
                        v_transpose(xx, ox)
                    else:
                        v_transpose16x8(xx, ox)
                    negg |= negm << (8 * blk)
            if negg != 0:
                # round 1: least squares on the positive set P of the
                # unconstrained solution, KKT check
                m = negg
                pend = 0  # feasible, KKT not met: add a variable
                gen = 0  # to the general loop
                while m != 0:
                    p = ctz(m)
                    m &= m - 1
                    o = (p >> 3) * 8 * lanes + (p & 7) * lanes  # the pixel's row of xx, ww
                    jb = (p >> 3) * 8 * kr + (p & 7)  # its column of bb
                    xu = v_load(xx, o, lanes)
                    code = v_gt(xu, zerol) & kmask
                    z, w = _solve(tp, code, bp, jb, kr, lanes)
                    feas = ((v_le(z, zerol) & code) == 0) & (okp[code] != 0)
                    kkt = (v_gt(w, v_splat(tols[p], lanes)) & ~code & kmask) == 0
                    v_store(xx, o, v_select(-np.int64(feas), z, v_select(code, xu, zerol)))
                    v_store(ww, o, w)
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
                        p = ctz(m)
                        m &= m - 1
                        o = (p >> 3) * 8 * lanes + (p & 7) * lanes
                        jb = (p >> 3) * 8 * kr + (p & 7)
                        w0 = v_load(ww, o, lanes)
                        code0 = codes[p]
                        tolv = v_splat(tols[p], lanes)
                        code = code0 | (v_gt(w0, tolv) & ~code0 & kmask)
                        z, w = _solve(tp, code, bp, jb, kr, lanes)
                        feas = ((v_le(z, zerol) & code) == 0) & (okp[code] != 0)
                        kkt = (v_gt(w, tolv) & ~code & kmask) == 0
                        # not feasible: the general loop goes on from before the additions
                        fm = -np.int64(feas)
                        v_store(xx, o, v_select(fm, z, v_load(xx, o, lanes)))
                        v_store(ww, o, v_select(fm, w, w0))
                        codes[p] = (code & fm) | (code0 & ~fm)
                        pend |= np.int64(feas & (not kkt)) << p
                        gen |= np.int64(not feas) << p
                    r += 1
                gen |= pend
                # the rest: Lawson-Hanson from there, then from the empty set
                while gen != 0:
                    p = ctz(gen)
                    gen &= gen - 1
                    o = (p >> 3) * 8 * lanes + (p & 7) * lanes
                    jb = (p >> 3) * 8 * kr + (p & 7)
                    for i in range(kr):
                        bvt[i] = bb[jb + 8 * i]
                    bv = v_load(bvt, 0, lanes)
                    cf = codes[p]
                    st, d = _lawson_hanson(tp, okp, bp, jb, bv, v_load(xx, o, lanes), v_load(ww, o, lanes),
                                           cf & 0xFFFF, (cf >> 16) != 0, tols[p], kmask, max_outer - r + 1,
                                           kr, lanes)
                    if st != 0:
                        st, d = _lawson_hanson(tp, okp, bp, jb, bv, zerol, bv, 0, True, tols[p], kmask,
                                               max_outer, kr, lanes)
                    v_store(xx, o, d)
                    if st != 0:
                        status[y, x0 + g0 + p] = st
                        n_bad += 1
            for blk in range(nblk):
                j0 = g0 + 8 * blk
                nv = min(8, n - j0)
                valid = (np.int64(1) << nv) - 1
                xs = x0 + j0
                ob = blk * 8 * kr
                ox = blk * 8 * lanes
                if (negg >> (8 * blk)) & 255:
                    if lanes == 8:
                        v_transpose(xx, ox)
                    else:
                        v_transpose8x16(xx, ox)
                # outputs; the residual is that of the abundances as returned (float32)
                for i in range(k):
                    xi = v_round_f4(v_load(xx, ox + 8 * i, 8))
                    v_store(xx, ox + 8 * i, xi)
                    if nv == 8:
                        v_store_row_f4(abund, i, y, xs, xi)
                    else:
                        v_store(tmp, 0, xi)
                        for q in range(nv):
                            abund[i, y, xs + q] = np.float32(tmp[q])
                # Gram form: |y - A x|^2 = |y|^2 + x.(G x - 2 b), G x by its
                # upper triangle (off-diagonal doubled)
                yy = v_load(yyg, blk * 8, 8)
                rs = yy
                for i in range(kr):
                    xi = v_load(xx, ox + 8 * i, 8)
                    gx = v_mul(v_splat(gsk[i * kr + i], 8), xi)
                    for q in range(i + 1, kr):
                        gx = v_fma(v_splat(gsk[i * kr + q], 8), v_load(xx, ox + 8 * q, 8), gx)
                    bi = v_load(bb, ob + 8 * i, 8)
                    rs = v_fma(xi, v_sub(gx, v_add(bi, bi)), rs)
                redo = ~v_gt(rs, v_mul(v_splat(RSS_GRAM_MIN, 8), yy)) & valid
                if redo != 0:  # small (or NaN): band by band
                    v_store(tmp, 0, rs)
                    while redo != 0:
                        jj = ctz(redo)
                        redo &= redo - 1
                        r2 = 0.0
                        gj = np.float64(gain3[0, y, xs + jj]) if gained else 1.0
                        for c in range(c_n):
                            e = np.float64(cube[c, y, xs + jj]) - offset[c]
                            if gained:
                                e = gj * e + (1.0 - gj) * hk[c]
                            for i in range(k):
                                e -= ak[c * kr + i] * xx[ox + 8 * i + jj]
                            r2 += e * e
                        tmp[jj] = r2
                    rs = v_load(tmp, 0, 8)
                rms = v_sqrt(v_mul(rs, v_splat(1.0 / c_n, 8)))
                bad = valid & ~v_lt(v_abs(rms), v_splat(np.inf, 8))
                while bad != 0:
                    bad &= bad - 1
                    n_nonfinite += 1
                if nv == 8:
                    v_store_row_f4(resid3, 0, y, xs, rms)
                else:
                    v_store(tmp, 0, rms)
                    for q in range(nv):
                        resid3[0, y, xs + q] = np.float32(tmp[q])
    return n_bad, n_nonfinite


def lane_kernel(lanes, kr, gained=False):
    """The vector kernel with ``lanes`` (8 or 16) lanes a pixel and ``kr`` variables.

    8 lanes: ``kr`` = ``KP`` (8), K <= 8 endmembers padded to it, no gain.
    16 lanes: ``kr`` = K, ``KP`` < K <= ``K16_MAX``, with a per-pixel gain
    when ``gained``. Compiled on first use and cached on disk; a closure
    over its arguments (numba's cache key of a closure adds the values it
    closes over), so that they are constants of the compiled code, around
    the inlined :func:`_tiles_body`. Arguments: ``(cube, ak, ginvk, gsk,
    table, ok, offset, gain3, hk, ath, hh, k, max_outer, t0, t1, abund,
    resid3, status)``, as :func:`_tiles_body`. There is no numba-parallel
    twin (its compilation, parfor passes over the inlined body, took 10 s):
    it releases the GIL, and callers run it on chunks of tiles from a
    thread pool.
    """
    if lanes not in (8, 16) or (lanes == 8 and (kr != 8 or gained)) or (lanes == 16 and not 8 < kr <= K16_MAX):
        raise ValueError(f"no vector kernel for {lanes} lanes, {kr} variables, gained={gained}")
    return _compiled(int(lanes), int(kr), bool(gained))


@functools.cache
def _compiled(lanes, kr, gained):
    """:func:`lane_kernel`, made once per combination of its (normalised) arguments."""

    def tiles(cube, ak, ginvk, gsk, table, ok, offset, gain3, hk, ath, hh, k, max_outer, t0, t1,
              abund, resid3, status):
        return _tiles_body(cube, ak, ginvk, gsk, table, ok, offset, gain3, hk, ath, hh,
                           kr if lanes == 16 else k, kr, lanes, gained, max_outer, t0, t1, abund, resid3, status)

    return njit(tiles)
