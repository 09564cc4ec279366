"""Linear spectral unmixing (first version: per-pixel NNLS; to be replaced)."""

from __future__ import annotations

import dask.array as da
import numpy as np
from scipy.optimize import nnls


def _unmix_block(block, spectra):
    c, h, w = block.shape
    pixels = block.reshape(c, -1).astype(np.float64)
    out = np.zeros((spectra.shape[1], pixels.shape[1]))
    for i in range(pixels.shape[1]):
        out[:, i] = nnls(spectra, pixels[:, i])[0]
    resid = np.sqrt(np.mean((spectra @ out - pixels) ** 2, axis=0))
    return np.concatenate([out, resid[None]]).reshape(-1, h, w).astype(np.float32)


def unmix(cube, spectra, *, offset=None, weights=None):
    """Non-negative least squares abundances (K, Y, X) and RMS residual (Y, X)."""
    spectra = np.asarray(spectra, dtype=np.float64)
    k = spectra.shape[1]
    if isinstance(cube, da.Array):
        cube = cube.rechunk({0: -1})
        out = cube.map_blocks(_unmix_block, spectra, dtype=np.float32,
                              chunks=((k + 1,),) + cube.chunks[1:])
    else:
        out = _unmix_block(np.asarray(cube), spectra)
    return out[:k], out[k]
