"""The numba engine of :func:`~qdquant.unmixing.unmix`: which kernel runs, on what, how many threads.

:func:`prepare` computes once per call what the kernels read (G, its
inverse, the tables of restricted inverses); :func:`unmix_into` runs the
kernel that fits the problem (see :mod:`qdquant.unmixing.kernels`) on a
numpy cube and re-solves, with the numpy FC-NNLS, the few pixels it flags.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np

from qdquant.unmixing.gain import fit_gained_slabs
from qdquant.unmixing.kernels import K16_MAX, KP, TILE
from qdquant.unmixing.kernels.lanes import lane_kernel, table16
from qdquant.unmixing.kernels.scalar import inverse_table, tiles, tiles_parallel
from qdquant.unmixing.nnls import SharedGram, unmix_slab, work_dtype
from qdquant.unmixing.validation import NonFiniteCube

#: Cube dtypes the kernels read directly (others are converted first).
NB_SUPPORTED = frozenset(np.dtype(t) for t in (
    np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64,
    np.float32, np.float64,
))


@dataclass(frozen=True)
class Plan:
    """What the kernels read for one library and weighting, computed once per :func:`unmix` call.

    Attributes
    ----------
    gram, ginv : (K, K) float64 arrays
        ``G = A.T @ A`` and its inverse.
    fast : bool
        The table path of the scalar kernel (K <= ``KP``, vector kernels on).
    g8, table, ok : arrays
        G padded to ``KP`` x ``KP`` (flat), and its
        :func:`~qdquant.unmixing.kernels.scalar.inverse_table` (empty unless ``fast``).
    lanes : int
        Lanes of the vector kernel that fits the problem: 8, 16, or 0 for none.
    lane_args : tuple
        The vector kernel's ``ak, ginvk, gsk, table, ok`` (empty when ``lanes`` is 0).
    max_outer : int
        Lawson-Hanson outer steps per pixel and start.
    """

    gram: np.ndarray
    ginv: np.ndarray
    fast: bool
    g8: np.ndarray
    table: np.ndarray
    ok: np.ndarray
    lanes: int
    lane_args: tuple
    max_outer: int


def _lanes8_args(a, g8, table, ok):
    """The 8-lane kernel's ak, ginvk, gsk, table, ok from G padded to ``KP`` x ``KP`` and its inverse table."""
    c, k = a.shape
    a8 = np.zeros((c, KP))
    a8[:, :k] = a
    ginv8 = np.linalg.inv(g8)
    gs8 = np.triu(g8) * (2.0 - np.eye(KP))
    inv = table.reshape(-1, KP, KP)
    grad = np.eye(KP) - g8 @ inv  # b -> b - G z
    table8 = np.concatenate([inv.transpose(0, 2, 1), grad.transpose(0, 2, 1)], axis=1)
    return (a8.ravel(), ginv8.ravel(), gs8.ravel(), np.ascontiguousarray(table8).ravel(),
            ok.astype(np.uint8))


def _lanes16_args(a, gram, ginv):
    """The 16-lane kernel's ak, ginvk, gsk, table, ok (see :func:`~qdquant.unmixing.kernels.lanes.table16`)."""
    k = a.shape[1]
    gs = np.triu(gram) * (2.0 - np.eye(k))
    n = (1 << k) * 32 * k
    buf = np.zeros(n + 8)
    off = (-buf.ctypes.data % 64) // 8  # 64-byte aligned: a table column is two cache lines
    table = buf[off:off + n]
    ok = np.zeros(1 << k, np.uint8)
    table16(gram, table, ok)
    return (a.ravel(), ginv.ravel(), gs.ravel(), table, ok)


