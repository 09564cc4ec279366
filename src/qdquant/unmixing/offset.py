"""The camera's dark offset, estimated from the image itself."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np

from qdquant.errors import InputError
from qdquant.unmixing.validation import check_cube_shape


def evenly_spaced(n, count):
    """``count`` (at most ``n``) evenly spaced indices of ``0 .. n - 1``, first and last included."""
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))


def estimate_offset(cube, *, percentile=1.0, max_pixels=1_000_000):
    """Estimate each band's dark offset (counts) from the image itself.

    Parameters
    ----------
    cube : (C, Y, X) numpy or dask array
        The image, in counts.
    percentile : float, optional
        The offset of a band is this low percentile of its pixel values, on
        the premise that some pixels (slide background, empty glass) carry no
        fluorescence. Default 1.0.
    max_pixels : int, optional
        Pixels looked at: a regular grid (stride in Y and X) of about this many
        pixels. A dask cube reads at most 16 evenly spaced chunks.

    Returns
    -------
    offset : (C,) float64 array
        Counts per band.

    Notes
    -----
    Noise spreads the background pixels around the offset, so a low
    percentile slightly underestimates it (by about 2.3 noise sigmas at 1 %),
    which keeps the subtracted cube non-negative on the background.
    """
    check_cube_shape(cube)
    c, h, w = cube.shape
    if not 0 <= percentile <= 100:
        raise InputError(f"percentile must be in [0, 100], got {percentile}")
    if isinstance(cube, da.Array):
        nby, nbx = cube.numblocks[1], cube.numblocks[2]
        picks = evenly_spaced(nby * nbx, 16)
        parts = []
        per_block = max(1, max_pixels // picks.size)
        for p in picks:
            blk = cube.blocks[:, p // nbx, p % nbx]
            bh, bw = blk.shape[1:]
            stride = max(1, int(math.sqrt(bh * bw / per_block)))
            parts.append(blk[:, ::stride, ::stride].reshape(c, -1))
        sample = np.concatenate(da.compute(*parts), axis=1)
    else:
        cube = np.asarray(cube)
        stride = max(1, int(math.sqrt(h * w / max_pixels)))
        sample = cube[:, ::stride, ::stride].reshape(c, -1)
    sample = np.asarray(sample)
    if sample.shape[1] == 0:
        raise InputError(f"cube has no pixels; shape {cube.shape}")
    if sample.dtype.kind == "f" and not np.isfinite(sample).all():
        raise InputError(f"cube contains NaN or inf; shape {cube.shape}")
    # np.percentile's linear interpolation between the two order statistics
    # around the rank, from one partition of the samples in their own dtype
    pos = percentile / 100.0 * (sample.shape[1] - 1)
    k = int(math.floor(pos))
    kth = sorted({k, min(k + 1, sample.shape[1] - 1)})
    if sample.dtype.kind in "ui" and sample.dtype.itemsize <= 2:  # a histogram: faster than a partition
        order = np.empty((c, len(kth)))
        for band, row in enumerate(sample):
            low = int(row.min()) if row.dtype.kind == "i" else 0
            ranks = np.cumsum(np.bincount(row.astype(np.int32) - low if low else row))
            order[band] = np.searchsorted(ranks, kth, side="right") + low
        lo, hi = order[:, 0], order[:, -1]
    else:
        part = np.partition(sample, kth, axis=1)
        lo, hi = part[:, kth[0]].astype(np.float64), part[:, kth[-1]].astype(np.float64)
    return lo + (pos - k) * (hi - lo)
