"""Nucleus and whole-cell segmentation, and the per-cell compartments.

(First version: to be deepened; the public signatures are fixed.)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, measure, morphology, segmentation

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
        Ring width in pixels.

    Returns
    -------
    ring : (M, N) ndarray of bool
    """
    cells = np.asarray(cells)
    if cells.ndim != 2:
        raise InputError(f"cells must be 2-D, got shape {cells.shape}")
    r = int(np.floor(width_px))
    padded = np.pad(cells, r, mode="edge")
    ring = np.zeros(cells.shape, dtype=bool)
    m, n = cells.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if (dy or dx) and dy * dy + dx * dx <= width_px * width_px:
                ring |= padded[r + dy : r + dy + m, r + dx : r + dx + n] != cells
    return ring & (cells > 0)


def compartments(cells: np.ndarray, nuclei: np.ndarray, membrane_width_px: float):
    """Nucleus, membrane and cytoplasm masks of every cell.

    Returns
    -------
    nucleus, membrane, cytoplasm : (M, N) ndarrays of bool
        Nucleus: the nucleus label (inside its cell); membrane: the ring of
        :func:`membrane_ring`; cytoplasm: the rest of the cell.
    """
    cells = np.asarray(cells)
    nucleus = (np.asarray(nuclei) > 0) & (cells > 0)
    membrane = membrane_ring(cells, membrane_width_px)
    cytoplasm = (cells > 0) & ~nucleus & ~membrane
    return nucleus, membrane, cytoplasm


def segment_nuclei(image, pixel_size_um: float, nucleus_diameter_um: float = 8) -> np.ndarray:
    """Label nuclei in a nuclear-stain abundance image (Otsu + distance watershed)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise InputError(f"image must be 2-D, got shape {image.shape}")
    if not np.any(image > 0):
        return np.zeros(image.shape, np.int32)
    radius_px = nucleus_diameter_um / pixel_size_um / 2
    smooth = filters.gaussian(image, sigma=max(radius_px / 4, 0.5))
    mask = smooth > filters.threshold_otsu(smooth)
    mask = morphology.remove_small_objects(mask, max_size=int(np.pi * (radius_px / 2) ** 2))
    dist = ndi.distance_transform_edt(mask)
    peaks = morphology.h_maxima(ndi.gaussian_filter(dist, 1.0), 1.0)
    markers = measure.label(peaks)
    labels = segmentation.watershed(-dist, markers, mask=mask)
    return labels.astype(np.int32)


def segment_cells(nuclei, membrane=None, *, pixel_size_um: float, cell_expansion_um: float = 5) -> np.ndarray:
    """Grow cells from their nuclei by at most ``cell_expansion_um``."""
    nuclei = np.asarray(nuclei).astype(np.int32)
    distance_px = cell_expansion_um / pixel_size_um
    return segmentation.expand_labels(nuclei, distance=distance_px).astype(np.int32)
