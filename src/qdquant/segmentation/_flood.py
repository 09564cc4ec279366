"""Seeded watershed (priority flood) on a 2-D float32 landscape, compiled with numba.

The flood of :func:`skimage.segmentation.watershed` with ``connectivity=1``
and no compactness: a queued pixel's value is its own or, if higher, that of
the pixel that queued it (the flood level never falls); pixels leave the
queue lowest value first, ties to the one queued first; a pixel takes the
label of the neighbour that queued it (neighbours in the order up, left,
right, down), seeds enter the queue at their own value. One difference:
seeds of equal value leave the queue in raster order, where skimage's heap
leaves them in an order of its own (20 and 118 of 2.7 million cell pixels
differ on two 2192² tiles of a simulated slide).

Pixels of different 4-connected regions of the pixels to flood never meet,
so each region is flooded on its own, with a heap of its own front: the
heap stays small and the pixels it visits stay in the cache, several times
faster than one heap over the whole image.
"""

from __future__ import annotations

import numba
import numpy as np

_BLOCKED, _FREE, _SEED, _QUEUED, _SEEN = 0, 1, 2, 3, 4


# A 4-ary heap: half the levels of a binary one, and the four children of a
# node share a cache line.
@numba.njit(cache=True, nogil=True, inline="always")
def _sift_up(keys, idx, pos):
    key, p = keys[pos], idx[pos]
    while pos > 0:
        parent = (pos - 1) >> 2
        if keys[parent] <= key:
            break
        keys[pos] = keys[parent]
        idx[pos] = idx[parent]
        pos = parent
    keys[pos] = key
    idx[pos] = p


@numba.njit(cache=True, nogil=True, inline="always")
def _sift_down(keys, idx, size):
    key, p = keys[0], idx[0]
    pos = 0
    while True:
        first = 4 * pos + 1
        if first >= size:
            break
        child = first
        kc = keys[first]
        for c in range(first + 1, min(first + 4, size)):
            if keys[c] < kc:
                kc = keys[c]
                child = c
        if kc >= key:
            break
        keys[pos] = kc
        idx[pos] = idx[child]
        pos = child
    keys[pos] = key
    idx[pos] = p


@numba.njit(cache=True, nogil=True)
def _padded(bits, markers, mask, use_mask):
    """The padded arrays :func:`_flood_kernel` works on, built in one pass.

    ``order``: float32 bits made unsigned integers in the same order (every
    bit of a negative value flipped, the sign bit of the others; -0.0 as
    0.0, which compares equal to it); ``labels``: the seeds inside the mask;
    ``state``: ``_SEED``, ``_FREE`` or ``_BLOCKED`` (outside the mask, and
    the one-pixel border).
    """
    m, n = markers.shape
    order = np.zeros((m + 2, n + 2), np.uint32)
    labels = np.zeros((m + 2, n + 2), np.int32)
    state = np.zeros((m + 2, n + 2), np.uint8)
    for i in range(m):
        for j in range(n):
            b = bits[i, j]
            if b == np.uint32(0x80000000):
                b = np.uint32(0)
            order[i + 1, j + 1] = ~b if b >> np.uint32(31) else b | np.uint32(0x80000000)
            if use_mask and not mask[i, j]:
                continue
            v = markers[i, j]
            labels[i + 1, j + 1] = v
            state[i + 1, j + 1] = _SEED if v != 0 else _FREE
    return order, labels, state


@numba.njit(cache=True, nogil=True)
def _collect(state, offs, start, region, seeds):
    """The region of ``start`` (marked ``_QUEUED``) into ``region``, the seeds next to it into ``seeds``.

    Returns their numbers. (Each step of the flood is a function of its own
    whose arrays are arguments: numba keeps an array that a loop may
    reassign in memory, several times slower to index.)
    """
    n_region, n_seeds = 1, 0
    region[0] = start
    state[start] = _QUEUED
    i = 0
    while i < n_region:
        p = region[i]
        i += 1
        for k in range(4):
            q = p + offs[k]
            s = state[q]
            if s == _FREE:
                region[n_region] = q
                n_region += 1
                state[q] = _QUEUED
            elif s == _SEED:
                seeds[n_seeds] = q
                n_seeds += 1
                state[q] = _SEEN
    for j in range(n_seeds):
        state[seeds[j]] = _SEED  # a seed may border other regions too
    return n_region, n_seeds


