"""Smoothing of a cube along a direction given per pixel (numba)."""

from __future__ import annotations

import numba
import numpy as np

from qdquant.unmixing.kernels import NB_OPTS


@numba.njit(**NB_OPTS)
def smooth_lines(cube, dy, dx, steps, weights, out):
    """``out[:, y, x] = sum_t weights[t] * cube[:, Y_t, X_t]``, the taps at the nearest pixels.

    ``(Y_t, X_t) = (y + steps[t] * dy[y, x], x + steps[t] * dx[y, x])``,
    rounded half up and clamped to the cube. The taps are found once per
    pixel and read band by band (pixels next to each other read
    neighbouring taps, so each band's lines stay in cache).
    """
    c, h, w = cube.shape
    n = steps.size
    ty = np.empty(n, np.int64)
    tx = np.empty(n, np.int64)
    for i in range(h):
        for j in range(w):
            for t in range(n):
                ty[t] = min(max(int(np.floor(i + steps[t] * dy[i, j] + np.float32(0.5))), 0), h - 1)
                tx[t] = min(max(int(np.floor(j + steps[t] * dx[i, j] + np.float32(0.5))), 0), w - 1)
            for b in range(c):
                acc = np.float32(0.0)
                for t in range(n):
                    acc += weights[t] * cube[b, ty[t], tx[t]]
                out[b, i, j] = acc
