"""Reference implementation of the contract's rules, for the simulator's truth.

Written from the user contract alone (membrane ring, sectors, completeness,
HER2 classes, the 10 % rule, % positive, H-score, Allred, receptor status,
surrogate subtype), without :mod:`qdquant.segmentation`,
:mod:`qdquant.quantification` or :mod:`qdquant.scoring`, so that the truth
the pipeline is tested against does not share the pipeline's code. It works
one cell (or one sample) at a time in plain loops: clear rather than fast,
meant for simulated slides of up to a few thousand cells.

The contract's default values are read from one place, the defaults of the
config schema (:func:`qdquant.config.schema`), by :func:`contract_defaults`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from qdquant.config.defaults import default

#: The contract's per-cell HER2 classes, in increasing order.
HER2_CLASSES: tuple[str, ...] = ("0", "1+", "2+", "3+")
#: Value of a sample-level score that cannot be computed (no cell to score).
NOT_ASSESSABLE = "not assessable"
#: The contract's sample-level cut-off, percent of cells ("> 10 %").
SAMPLE_PCT = 10.0


def contract_defaults() -> dict:
    """The contract's HER2, ring-width and subtype defaults, from the config schema.

    Returns
    -------
    dict
        ``t_faint``, ``t_weak``, ``t_strong``, ``complete_fraction`` (float),
        ``sectors`` (int), ``membrane_width_px`` (as in the schema),
        ``ultralow_min_pct``, ``pr_cutoff_pct``, ``ki67_cutoff_pct`` (float).
    """
    return {
        "t_faint": float(default("her2.t_faint")),
        "t_weak": float(default("her2.t_weak")),
        "t_strong": float(default("her2.t_strong")),
        "complete_fraction": float(default("her2.complete_fraction")),
        "sectors": int(default("her2.sectors")),
        "membrane_width_px": default("segmentation.membrane_width_px"),
        "ultralow_min_pct": float(default("her2.ultralow_min_pct")),
        "pr_cutoff_pct": float(default("subtype.pr_cutoff_pct")),
        "ki67_cutoff_pct": float(default("subtype.ki67_cutoff_pct")),
    }


# ----------------------------------------------------------------------------
# per cell


def membrane_ring(cells: np.ndarray, width_px: float) -> np.ndarray:
    """Pixels of each cell within ``width_px`` (Euclidean) of a pixel outside it.

    Per cell: the Euclidean distance transform of the cell's mask, taken
    inside the image (the image edge is not "outside"), is <= ``width_px``.

    Parameters
    ----------
    cells : (M, N) ndarray of int
        Cell labels, 0 = background.
    width_px : float
        Ring width, pixels (below 1 the ring is empty).

    Returns
    -------
    ring : (M, N) ndarray of bool
    """
    cells = np.asarray(cells)
    ring = np.zeros(cells.shape, dtype=bool)
    pad = int(math.floor(width_px)) + 1
    for index, box in enumerate(ndi.find_objects(cells.astype(np.int64))):
        if box is None:
            continue
        box = tuple(
            slice(max(s.start - pad, 0), min(s.stop + pad, size)) for s, size in zip(box, cells.shape)
        )
        inside = cells[box] == index + 1
        if inside.all():  # no pixel outside the cell within the image
            continue
        ring[box] |= inside & (ndi.distance_transform_edt(inside) <= width_px)
    return ring


def compartments(cells: np.ndarray, nuclei: np.ndarray, width_px: float):
    """Nucleus, membrane-ring and cytoplasm masks of the cells (bool, (M, N) each)."""
    cells = np.asarray(cells)
    nucleus = (np.asarray(nuclei) > 0) & (cells > 0)
    membrane = membrane_ring(cells, width_px)
    return nucleus, membrane, (cells > 0) & ~nucleus & ~membrane


def ring_sectors(cells, cell_ids, centroids_yx, width_px: float, sectors: int) -> list:
    """Membrane-ring pixels of each cell and the angular sector each falls in.

    Sector ``s`` holds the pixels whose angle ``atan2(y - cy, x - cx)``,
    taken in [0, 2π), lies in ``[s, s + 1) · 2π / sectors``.

    Parameters
    ----------
    cells : (M, N) ndarray of int
    cell_ids : (n,) ints
    centroids_yx : (n, 2) floats
        Each cell's centroid, pixels.
    width_px : float
    sectors : int

    Returns
    -------
    list of (flat_index, sector) pairs of int arrays, one per cell id
        Pixels in row-major order.
    """
    cells = np.asarray(cells)
    ys, xs = np.nonzero(membrane_ring(cells, width_px))
    labels = cells[ys, xs]
    order = np.argsort(labels, kind="stable")  # by cell, row-major within a cell
    ys, xs, labels = ys[order], xs[order], labels[order]
    out = []
    for cid, (cy, cx) in zip(cell_ids, np.asarray(centroids_yx, dtype=float)):
        lo, hi = np.searchsorted(labels, cid, "left"), np.searchsorted(labels, cid, "right")
        y, x = ys[lo:hi], xs[lo:hi]
        angle = np.arctan2(y - cy, x - cx) % (2 * np.pi)
        sector = np.minimum((angle * sectors / (2 * np.pi)).astype(np.int64), sectors - 1)
        out.append((y * cells.shape[1] + x, sector))
    return out


def sector_sums(values: np.ndarray, geometry: list, sectors: int):
    """Sum and pixel count of ``values`` per cell and sector (``(n, sectors)`` each)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    sums = np.zeros((len(geometry), sectors))
    npx = np.zeros((len(geometry), sectors), dtype=np.int64)
    for k, (index, sector) in enumerate(geometry):
        # bincount adds each sector's pixels one after the other, in row-major order
        sums[k] = np.bincount(sector, weights=flat[index], minlength=sectors)
        npx[k] = np.bincount(sector, minlength=sectors)
    return sums, npx


