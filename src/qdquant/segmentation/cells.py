"""Whole-cell segmentation: each nucleus grown over the membrane stain."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from skimage import measure, segmentation

from qdquant.errors import InputError
from qdquant.segmentation._checks import _as_float, _check_image, _check_scale, _membrane_radius
from qdquant.segmentation._distance import squared_distance
from qdquant.segmentation._filters import gaussian
from qdquant.segmentation._flood import flood
from qdquant.segmentation._reach import beyond_own_nucleus
from qdquant.segmentation._tuning import (
    CELL_EXPANSION_UM, _BARE_LEVEL, _BARE_RIM_UM, _CREST_LEVEL, _CREST_SMOOTH_UM, _CREST_ZONE_PX,
    _MEMBRANE_SMOOTH_UM, _MEMBRANE_WEIGHT,
)
from qdquant.segmentation.image_stats import _image_stats, _subtract_background


def _sq_threshold(d: float) -> int:
    """Largest integer k with ``sqrt(k) <= d`` (float64), -1 if none: for integer squared distances."""
    if d < 0:
        return -1
    k = int(math.floor(d * d))
    while k >= 0 and math.sqrt(k) > d:
        k -= 1
    while math.sqrt(k + 1) <= d:
        k += 1
    return k


def _rim_owner(lab: np.ndarray, nuclei: np.ndarray, d2: np.ndarray, sel: np.ndarray, rim2: int) -> np.ndarray:
    """Whether each selected pixel lies in its own nucleus's part of the nuclei expanded by ``sqrt(rim2)``.

    The same as ``expand_labels(nuclei, sqrt(rim2)) == lab`` on ``sel``
    (False elsewhere), without a second distance transform: ``d2`` is the
    squared distance to the nearest nucleus pixel, and of several at that
    distance the one scipy's feature transform picks, the leftmost and then
    the topmost, gives the label.
    """
    ys, xs = np.nonzero(sel & (d2 <= rim2))
    own, dist2 = lab[ys, xs], d2[ys, xs]
    near = np.where(dist2 == 0, nuclei[ys, xs], 0)
    m, n = nuclei.shape
    reach = math.isqrt(rim2)
    for dx in range(-reach, reach + 1):  # leftmost first, then topmost
        for dy in range(-reach, reach + 1):
            r2 = dy * dy + dx * dx
            if r2 == 0 or r2 > rim2:
                continue
            y, x = ys + dy, xs + dx
            todo = (near == 0) & (dist2 == r2) & (y >= 0) & (y < m) & (x >= 0) & (x < n)
            near[todo] = nuclei[y[todo], x[todo]]
    out = np.zeros(lab.shape, bool)
    out[ys, xs] = near == own
    return out


def _between_cells(lab: np.ndarray) -> np.ndarray:
    """Pixels of a cell with a 4-neighbour in another cell (both sides of every border)."""
    out = np.zeros(lab.shape, dtype=bool)
    for axis in (0, 1):
        a, b = (lab[:-1], lab[1:]) if axis == 0 else (lab[:, :-1], lab[:, 1:])
        meet = (a != b) & (a > 0) & (b > 0)
        if axis == 0:
            out[:-1] |= meet
            out[1:] |= meet
        else:
            out[:, :-1] |= meet
            out[:, 1:] |= meet
    return out


def _to_membrane_crest(lab, nuclei, membrane, score, ps) -> np.ndarray:
    """Borders between touching cells moved onto the crest of the membrane stain.

    The flood that grows the cells weighs the membrane (saturated, smoothed
    over 0.75 um) against the distance to the nuclei, so it places the
    border between two cells up to a pixel or two off the crest, towards
    the cell with the farther nucleus or the brighter membrane; a stained
    cell's membrane then lies in its unstained neighbour's membrane ring (on
    the independent generator's messy slides, about a quarter of the border
    pixels were a pixel off the true border). Here the pixels within
    ``_CREST_ZONE_PX`` of a border (not of a nucleus, and where the
    membrane is present: saturated score at least ``_CREST_LEVEL``) are
    flooded again from the rest of their cells over the membrane smoothed
    only against noise, so the cells meet on its crest.
    """
    zone = ndi.binary_dilation(_between_cells(lab), iterations=_CREST_ZONE_PX)
    zone &= (nuclei == 0) & (score >= _CREST_LEVEL) & (lab > 0)
    if not zone.any():
        return lab
    crest = gaussian(_as_float(membrane), max(_CREST_SMOOTH_UM / ps, 0.5))
    return flood(crest, np.where(zone, 0, lab), lab > 0)


def _cells_tile(nuclei, membrane, mstats, ps, dist_px, y0=0, x0=0) -> np.ndarray:
    """Grow the nuclei of one tile into cells (see :func:`segment_cells`)."""
    nuclei = np.asarray(nuclei, dtype=np.int32)
    if dist_px <= 0 or not nuclei.any():
        return nuclei.copy()
    if membrane is None or mstats is None or mstats.empty:
        return segmentation.expand_labels(nuclei, distance=dist_px).astype(np.int32)
    # Squared distances are integers: compare them with integer thresholds
    # (the same pixels as comparing their square roots with the distances).
    # Beyond dist_px + 2 only "far" matters: a pixel there borders no pixel
    # the watershed floods, so its landscape value is never read.
    reach = _sq_threshold(dist_px)
    d2 = squared_distance(nuclei > 0)
    np.minimum(d2, int(math.ceil((dist_px + 2) ** 2)), out=d2)
    dist = np.sqrt(d2.astype(np.float32))
    sigma = max(_MEMBRANE_SMOOTH_UM / ps, 0.5)
    mem = _subtract_background(gaussian(_as_float(membrane), sigma), mstats, y0, x0)
    # Membrane in units of its Otsu level, saturating: a ridge is a ridge
    # however bright, and noise below the background does not count.
    m = np.clip(mem / np.float32(mstats.level), 0, None)
    m = m / (1 + m)
    land = _MEMBRANE_WEIGHT * m + dist / np.float32(dist_px)
    del mem, dist
    # The background floods too, from every pixel farther than dist_px from
    # all nuclei: a cell reaches the expansion limit where nothing stops it,
    # but the pocket beyond its own membrane (lower than the ridge) goes to
    # the background instead of the cell.
    bg = int(nuclei.max()) + 1
    markers = np.where(d2 > reach, bg, nuclei)
    lab = flood(land, markers)
    lab[lab == bg] = 0
    # The flood keeps every pixel within reach of *some* nucleus; a cell that
    # floods around its walled-in neighbours would reach far beyond its own
    # (and, beyond a tile's overlap, differently in each tile).
    lab[beyond_own_nucleus(lab, nuclei, reach)] = 0
    lab = _to_membrane_crest(lab, nuclei, membrane, m, ps)
    lab[beyond_own_nucleus(lab, nuclei, reach)] = 0
    # Cells without membrane stain around their nucleus (stroma, immune cells:
    # the stain marks epithelium) keep only a thin rim of cytoplasm instead of
    # growing to the expansion limit.
    cyto = (lab > 0) & (nuclei == 0)
    score = np.bincount(lab[cyto], weights=m[cyto], minlength=bg) / np.maximum(
        np.bincount(lab[cyto], minlength=bg), 1)
    bare = score < _BARE_LEVEL
    bare[0] = False
    if bare.any():
        # the rim: nuclei expanded by _BARE_RIM_UM (as skimage's expand_labels)
        sel = bare[lab]
        lab[sel & ~_rim_owner(lab, nuclei, d2, sel, _sq_threshold(_BARE_RIM_UM / ps))] = 0
    return _without_stray_pieces(lab, nuclei)


def _without_stray_pieces(lab: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """``lab`` with every piece of a cell that does not hold its nucleus set to background.

    Moving borders onto the membrane's crest, then the reach and rim limits, can cut a thin
    part of a cell off from its nucleus (about one cell in a few thousand).
    """
    pieces = measure.label(lab, connectivity=1)
    own = np.zeros(int(pieces.max()) + 1, dtype=bool)
    own[pieces[nuclei > 0]] = True
    lab[~own[pieces]] = 0
    return lab


def segment_cells(
    nuclei, membrane=None, *, pixel_size_um: float, cell_expansion_um: float = CELL_EXPANSION_UM
) -> np.ndarray:
    """Grow every nucleus into its cell, by at most ``cell_expansion_um``.

    With a membrane-stain image, a watershed seeded by the nuclei floods the
    landscape ``4 m / (1 + m) + d / D`` -- ``m`` the background-corrected
    membrane stain (Gaussian sigma 0.75 um) in units of its Otsu level, ``d``
    the distance to the nearest nucleus and ``D`` the expansion distance -- so
    neighbouring cells meet on the membrane where it is stained and half-way
    between nuclei where it is not. Where two cells meet on a stained
    membrane, the pixels within 2 px of their border (not of a nucleus) are
    then flooded again over the membrane stain itself (Gaussian sigma
    0.4 um), so the border lies on the membrane's crest rather than where
    the distance term pulled it. The background, seeded at every pixel
    farther than ``D`` from all nuclei, floods the same landscape: a cell
    with a stained membrane ends on it (the pocket beyond goes to the
    background), a cell without one grows to ``D``. A cell whose cytoplasm
    then carries essentially no membrane stain (mean ``m / (1 + m)`` below
    0.05: stromal and immune cells, where the stain marks epithelium) is cut
    back to its nucleus and a 1 um rim, the thin cytoplasm such cells have,
    instead of a ``D``-wide halo. Without a membrane image, nuclei are
    expanded by ``D``
    (:func:`skimage.segmentation.expand_labels`). Either way a cell never
    takes a pixel farther than ``D`` from its own nucleus, never takes another
    cell's pixels, keeps its whole nucleus, is connected where its nucleus
    is, and shares its nucleus's id.

    Parameters
    ----------
    nuclei : (M, N) array_like of int
        Nucleus labels, 0 = background (e.g. from :func:`segment_nuclei`).
    membrane : (M, N) array_like of float, optional
        Membrane-stain abundance (E-cadherin, Na/K-ATPase, pan-cytokeratin,
        or a sum of several), arbitrary units.
    pixel_size_um : float
        Pixel edge, micrometres.
    cell_expansion_um : float, optional
        Largest growth of a cell beyond its nucleus, micrometres (0 gives
        cells equal to their nuclei). Default: the config schema's
        ``segmentation.cell_expansion_um``.

    Returns
    -------
    cells : (M, N) ndarray of int32
        Cell labels; cell ``i`` contains nucleus ``i``.

    Raises
    ------
    InputError
        If an image is not 2-D, the shapes differ, ``nuclei`` is not an
        integer label image, or a length is negative.
    """
    nuclei = np.asarray(_check_image(nuclei, "nuclei"))
    if nuclei.dtype.kind not in "biu":
        raise InputError(f"nuclei must be an integer label image, got dtype {nuclei.dtype}")
    if nuclei.size and (int(nuclei.max()) > np.iinfo(np.int32).max or int(nuclei.min()) < 0):
        raise InputError(f"nuclei ids must be in [0, 2**31 - 1], got [{nuclei.min()}, {nuclei.max()}]")
    ps, (d_um,) = _check_scale(pixel_size_um, cell_expansion_um=cell_expansion_um)
    dist_px = d_um / ps
    mstats = None
    if membrane is not None:
        membrane = _check_image(membrane, "membrane")
        if tuple(membrane.shape) != nuclei.shape:
            raise InputError(f"membrane shape {tuple(membrane.shape)} differs from nuclei shape {nuclei.shape}")
        rm = _membrane_radius(ps)
        mstats = _image_stats(membrane, rm, max(_MEMBRANE_SMOOTH_UM / ps, 0.5))
        membrane = np.asarray(membrane)
    return _cells_tile(nuclei, membrane, mstats, ps, dist_px)
