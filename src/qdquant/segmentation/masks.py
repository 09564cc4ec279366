"""Per-cell compartments of the user contract: nucleus, membrane ring, cytoplasm."""

from __future__ import annotations

import numpy as np

from qdquant.errors import InputError


def membrane_ring(cells: np.ndarray, width_px: float) -> np.ndarray:
    """Pixels of each cell within ``width_px`` (Euclidean) of a pixel outside it.

    "Outside" is background or another cell; pixels beyond the image edge are
    not pixels, so the image edge alone does not make a ring (the same as
    ``ndi.distance_transform_edt(cells == id) <= width_px`` per cell).

    Parameters
    ----------
    cells : (M, N) ndarray of int
        Cell labels, 0 = background.
    width_px : float
        Ring width in pixels (>= 0; below 1 the ring is empty).

    Returns
    -------
    ring : (M, N) ndarray of bool
    """
    cells = np.asarray(cells)
    if cells.ndim != 2:
        raise InputError(f"cells must be 2-D, got shape {cells.shape}")
    if not np.isfinite(width_px) or width_px < 0:
        raise InputError(f"width_px must be a finite number >= 0, got {width_px}")
    r = int(np.floor(width_px))
    m, n = cells.shape
    ring = np.zeros(cells.shape, dtype=bool)
    # Compare every pixel with each pixel of the disc of radius width_px around
    # it; "edge" padding repeats the border value, so the outside of the image
    # never differs from the cell (the image edge is not "outside").
    padded = np.pad(cells, r, mode="edge")
    w2 = width_px * width_px
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if (dy or dx) and dy * dy + dx * dx <= w2:
                ring |= padded[r + dy : r + dy + m, r + dx : r + dx + n] != cells
    return ring & (cells > 0)


def compartments(cells: np.ndarray, nuclei: np.ndarray, membrane_width_px: float):
    """Nucleus, membrane and cytoplasm masks of every cell.

    Parameters
    ----------
    cells, nuclei : (M, N) ndarrays of int
        Cell and nucleus labels (0 = background); a cell and its nucleus
        share the id.
    membrane_width_px : float
        Width of the membrane ring, pixels (see :func:`membrane_ring`).

    Returns
    -------
    nucleus, membrane, cytoplasm : (M, N) ndarrays of bool
        Nucleus: the nucleus label (inside its cell); membrane: the ring of
        :func:`membrane_ring`; cytoplasm: the rest of the cell (neither
        nucleus nor membrane). Nucleus and membrane may overlap where a
        nucleus reaches the cell border.
    """
    cells = np.asarray(cells)
    nuclei = np.asarray(nuclei)
    if cells.shape != nuclei.shape:
        raise InputError(f"cells and nuclei shapes differ: {cells.shape} vs {nuclei.shape}")
    nucleus = (nuclei > 0) & (cells > 0)
    membrane = membrane_ring(cells, membrane_width_px)
    cytoplasm = (cells > 0) & ~nucleus & ~membrane
    return nucleus, membrane, cytoplasm
