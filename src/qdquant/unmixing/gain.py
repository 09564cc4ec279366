"""A per-pixel gain (a shading correction) applied to a cube, whole or by slabs."""

from __future__ import annotations

import numpy as np


def apply_gain(cube, gain, gain_offset, out=None, *, engine="auto"):
    """``gain_offset + gain * (cube - gain_offset)``, float32, in one pass.

    Parameters
    ----------
    cube : (C, Y, X) numpy array
        Counts, any real dtype.
    gain : (Y, X) array
        Multiplier of each pixel's signal (e.g. the inverse of a shading profile).
    gain_offset : (C,) array
        The part of each band that the gain leaves alone (the camera's dark offset), counts.
    out : (C, Y, X) float32 array, optional
        Where to write; default a new array.
    engine : {"auto", "numpy", "numba"}, optional
        "numba": one compiled pass over the cube; "numpy": three array
        operations (the same float32 arithmetic); "auto" (default): numba
        when it imports.

    Returns
    -------
    (C, Y, X) float32 array
    """
    from qdquant.unmixing.fit import resolve_engine

    gain = np.asarray(gain, dtype=np.float32)
    gain_offset = np.asarray(gain_offset, dtype=np.float32)
    if out is None:
        out = np.empty(cube.shape, np.float32)
    if resolve_engine(engine) == "numba" and cube.size:
        from qdquant.unmixing.kernels.gain import apply_gain as nb_apply_gain

        nb_apply_gain(cube, gain, gain_offset, out)
    else:
        np.subtract(cube, gain_offset[:, None, None], out=out, dtype=np.float32)
        out *= gain
        out += gain_offset[:, None, None]
    return out


def fit_gained_slabs(fit, cube, gain, gain_offset, abund, resid, *, slab_px, engine):
    """``fit`` of ``apply_gain(cube, gain, gain_offset)``, by slabs of rows into one buffer.

    ``fit(slab, abund, resid)`` unmixes a (C, y, X) float32 slab into the
    matching rows of the outputs. A slab has about ``slab_px`` pixels (a
    float32 slab of 31 bands at 65536 pixels: 8 MB, reused: no corrected
    copy of the cube, no fresh pages).
    """
    c, h, w = cube.shape
    rows = max(1, slab_px // max(w, 1))
    buf = np.empty((c, min(rows, h), w), np.float32)
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        slab = apply_gain(cube[:, y0:y1], gain[y0:y1], gain_offset, out=buf[:, : y1 - y0], engine=engine)
        fit(slab, abund[:, y0:y1], resid[y0:y1])

