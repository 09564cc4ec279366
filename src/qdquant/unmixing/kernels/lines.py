"""Smoothing of a cube along a direction given per pixel (numba)."""

from __future__ import annotations

import numba
import numpy as np

from qdquant.unmixing.kernels import NB_OPTS

#: Rows of the cube a pass of :func:`smooth_lines` copies band-interleaved at a time (with the
#: rows its taps reach above and below): the copies stay in cache.
STRIP_ROWS = 32


@numba.njit(**NB_OPTS)
def smooth_lines(cube, dy, dx, steps, weights, out):
    """``out[:, y, x] = sum_t weights[t] * cube[:, Y_t, X_t]``, the taps at the nearest pixels.

    ``(Y_t, X_t) = (y + steps[t] * dy[y, x], x + steps[t] * dx[y, x])``,
    rounded half up and clamped to the cube; each band's sum is taken over
    the taps in order, in float32. The cube is read by strips of
    :data:`STRIP_ROWS` rows copied band-interleaved, so that each tap reads
    the pixel's bands together (about 6x faster than reading band by band).
    """
    c, h, w = cube.shape
    n = steps.size
    reach = 1
    for t in range(n):
        reach = max(reach, int(np.ceil(abs(steps[t]))) + 1)
    strip = STRIP_ROWS
    buf = np.empty((strip + 2 * reach, w, c), np.float32)
    obuf = np.empty((strip, w, c), np.float32)
    acc = np.empty(c, np.float32)
    ty = np.empty(n, np.int64)
    tx = np.empty(n, np.int64)
    for i0 in range(0, h, strip):
        i1 = min(i0 + strip, h)
        r0 = max(i0 - reach, 0)
        r1 = min(i1 + reach, h)
        for b in range(c):
            for r in range(r0, r1):
                for j in range(w):
                    buf[r - r0, j, b] = cube[b, r, j]
        for i in range(i0, i1):
            for j in range(w):
                for t in range(n):
                    ty[t] = min(max(int(np.floor(i + steps[t] * dy[i, j] + np.float32(0.5))), 0), h - 1) - r0
                    tx[t] = min(max(int(np.floor(j + steps[t] * dx[i, j] + np.float32(0.5))), 0), w - 1)
                for b in range(c):
                    acc[b] = np.float32(0.0)
                for t in range(n):
                    wt = weights[t]
                    row, col = ty[t], tx[t]
                    for b in range(c):
                        acc[b] += wt * buf[row, col, b]
                for b in range(c):
                    obuf[i - i0, j, b] = acc[b]
        for b in range(c):
            for i in range(i0, i1):
                for j in range(w):
                    out[b, i, j] = obuf[i - i0, j, b]