def prepare(a, weights, *, vector_kernels=True, lh_iter_factor=3):
    """The :class:`Plan` of library ``a`` (C, K) float64 and ``weights`` (None or "poisson").

    ``vector_kernels`` False runs the scalar kernel's Cholesky path for every
    K; ``lh_iter_factor``: Lawson-Hanson outer steps per pixel and start,
    ``lh_iter_factor * K + 1``.
    """
    k = a.shape[1]
    gram = np.ascontiguousarray(a.T @ a)
    ginv = np.ascontiguousarray(np.linalg.inv(gram))
    fast = bool(vector_kernels and k <= KP)
    g8 = np.eye(KP)
    if fast:
        g8[:k, :k] = gram
        table, ok = inverse_table(g8)
    else:
        table, ok = np.zeros(0), np.zeros(0, np.bool_)
    lanes, lane_args = 0, ()
    if fast and weights is None:
        lanes, lane_args = 8, _lanes8_args(a, g8, table, ok)
    elif vector_kernels and KP < k <= K16_MAX and weights is None:
        lanes, lane_args = 16, _lanes16_args(a, gram, ginv)
    return Plan(gram, ginv, fast, g8.ravel(), table, ok, lanes, lane_args, lh_iter_factor * k + 1)


def _flat_plane(arr):
    """``arr`` (..., H, W) as a (..., 1, H*W) view when that needs no copy, else ``arr``."""
    h, w = arr.shape[-2:]
    if h > 1 and arr.strides[-2] == arr.strides[-1] * w:
        return arr.reshape(arr.shape[:-2] + (1, h * w))
    return arr


