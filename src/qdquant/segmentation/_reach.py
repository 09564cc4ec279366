"""Which pixels of each cell lie within a distance of the cell's own nucleus, compiled with numba."""

from __future__ import annotations

import numba
import numpy as np


def _disc_offsets(reach2: int) -> tuple[np.ndarray, np.ndarray]:
    """The (dy, dx) offsets with dy² + dx² <= reach2, nearest first."""
    r = int(np.sqrt(reach2)) + 1
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    d2 = dy * dy + dx * dx
    keep = d2 <= reach2
    order = np.argsort(d2[keep], kind="stable")
    return dy[keep][order].astype(np.int64), dx[keep][order].astype(np.int64)


@numba.njit(cache=True, nogil=True)
def _mark_beyond(lab, nuclei, dys, dxs, out):
    m, n = lab.shape
    for y in range(m):
        for x in range(n):
            own = lab[y, x]
            if own == 0 or nuclei[y, x] == own:
                continue
            found = False
            for k in range(dys.size):  # nearest first: a pixel near its nucleus stops early
                yy, xx = y + dys[k], x + dxs[k]
                if 0 <= yy < m and 0 <= xx < n and nuclei[yy, xx] == own:
                    found = True
                    break
            out[y, x] = not found


def beyond_own_nucleus(cells: np.ndarray, nuclei: np.ndarray, reach2: int) -> np.ndarray:
    """Pixels of a cell farther than ``sqrt(reach2)`` px from every pixel of the cell's own nucleus.

    Parameters
    ----------
    cells, nuclei : (M, N) int32 arrays
        Cell and nucleus labels (a cell shares its nucleus's id).
    reach2 : int
        Largest squared distance (px²) allowed.

    Returns
    -------
    (M, N) bool ndarray
    """
    dys, dxs = _disc_offsets(reach2)
    out = np.zeros(cells.shape, dtype=np.bool_)
    _mark_beyond(np.ascontiguousarray(cells, dtype=np.int32), np.ascontiguousarray(nuclei, dtype=np.int32),
                 dys, dxs, out)
    return out