def her2_cell(sums, npx, *, t_faint, t_weak, t_strong, complete_fraction):
    """The contract's HER2 rule on one cell's sector sums and pixel counts.

    Returns
    -------
    intensity : float
        Pixel-weighted mean over the stained sectors; 0 when none is stained.
    completeness : float
        Stained sectors / all sectors.
    her2_class : str
    """
    sums = np.asarray(sums, dtype=float)
    npx = np.asarray(npx)
    stained = np.array([n > 0 and s / n >= t_faint for s, n in zip(sums, npx)], dtype=bool)
    completeness = stained.sum() / len(stained)
    if not stained.any():
        return 0.0, float(completeness), "0"
    intensity = float(np.where(stained, sums, 0.0).sum() / np.where(stained, npx, 0).sum())
    if intensity >= t_strong and completeness >= complete_fraction:
        her2_class = "3+"
    elif intensity >= t_weak:
        her2_class = "2+"
    else:
        her2_class = "1+"
    return intensity, float(completeness), her2_class


# ----------------------------------------------------------------------------
# per sample


def her2_sample(classes, *, ultralow_min_pct: float) -> dict:
    """The contract's sample HER2 score and category from per-cell classes.

    Returns
    -------
    dict
        ``her2_pct_0``, ``her2_pct_1plus``, ``her2_pct_2plus``,
        ``her2_pct_3plus`` (percent), ``her2_score`` and ``her2_category``;
        with no cell NaN percentages, score None and category
        :data:`NOT_ASSESSABLE`.
    """
    classes = list(classes)
    n = len(classes)
    keys = ("her2_pct_0", "her2_pct_1plus", "her2_pct_2plus", "her2_pct_3plus")
    if n == 0:
        return {**dict.fromkeys(keys, math.nan), "her2_score": None, "her2_category": NOT_ASSESSABLE}
    counts = [classes.count(c) for c in HER2_CLASSES]
    out = {k: c * 100 / n for k, c in zip(keys, counts)}
    pct_ge1 = (counts[1] + counts[2] + counts[3]) * 100 / n
    pct_ge2 = (counts[2] + counts[3]) * 100 / n
    pct_3 = counts[3] * 100 / n
    if pct_3 > SAMPLE_PCT:
        score, category = "3+", "HER2-positive"
    elif pct_ge2 > SAMPLE_PCT:
        score, category = "2+", "HER2-equivocal"
    elif pct_ge1 > SAMPLE_PCT:
        score, category = "1+", "HER2-low"
    elif ultralow_min_pct <= pct_ge1:
        score, category = "0", "HER2-ultralow"
    else:
        score, category = "0", "HER2-null"
    return {**out, "her2_score": score, "her2_category": category}


