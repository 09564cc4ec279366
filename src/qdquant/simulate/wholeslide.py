"""Whole slides, simulated tile by tile."""

from __future__ import annotations

import numpy as np

from qdquant.simulate.rendering import _render_cube
from qdquant.simulate.slide import simulate_slide
from qdquant.simulate.spectra import BAND_WAVELENGTHS_NM, ENDMEMBERS


# ----------------------------------------------------------------------------
# whole slides, tile by tile


def simulate_wholeslide(
    size: int,
    *,
    seed: int = 0,
    tile: int = 512,
    n_unique: int = 4,
    photons_per_count: float = 4.0,
    read_noise: float = 2.5,
    offset_counts: float = 100.0,
):
    """A (31, size, size) uint16 dask cube of tissue, made tile by tile.

    For benchmarks of whole-slide scale: ``n_unique`` tissue tiles are
    simulated once (:func:`simulate_slide`, HER2 scores cycling through
    0/1+/2+/3+), then every ``tile``² block of the slide is one of them,
    flipped or transposed at random, with its own camera noise. Cells are cut
    at tile seams; there is no per-cell truth. Memory: the base tiles' noise-free
    abundances plus one block per dask worker.

    Parameters
    ----------
    size : int
        Slide edge, pixels.
    seed : int
        Everything is deterministic given the seed.
    tile : int
        Block edge, pixels (also the dask chunk edge).
    n_unique : int
        Distinct tissue tiles.
    photons_per_count, read_noise, offset_counts : float
        Camera model, as in :func:`simulate_slide`.

    Returns
    -------
    cube : (31, size, size) dask array of uint16
    """
    import dask.array as da

    scores = ("0", "1+", "2+", "3+")
    bases = []
    spectra = None
    for i in range(n_unique):
        s = simulate_slide(her2_score=scores[i % 4], shape=(tile, tile), seed=seed * 1000 + i)
        signal = [k for k, name in enumerate(ENDMEMBERS) if name != "Offset"]
        bases.append(s.abundances[signal].astype(np.float32))
        spectra = s.true_spectra[[ENDMEMBERS[k] for k in signal]].to_numpy(np.float32)

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"][1:]
        rng = np.random.default_rng([seed, y0 // tile, x0 // tile])
        base = bases[rng.integers(n_unique)]
        if rng.random() < 0.5:
            base = base[:, ::-1]
        if rng.random() < 0.5:
            base = base[:, :, ::-1]
        if rng.random() < 0.5:
            base = base.transpose(0, 2, 1)
        base = np.ascontiguousarray(base[:, : y1 - y0, : x1 - x0])
        return _render_cube(
            rng, base, spectra, shading=np.ones(base.shape[1:], np.float32), extra=None, extra_spectra=None,
            photons_per_count=photons_per_count, read_noise=read_noise, offset_counts=offset_counts,
        )

    chunks = ((len(BAND_WAVELENGTHS_NM),), *(tuple(min(tile, size - o) for o in range(0, size, tile)),) * 2)
    return da.map_blocks(block, chunks=chunks, dtype=np.uint16, meta=np.empty((0, 0, 0), np.uint16))