def _run_lanes(plan, cube_v, off, gain_v, hk, gained, outs, n_threads, n_chunks):
    """Run the vector kernel on all tiles, in ``n_chunks`` ranges of tiles on a pool of ``n_threads``."""
    ntiles = cube_v.shape[1] * (-(-cube_v.shape[2] // TILE))
    kr = plan.gram.shape[0] if plan.lanes == 16 else KP
    ath = plan.lane_args[0].reshape(-1, kr).T @ hk
    args = plan.lane_args + (off, gain_v, hk, ath, float(hk @ hk), plan.gram.shape[0], plan.max_outer)
    kern = lane_kernel(plan.lanes, kr, gained)
    if n_chunks == 1:
        return kern(cube_v, *args, 0, ntiles, *outs)
    bounds = [ntiles * ch // n_chunks for ch in range(n_chunks + 1)]
    with ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="qdquant-unmix") as pool:
        counts = list(pool.map(lambda t01: kern(cube_v, *args, t01[0], t01[1], *outs),
                               zip(bounds[:-1], bounds[1:])))
    return tuple(sum(v) for v in zip(*counts))


def unmix_into(cube, a, offset, weights, abund, resid, *, plan, tuning, parallel=True, gain=None,
               gain_offset=None):
    """Unmix a numpy (C, Y, X) cube into preallocated ``abund`` (K, Y, X) and ``resid`` (Y, X) float32.

    ``plan``: :func:`prepare` of ``a``; ``tuning``: a
    :class:`~qdquant.unmixing.Tuning`; ``parallel``: on numba's threads
    (else one). ``gain`` (Y, X), ``gain_offset`` (C,) (not None with a
    gain): fit ``apply_gain(cube, gain, gain_offset)``; the 16-lane kernel
    applies it in its pass over the bands, the others fit corrected slabs.
    Raises :class:`~qdquant.unmixing.validation.NonFiniteCube` for a NaN or
    inf.
    """
    c, h, w = cube.shape
    k = a.shape[1]

    def again(sub, ab, rs, sub_gain=None):  # this function on a part of the cube
        unmix_into(sub, a, offset, weights, ab, rs, plan=plan, tuning=tuning, parallel=parallel,
                   gain=sub_gain, gain_offset=gain_offset)

    if gain is not None and plan.lanes != 16:
        fit_gained_slabs(again, cube, gain, gain_offset, abund, resid, slab_px=tuning.gain_slab_px,
                         engine="numba")
        return
    if np.dtype(cube.dtype) not in NB_SUPPORTED or not cube.dtype.isnative:
        cube = cube.astype(work_dtype(cube.dtype))
    if (cube.strides[-1] != cube.itemsize and weights is None and tuning.vector_kernels and k <= K16_MAX
            and h > 0 and w > 1):  # (for w = 1 numpy's contiguous copy may keep the stride)
        # The vector kernels load 8 neighbouring pixels at once. A copy of a
        # slab of rows costs a few ns a pixel, the scalar kernel (which reads
        # any strides) 4-5 times the 8-lane kernel's time and 10-12 times the
        # 16-lane one's; and such cubes are common: the pixels picked by
        # advanced indexing, b[:, idx] (library refinement), lie strided along X.
        rows = max(1, tuning.strided_slab_px // w)
        for y0 in range(0, h, rows):
            y1 = min(h, y0 + rows)
            again(np.ascontiguousarray(cube[:, y0:y1]), abund[:, y0:y1], resid[y0:y1],
                  None if gain is None else gain[y0:y1])
        return
    off = np.zeros(c) if offset is None else np.ascontiguousarray(offset, dtype=np.float64)
    status = np.zeros((h, w), np.int8)
    raw = cube
    if w < TILE // 4 and _flat_plane(cube).shape[-2] != 1:
        cube = np.ascontiguousarray(cube)  # narrow rows would make tiny tiles
    # the gain (1, H, W) and what the kernel adds for the gain's offset; inert without a gain
    if gain is None:
        gain3, hk = np.ones((1, 1, 1), np.float32), np.zeros(c)
    else:
        gain3 = np.ascontiguousarray(gain, dtype=np.float32)[None]
        hk = np.asarray(gain_offset, dtype=np.float64) - off
    views = [_flat_plane(v) for v in (cube, abund, resid[None], status[None], gain3)]
    if all(v.shape[-2] == 1 for v in views):  # one long row of pixels: full tiles
        cube_v, abund_v, resid_v, status_v, gain_v = views[0], views[1], views[2][0], views[3][0], views[4]
    else:  # tiles along each row, the last one short
        cube_v, abund_v, resid_v, status_v, gain_v = cube, abund, resid, status, gain3
    ntiles = cube_v.shape[1] * (-(-cube_v.shape[2] // TILE))
    n_threads = numba.get_num_threads() if parallel else 1
    n_chunks = min(ntiles, 4 * n_threads) if n_threads > 1 else 1
    unit = all(v.strides[-1] == v.itemsize for v in (cube_v, abund_v, resid_v))
    if gain is not None and not unit:  # (outputs that no caller of ours passes)
        fit_gained_slabs(again, raw, gain, gain_offset, abund, resid, slab_px=tuning.gain_slab_px,
                         engine="numba")
        return
    if plan.lanes and unit:  # the vector kernel
        n_bad, n_nonfinite = _run_lanes(plan, cube_v, off, gain_v, hk, gain is not None,
                                        (abund_v, resid_v[None], status_v), n_threads, n_chunks)
    else:
        args = (a, plan.gram, plan.ginv, plan.table, plan.ok, plan.g8, plan.fast, off, weights == "poisson",
                plan.max_outer)
        if n_chunks > 1:
            n_bad, n_nonfinite = tiles_parallel(cube_v, *args, n_chunks, abund_v, resid_v, status_v)
        else:
            n_bad, n_nonfinite = tiles(cube_v, *args, 0, ntiles, abund_v, resid_v, status_v)
    if n_nonfinite:
        raise NonFiniteCube("cube contains NaN or inf pixel values")
    if n_bad:  # rare: not converged or not positive definite; numpy FC-NNLS
        _refit_flagged(cube, status, a, plan.gram, offset, weights, abund, resid, gain, gain_offset,
                       tuning.on_fallback)


def _refit_flagged(cube, status, a, gram, offset, weights, abund, resid, gain, gain_offset, on_fallback):
    """Re-solve the pixels with a nonzero ``status`` with the numpy FC-NNLS, in place.

    ``on_fallback``, when not None, is called with their (C, n) spectra first.
    """
    bad = np.nonzero(status)
    b = np.asarray(cube[:, bad[0], bad[1]], dtype=np.float64)
    if gain is not None:
        go = np.asarray(gain_offset, dtype=np.float64)[:, None]
        b = go + np.asarray(gain, dtype=np.float64)[bad] * (b - go)
    if on_fallback is not None:
        on_fallback(b)
    x, rms = unmix_slab(b, a, a, SharedGram(gram), offset, weights)
    abund[:, bad[0], bad[1]] = x
    resid[bad] = rms