def marker_sample(bins, *, score: str, marker: str) -> dict:
    """% positive, and H-score or Allred, from per-cell bins 0..3.

    Parameters
    ----------
    bins : sequence of float
        Each cell's bin (0 negative, 1+, 2+, 3+); negative or NaN: not
        evaluable, left out of every denominator.
    score : {"hscore", "allred", "percent_positive"}
    marker : str

    Returns
    -------
    dict
        ``{marker}_pct_positive`` and, as scored, ``{marker}_hscore``
        (0–300) or ``{marker}_allred`` (0–8); NaN with no evaluable cell.
    """
    counts = [0, 0, 0, 0]
    for b in bins:
        if not math.isnan(b) and b >= 0:
            counts[int(b)] += 1
    n = sum(counts)
    out = {f"{marker}_pct_positive": math.nan}
    if score != "percent_positive":
        out[f"{marker}_{score}"] = math.nan
    if n == 0:
        return out
    n_pos = counts[1] + counts[2] + counts[3]
    weighted = counts[1] + 2 * counts[2] + 3 * counts[3]
    pct = n_pos * 100 / n
    out[f"{marker}_pct_positive"] = pct
    if score == "hscore":
        out[f"{marker}_hscore"] = weighted * 100 / n
    elif score == "allred":
        out[f"{marker}_allred"] = _allred(pct, weighted / n_pos if n_pos else math.nan)
    return out


def _allred(pct: float, mean_bin: float) -> int:
    """Allred proportion score + intensity score; 0 with no positive cell."""
    if pct == 0:
        return 0
    proportion = 1 if pct < 1 else 2 if pct <= 10 else 3 if pct <= 33 else 4 if pct <= 66 else 5
    intensity = 3 if mean_bin > 7 / 3 else 2 if mean_bin > 5 / 3 else 1
    return proportion + intensity


def receptor_status(pct: float) -> str:
    """ASCO/CAP 2020 status: negative < 1 %, low_positive 1–10 %, positive above."""
    if pct is None or math.isnan(pct):
        return NOT_ASSESSABLE
    return "negative" if pct < 1 else "low_positive" if pct <= 10 else "positive"


def surrogate_subtype(her2_score, er, pr, ki67=None, *, pr_cutoff_pct, ki67_cutoff_pct) -> str:
    """St Gallen 2013 surrogate subtype, the contract's first-matching row.

    ``ki67`` None: Ki67 not in the panel. A decision that needs a NaN
    percentage gives :data:`NOT_ASSESSABLE`.
    """
    if her2_score is None:
        return NOT_ASSESSABLE
    if her2_score == "2+":
        return "HER2-equivocal"
    if er >= 1 or pr >= 1:
        hr = True
    elif math.isnan(er) or math.isnan(pr):
        return NOT_ASSESSABLE
    else:
        hr = False
    if her2_score == "3+":
        return "Luminal B-like (HER2-positive)" if hr else "HER2-positive (non-luminal)"
    if not hr:
        return "Triple-negative"
    if er < 1 or pr < pr_cutoff_pct:
        return "Luminal B-like (HER2-negative)"
    if math.isnan(er) or math.isnan(pr):
        return NOT_ASSESSABLE
    if ki67 is None:
        return "Luminal (HER2-negative)"
    if math.isnan(ki67):
        return NOT_ASSESSABLE
    return "Luminal A-like" if ki67 < ki67_cutoff_pct else "Luminal B-like (HER2-negative)"
