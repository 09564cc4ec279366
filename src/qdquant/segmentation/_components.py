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


@numba.njit(cache=True, nogil=True)
def _label_sums_kernel(lab, values, out):
    m, n = lab.shape
    for i in range(m):
        y = np.float64(i)
        for j in range(n):
            v = lab[i, j]
            if v == 0:
                continue
            x = np.float64(j)
            out[0, v] += 1.0
            out[1, v] += y
            out[2, v] += x
            out[3, v] += y * y
            out[4, v] += x * x
            out[5, v] += y * x
            out[6, v] += np.float64(values[i, j])


def label_sums(lab: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """(7, n + 1) float64 per-label sums: count, y, x, yy, xx, xy (pixel centres, pixels) and ``values``.

    Accumulated in raster order, as ``np.bincount`` over ``np.nonzero(lab)``
    does (the same sums to the last bit), in one pass over the image.
    """
    out = np.zeros((7, n + 1))
    _label_sums_kernel(np.ascontiguousarray(lab), np.ascontiguousarray(values), out)
    return out


@numba.njit(cache=True, nogil=True)
def _contacts_kernel(lab, values, lo, hi, mean, fill):
    m, n = lab.shape
    half = np.float32(0.5)
    k = 0
    for axis in range(2):  # horizontal neighbours, then vertical ones, each in raster order
        for i in range(m - axis):
            for j in range(n - 1 + axis):
                a = lab[i, j]
                b = lab[i + axis, j + 1 - axis]
                if a == 0 or b == 0 or a == b:
                    continue
                if fill:
                    lo[k] = min(a, b)
                    hi[k] = max(a, b)
                    mean[k] = half * (values[i, j] + values[i + axis, j + 1 - axis])
                k += 1
    return k


def contacts(lab: np.ndarray, values: np.ndarray):
    """Every pair of 4-neighbours with different non-zero labels: the labels (low, high) and the mean of ``values``.

    Horizontal pairs first, then vertical ones, each in raster order
    (float32 means, as numpy computes ``0.5 * (a + b)`` of float32 values).

    Returns
    -------
    lo, hi : ndarrays of ``lab``'s dtype
    mean : ndarray of float32
    """
    lab = np.ascontiguousarray(lab)
    values = np.ascontiguousarray(values, dtype=np.float32)
    empty = np.empty(0, lab.dtype)
    k = _contacts_kernel(lab, values, empty, empty, np.empty(0, np.float32), False)
    lo, hi, mean = np.empty(k, lab.dtype), np.empty(k, lab.dtype), np.empty(k, np.float32)
    _contacts_kernel(lab, values, lo, hi, mean, True)
    return lo, hi, mean
