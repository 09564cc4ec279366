"""A per-pixel gain applied to a cube in one pass (numba)."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, fastmath=True)
def apply_gain(x, gain, gain_offset, out):
    """``out = gain_offset + gain * (x - gain_offset)``, band by band, one read of ``x``."""
    c, h, w = x.shape
    for b in range(c):
        o = gain_offset[b]
        for i in range(h):
            for j in range(w):
                out[b, i, j] = o + (np.float32(x[b, i, j]) - o) * gain[i, j]