@numba.njit(cache=True, nogil=True)
def _flood_region(order, labels, state, offs, seed_keys, keys, idx):
    """Flood one collected region from its seeds (``seed_keys``, sorted).

    Keys are ``(value bits << 32) | tie``, all distinct: a seed's tie is its
    pixel index (< 2**31), a flooded pixel's 2**31 + its entry count, so that
    seeds leave in raster order among equal values and before the pixels
    they reach.
    """
    shift = np.uint64(32)
    low = np.uint64(0xFFFFFFFF)
    n_seeds = seed_keys.shape[0]
    next_seed = 0
    size = 0
    age = np.uint64(1 << 31)
    while True:
        if next_seed < n_seeds and (size == 0 or seed_keys[next_seed] < keys[0]):
            key = seed_keys[next_seed]
            p = np.int64(key & low)
            next_seed += 1
        elif size > 0:
            key = keys[0]
            p = np.int64(idx[0])
            size -= 1
            keys[0] = keys[size]
            idx[0] = idx[size]
            _sift_down(keys, idx, size)
        else:
            break
        level = key >> shift
        lab = labels[p]
        for k in range(4):
            q = p + offs[k]
            if state[q] != _QUEUED:
                continue
            state[q] = _BLOCKED
            labels[q] = lab
            keys[size] = (max(np.uint64(order[q]), level) << shift) | age
            idx[size] = q
            _sift_up(keys, idx, size)
            size += 1
            age += np.uint64(1)


@numba.njit(cache=True, nogil=True)
def _flood_kernel(order, labels, state, width):
    """Flood ``labels`` over the ``_FREE`` pixels of ``state``, one region at a time.

    1-D views of :func:`_padded`'s arrays, rows of ``width``; ``labels`` and
    ``state`` are overwritten. A region's seeds wait in a sorted list of
    their own, so the heap holds only the flood front (at most the region).
    """
    n = labels.shape[0]
    offs = np.array([-width, -1, 1, width], np.int64)
    n_free = n_seed = 0
    for p in range(n):
        n_free += state[p] == _FREE
        n_seed += state[p] == _SEED
    region = np.empty(max(n_free, 1), np.int32)
    seeds = np.empty(max(n_seed, 1), np.int32)
    seed_keys = np.empty(max(n_seed, 1), np.uint64)
    keys = np.empty(1024, np.uint64)
    idx = np.empty(1024, np.int32)
    for start in range(n):
        if state[start] != _FREE:
            continue
        n_region, n_seeds = _collect(state, offs, start, region, seeds)
        if keys.shape[0] < n_region:
            keys = np.empty(2 * n_region, np.uint64)
            idx = np.empty(2 * n_region, np.int32)
        for j in range(n_seeds):
            seed_keys[j] = (np.uint64(order[seeds[j]]) << np.uint64(32)) | np.uint64(seeds[j])
        seed_keys[:n_seeds].sort()
        _flood_region(order, labels, state, offs, seed_keys[:n_seeds], keys, idx)


def flood(land: np.ndarray, markers: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Seeded watershed of ``land`` from ``markers``, inside ``mask`` (4-connected).

    Parameters
    ----------
    land : (M, N) ndarray of float
        Landscape, any units; finite (cast to float32).
    markers : (M, N) ndarray of int
        Seeds, 0 = to flood; ids in [1, 2**31 - 1].
    mask : (M, N) ndarray of bool, optional
        Pixels that may be flooded (default: all); seeds outside it are dropped.

    Returns
    -------
    labels : (M, N) ndarray of int32
        Every pixel of ``mask`` connected to a seed takes a seed's id; the
        rest is 0.
    """
    markers = np.ascontiguousarray(markers, dtype=np.int32)
    m, n = markers.shape
    if (m + 2) * (n + 2) >= 2**31:
        raise ValueError(f"flood: image of shape {markers.shape} is over 2**31 pixels")
    bits = np.ascontiguousarray(land, dtype=np.float32).view(np.uint32)
    use_mask = mask is not None
    mask = np.ascontiguousarray(mask, dtype=bool) if use_mask else np.ones((1, 1), bool)
    order, labels, state = _padded(bits, markers, mask, use_mask)
    _flood_kernel(order.ravel(), labels.ravel(), state.ravel(), n + 2)
    return labels[1:-1, 1:-1].copy()
