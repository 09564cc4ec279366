"""4-connected pieces of a label image, compiled with numba: largest piece per label, hole filling.

Each piece is walked once from its first pixel in raster order, so pieces
are numbered as :func:`skimage.measure.label` numbers them.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _walk(lab, start, seen, stack):
    """Mark the 4-connected piece of ``lab[start]``'s value around ``start`` in ``seen``.

    Returns the piece's size (its pixels, flat indices, are the first
    ``size`` of ``stack``, which holds the whole image) and whether it
    touches the image edge.
    """
    m, n = lab.shape
    flat = lab.reshape(lab.size)
    value = flat[start]
    seen[start] = True
    stack[0] = start
    size, i, edge = 1, 0, False
    while i < size:
        p = stack[i]
        i += 1
        y, x = p // n, p % n
        if y == 0 or y == m - 1 or x == 0 or x == n - 1:
            edge = True
        for k in range(4):
            if k == 0:
                if y == 0:
                    continue
                q = p - n
            elif k == 1:
                if x == 0:
                    continue
                q = p - 1
            elif k == 2:
                if x == n - 1:
                    continue
                q = p + 1
            else:
                if y == m - 1:
                    continue
                q = p + n
            if seen[q] or flat[q] != value:
                continue
            seen[q] = True
            stack[size] = q
            size += 1
    return size, edge


@numba.njit(cache=True, nogil=True)
def _pieces_kernel(lab, pieces, stack):
    flat, out = lab.reshape(lab.size), pieces.reshape(pieces.size)
    seen = np.zeros(flat.shape[0], np.bool_)
    n_pieces = 0
    for start in range(flat.shape[0]):
        if flat[start] == 0 or seen[start]:
            continue
        size, _ = _walk(lab, start, seen, stack)
        n_pieces += 1
        for i in range(size):
            out[stack[i]] = n_pieces
    return n_pieces


def _stack(size: int) -> np.ndarray:
    """Work array of flat pixel indices for :func:`_walk` (a whole image's worth: never grown,
    as numba indexes an array that a loop may reassign several times slower)."""
    return np.empty(size, np.int32 if size < 2**31 else np.int64)


def pieces(lab: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected pieces of each label of ``lab`` (0 = background), numbered 1.. in raster order.

    The same as ``skimage.measure.label(lab, background=0, connectivity=1)``.

    Returns
    -------
    pieces : ndarray of int32
    n : int
        Number of pieces.
    """
    lab = np.ascontiguousarray(lab)
    out = np.zeros(lab.shape, np.int32)
    n = _pieces_kernel(lab, out, _stack(lab.size))
    return out, int(n)


@numba.njit(cache=True, nogil=True)
def _fill_holes_kernel(lab, stack):
    m, n = lab.shape
    flat = lab.reshape(lab.size)
    seen = np.zeros(flat.shape[0], np.bool_)
    for start in range(flat.shape[0]):
        if flat[start] != 0 or seen[start]:
            continue
        size, edge = _walk(lab, start, seen, stack)
        if edge:
            continue
        # the labels next to the hole: fill it if there is exactly one
        only, several = 0, False
        for i in range(size):
            p = stack[i]
            for q in (p - n, p - 1, p + 1, p + n):  # a hole does not touch the edge
                v = flat[q]
                if v != 0 and v != only:
                    if only == 0:
                        only = v
                    else:
                        several = True
            if several:
                break
        if only != 0 and not several:
            for i in range(size):
                flat[stack[i]] = only


def fill_holes(lab: np.ndarray) -> np.ndarray:
    """Fill the background holes (4-connected, not touching the edge) that touch a single label with it.

    Parameters
    ----------
    lab : (M, N) ndarray of int
        Labels, 0 = background; not modified.

    Returns
    -------
    (M, N) ndarray, ``lab``'s dtype
    """
    out = np.array(lab, order="C")
    _fill_holes_kernel(out, _stack(out.size))
    return out
