"""Exact Euclidean distance transform, compiled with numba.

Meijster, Roerdink and Hesselink (2000), "A general algorithm for computing
distance transforms in linear time": a column pass, then the lower envelope
of parabolas along each row, in integer arithmetic. The squared distances
are exact integers, so the distances equal
:func:`scipy.ndimage.distance_transform_edt`'s (square roots of the same
integers), at a fraction of its time (scipy also builds the nearest-pixel
indices, in int32, and their float64 differences).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _sq_edt_kernel(feature, out):
    m, n = feature.shape
    inf = m + n  # farther than any pixel: a column without features
    g = np.empty((m, n), np.int32)
    for x in range(n):
        g[0, x] = 0 if feature[0, x] else inf
    for y in range(1, m):
        for x in range(n):
            g[y, x] = 0 if feature[y, x] else g[y - 1, x] + 1
    for y in range(m - 2, -1, -1):
        for x in range(n):
            if g[y + 1, x] < g[y, x]:
                g[y, x] = g[y + 1, x] + 1
    s = np.empty(n, np.int64)
    t = np.empty(n, np.int64)
    for y in range(m):
        row = g[y]
        q = 0
        s[0] = 0
        t[0] = 0
        for u in range(1, n):
            gu = np.int64(row[u])
            while q >= 0:
                gs = np.int64(row[s[q]])
                if (t[q] - s[q]) ** 2 + gs * gs <= (t[q] - u) ** 2 + gu * gu:
                    break
                q -= 1
            if q < 0:
                q = 0
                s[0] = u
            else:
                gs = np.int64(row[s[q]])
                # first column where u's parabola is below s[q]'s (integer Sep)
                w = 1 + (u * u - s[q] * s[q] + gu * gu - gs * gs) // (2 * (u - s[q]))
                if w < n:
                    q += 1
                    s[q] = u
                    t[q] = w
        for u in range(n - 1, -1, -1):
            gs = np.int64(row[s[q]])
            out[y, u] = (u - s[q]) ** 2 + gs * gs
            if u == t[q]:
                q -= 1


def squared_distance(feature: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance (pixels², int64) of every pixel to the nearest ``feature`` pixel.

    Parameters
    ----------
    feature : (M, N) ndarray of bool
        The pixels distances are measured to; at least one.

    Returns
    -------
    d2 : (M, N) ndarray of int32 (int64 where the image's diagonal needs it)
        0 on ``feature``; ``sqrt(d2)`` equals
        ``scipy.ndimage.distance_transform_edt(~feature)``.
    """
    feature = np.ascontiguousarray(feature, dtype=bool)
    m, n = feature.shape
    out = np.empty(feature.shape, np.int32 if (2 * m + n) ** 2 < 2**31 else np.int64)
    _sq_edt_kernel(feature, out)
    return out
