"""The camera's dark offset, estimated from the slide's darkest region (glass).

Raw counts carry a dark offset: a constant, or a different constant per band,
that no fluorophore emits. A library without a flat column cannot explain it,
and a flat column cannot explain an offset that differs between bands; either
way the unfitted counts are read as dyes (an offset of 100 counts fitted as
QD655, QD705 and autofluorescence turns a HER2-null slide into 2+). The unmix
step therefore always subtracts the offset estimated here, per band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dask.array as da
import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import nnls
from scipy.stats import trim_mean

from qdquant.errors import InputError
from qdquant.unmixing import evenly_spaced

__all__ = ["DarkOffset", "estimate_dark_offset", "library_explains"]


@dataclass(frozen=True)
class DarkOffset:
    """A dark offset estimated from the darkest region of a slide.

    Attributes
    ----------
    counts : (C,) float64 ndarray
        Offset per band, counts.
    n_pixels : int
        Pixels it was taken from (the darkest ``dark_fraction`` of the sample).
    dark_fraction : float
        The fraction of the sampled pixels they are.
    spread : (C,) float64 ndarray
        Standard deviation of those pixels per band, counts (read noise plus
        whatever faint light the dark region holds).
    """

    counts: np.ndarray
    n_pixels: int
    dark_fraction: float
    spread: np.ndarray

    @property
    def is_flat(self) -> bool:
        """True when the bands' offsets differ by less than their noise."""
        noise = max(float(np.median(self.spread)) / math.sqrt(max(self.n_pixels, 1)), 1e-9)
        return float(np.ptp(self.counts)) <= max(1.0, 6 * noise)


def _blocks(cube, max_pixels: int, max_blocks: int):
    """Evenly spaced (C, h, w) windows of ``cube``, strided to about ``max_pixels`` in all.

    A dask cube is read on at most ``max_blocks`` of its chunks (pass the
    file's own tiles to read little); a numpy cube is strided whole.
    """
    c, h, w = cube.shape
    if isinstance(cube, da.Array):
        nby, nbx = cube.numblocks[1], cube.numblocks[2]
        picks = evenly_spaced(nby * nbx, max_blocks)
        per_block = max(1, max_pixels // picks.size)
        parts = []
        for p in picks:
            blk = cube.blocks[:, p // nbx, p % nbx]
            stride = max(1, int(math.sqrt(blk.shape[1] * blk.shape[2] / per_block)))
            parts.append(blk[:, ::stride, ::stride])
        return [np.asarray(b) for b in da.compute(*parts)]
    stride = max(1, int(math.sqrt(h * w / max_pixels)))
    return [np.asarray(cube)[:, ::stride, ::stride]]


def estimate_dark_offset(cube, *, dark_fraction: float = 0.01, smooth_px: int = 5,
                         max_pixels: int = 1_000_000, max_blocks: int = 64) -> DarkOffset:
    """Estimate each band's dark offset from the slide's darkest region.

    The pixels of the sample are ranked by their local brightness (the sum
    over bands, averaged over ``smooth_px`` x ``smooth_px`` sampled pixels),
    and the offset of a band is the mean (10 % trimmed at each end) of the
    darkest ``dark_fraction`` of them. Ranking by the neighbourhood rather
    than by the pixel's own counts picks a dark *region* (glass, a lumen)
    without favouring pixels whose noise happens to be low, so the mean is
    not biased low by the noise as a low percentile of each band is. Pixels that are exactly 0 in
    every band (padding outside a scan) are left out.

    Parameters
    ----------
    cube : (C, Y, X) numpy or dask array
        Raw counts. For a dask cube, at most ``max_blocks`` evenly spaced
        chunks are read: pass the file's own tiles to read little of a
        whole slide.
    dark_fraction : float, optional
        Fraction of the sampled pixels taken as dark (default 1 %). A slide
        with at least this much glass gets the camera's offset; a slide
        covered with tissue gets the offset plus the faintest tissue's light,
        which is then removed from every pixel (a small, uniform loss of
        autofluorescence).
    smooth_px : int, optional
        Edge of the neighbourhood (in sampled pixels) over which brightness
        is averaged for the ranking.
    max_pixels : int, optional
        About how many pixels are sampled (a regular grid in each window).
    max_blocks : int, optional
        Most chunks of a dask cube read.

    Returns
    -------
    DarkOffset

    Raises
    ------
    InputError
        When ``cube`` is not a 3-D numeric array, has no pixels, or holds
        NaN or inf in the sample.
    """
    shape = getattr(cube, "shape", None)
    if shape is None or len(shape) != 3 or not np.issubdtype(np.dtype(cube.dtype), np.number):
        raise InputError(f"cube must be a numeric (C, Y, X) array, got shape {shape}")
    if not 0 < dark_fraction <= 1:
        raise InputError(f"dark_fraction must be in (0, 1], got {dark_fraction}")
    c = shape[0]
    if min(shape) == 0:
        raise InputError(f"cube has no pixels; shape {tuple(shape)}")
    brightness, values = [], []
    for block in _blocks(cube, max_pixels, max_blocks):
        block = block.astype(np.float32, copy=False)
        if not np.isfinite(block).all():
            raise InputError(f"cube contains NaN or inf; shape {tuple(shape)}")
        total = block.sum(axis=0)
        live = (block != 0).any(axis=0)
        # the mean over the live neighbours: padding does not make its neighbours look dark
        weight = ndi.uniform_filter(live.astype(np.float32), size=smooth_px, mode="nearest")
        local = ndi.uniform_filter(total * live, size=smooth_px, mode="nearest") / np.maximum(weight, 1e-6)
        brightness.append(local[live])
        values.append(block[:, live])
    brightness = np.concatenate(brightness)
    values = np.concatenate(values, axis=1)
    if brightness.size == 0:  # nothing but zeros: no offset to remove
        return DarkOffset(np.zeros(c), 0, dark_fraction, np.zeros(c))
    n = max(1, min(brightness.size, int(round(dark_fraction * brightness.size))))
    darkest = np.argpartition(brightness, n - 1)[:n]
    dark = values[:, darkest].astype(np.float64)
    # a trimmed mean: robust to dust and hot pixels like a median, not rounded to whole counts like
    # the median of integer counts
    return DarkOffset(trim_mean(dark, 0.1, axis=1), n, dark_fraction, dark.std(axis=1))


def library_explains(spectra, offset: DarkOffset, *, tolerance: float = 0.02) -> bool:
    """Whether the library alone (no subtraction) explains the dark region's spectrum.

    The dark region's spectrum is fitted by non-negative least
    squares on the library's columns; it is explained when the RMS residual
    is at most ``tolerance`` of its mean (or 1 count). A library with a flat
    column explains a constant offset on glass; one without, or an offset
    that differs between bands, is not explained, and the unmix step warns
    that it subtracted the estimate.

    Parameters
    ----------
    spectra : (C, K) array_like
        The library.
    offset : DarkOffset
    tolerance : float
        Relative RMS residual allowed.

    Returns
    -------
    bool
    """
    a = np.asarray(spectra, dtype=np.float64)
    p = offset.counts
    _, rnorm = nnls(a, p)
    rms = rnorm / math.sqrt(len(p))
    return rms <= max(1.0, tolerance * float(np.abs(p).mean()))
