"""HER2 per cell (sector staining, completeness, intensity) and per sample (ASCO/CAP).

Contract rules, each in one place: :func:`_stained_sectors` (which sector
is stained), :func:`_membrane_features` (completeness and intensity),
:func:`_her2_class_codes` (the intensity x completeness table),
:func:`_her2_sample_code` (the > 10 % cascade) and :func:`_her2_category`.
"""

from __future__ import annotations

import math

import numpy as np

from qdquant.scoring._common import (
    HER2_CLASSES, NOT_ASSESSABLE, ULTRALOW_MIN_PCT, _SAMPLE_PCT, _class_codes, _complete_fraction,
    _increasing_thresholds, _percent, _sector_arrays, _ultralow_min_pct,
)


def _sector_means(sums: np.ndarray, npx: np.ndarray) -> np.ndarray:
    """Mean abundance per sector; NaN where the sector has no ring pixel."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(npx > 0, sums / np.maximum(npx, 1), np.nan)


def _stained_sectors(means: np.ndarray, t_faint) -> np.ndarray:
    """Contract: a sector is stained when its mean is >= t_faint.

    A sector without ring pixels has a NaN mean and is therefore unstained.
    ``t_faint`` may be an array that broadcasts against ``means``.
    """
    with np.errstate(invalid="ignore"):
        return np.greater_equal(means, t_faint) & ~np.isnan(means)


def _membrane_features(sums, npx, stained):
    """Completeness and pixel-weighted intensity of the stained sectors.

    Returns
    -------
    completeness : ndarray of float64
        Stained sectors / all sectors (sectors without pixels count).
    intensity : ndarray of float64
        Sum over the stained sectors' pixels / their pixel count; 0 when no
        sector is stained.
    any_stained : ndarray of bool
    """
    n_stained = stained.sum(axis=-1)
    completeness = n_stained / stained.shape[-1]
    pix = np.where(stained, npx, 0).sum(axis=-1)
    tot = np.where(stained, sums, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        intensity = np.where(pix > 0, tot / np.maximum(pix, 1), 0.0)
    return completeness.astype(np.float64), intensity.astype(np.float64), n_stained > 0


def _her2_class_codes(any_stained, intensity, complete, t_weak, t_strong) -> np.ndarray:
    """Contract's HER2 table; returns codes 0..3 (broadcasting over all inputs).

    * no stained sector -> 0;
    * otherwise 1+, raised to 2+ when I >= t_weak, and to 3+ when also
      I >= t_strong and the membrane is complete (I >= t_strong but
      incomplete stays 2+).

    A cell with a stained sector always has I >= t_faint mathematically (a
    pixel-weighted mean of sector means that are all >= t_faint); keying the
    0 class on "no stained sector" keeps floating-point rounding of that
    mean from turning such a cell into a 0.
    """
    code = any_stained.astype(np.int64)
    code = code + (any_stained & (intensity >= t_weak))
    code = code + (any_stained & complete & (intensity >= t_strong) & (intensity >= t_weak))
    return code


def her2_cell_scores(sector_sum, sector_npx, *, t_faint, t_weak, t_strong, complete_fraction):
    """HER2 membrane intensity, completeness and class of every cell.

    Parameters
    ----------
    sector_sum : (n_cells, S) array_like of float
        Sum of HER2 abundance over each cell's membrane-ring pixels that fall
        in each of ``S`` equal angular sectors around the cell's centroid.
    sector_npx : (n_cells, S) array_like of int
        Number of those pixels. A sector with 0 pixels is unstained but still
        counts in the completeness denominator (its ``sector_sum`` is
        ignored).
    t_faint, t_weak, t_strong : float
        Abundance thresholds, ``0 <= t_faint < t_weak < t_strong``.
    complete_fraction : float
        In (0, 1]; a membrane is complete when completeness >= this.

    Returns
    -------
    intensity : (n_cells,) ndarray of float64
        Pixel-weighted mean abundance over all pixels of the stained sectors
        (``her2_membrane_intensity``); 0 when no sector is stained.
    completeness : (n_cells,) ndarray of float64
        Stained sectors / S (``her2_completeness``).
    her2_class : (n_cells,) ndarray of object (str)
        One of :data:`HER2_CLASSES` per cell:

        ========================  ========  ==========
        intensity I               complete  incomplete
        ========================  ========  ==========
        no stained sector         0         0
        t_faint <= I < t_weak     1+        1+
        t_weak <= I < t_strong    2+        2+
        I >= t_strong             3+        2+
        ========================  ========  ==========

    Notes
    -----
    A sector is stained when it has at least one ring pixel and its mean
    (sum / pixels) is >= ``t_faint``.
    """
    t_faint, t_weak, t_strong = _increasing_thresholds(
        t_faint=t_faint, t_weak=t_weak, t_strong=t_strong
    )
    complete_fraction = _complete_fraction(complete_fraction)
    sums, npx = _sector_arrays(sector_sum, sector_npx)
    stained = _stained_sectors(_sector_means(sums, npx), t_faint)
    completeness, intensity, any_stained = _membrane_features(sums, npx, stained)
    codes = _her2_class_codes(
        any_stained, intensity, completeness >= complete_fraction, t_weak, t_strong
    )
    her2_class = np.array(HER2_CLASSES, dtype=object)[codes]
    return intensity, completeness, her2_class


def _her2_sample_code(pct_ge1, pct_ge2, pct_3):
    """Contract's sample cascade (ASCO/CAP 2018); broadcasts; returns codes 0..3.

    ``pct_ge1``: % of cells at 1+ or above; ``pct_ge2``: at 2+ or above;
    ``pct_3``: at 3+.
    """
    return np.where(
        pct_3 > _SAMPLE_PCT,
        3,
        np.where(pct_ge2 > _SAMPLE_PCT, 2, np.where(pct_ge1 > _SAMPLE_PCT, 1, 0)),
    )


def _her2_category(score_code: int, pct_ge1: float, ultralow_min_pct: float) -> str:
    """Contract's ``her2_category`` of a sample with score ``score_code``."""
    if score_code == 3:
        return "HER2-positive"
    if score_code == 2:
        return "HER2-equivocal"
    if score_code == 1:
        return "HER2-low"
    # Score 0 implies pct_ge1 <= 10 already.
    if ultralow_min_pct <= pct_ge1 <= _SAMPLE_PCT:
        return "HER2-ultralow"
    return "HER2-null"


def her2_sample_score(her2_class, *, ultralow_min_pct=ULTRALOW_MIN_PCT) -> dict:
    """HER2 score and category of a sample from its cells' classes.

    Parameters
    ----------
    her2_class : (n_cells,) array_like of str
        Per-cell classes, each one of :data:`HER2_CLASSES` (as returned by
        :func:`her2_cell_scores`); pass only the tumour cells when a tumour
        gate is used.
    ultralow_min_pct : float, optional
        In [0, 10]: a score-0 sample whose stained cells (1+ or above) make
        up at least this percentage (and at most 10 %) is HER2-ultralow,
        otherwise HER2-null. Default: the config schema's
        ``her2.ultralow_min_pct``.

    Returns
    -------
    dict
        ``her2_pct_0``, ``her2_pct_1plus``, ``her2_pct_2plus``,
        ``her2_pct_3plus`` (float, percent of the cells, 0-100);
        ``her2_score`` (one of :data:`HER2_CLASSES`):

        * ``3+`` when 3+ cells are > 10 %;
        * else ``2+`` when 2+ and 3+ cells together are > 10 %;
        * else ``1+`` when cells at 1+ or above are > 10 %;
        * else ``0``;

        ``her2_category``: ``HER2-positive`` (3+), ``HER2-equivocal`` (2+),
        ``HER2-low`` (1+), ``HER2-ultralow`` or ``HER2-null`` (0).

        With no cells the percentages are NaN, ``her2_score`` is None and
        ``her2_category`` is ``'not assessable'``.

    Notes
    -----
    "> 10 %" is strict: 1 cell of 10 (exactly 10 %) does not count.
    Percentages are computed as ``100 * count / n`` in one rounding, so a
    count that is exactly 10 % of the cells gives exactly 10.0.
    """
    ultralow_min_pct = _ultralow_min_pct(ultralow_min_pct)
    codes = _class_codes(her2_class)
    n = codes.size
    keys = ("her2_pct_0", "her2_pct_1plus", "her2_pct_2plus", "her2_pct_3plus")
    if n == 0:
        out = dict.fromkeys(keys, math.nan)
        out.update(her2_score=None, her2_category=NOT_ASSESSABLE)
        return out
    counts = np.bincount(codes, minlength=4)
    out = {k: float(_percent(c, n)) for k, c in zip(keys, counts)}
    pct_ge1 = float(_percent(counts[1:].sum(), n))
    pct_ge2 = float(_percent(counts[2:].sum(), n))
    pct_3 = float(_percent(counts[3], n))
    code = int(_her2_sample_code(pct_ge1, pct_ge2, pct_3))
    out["her2_score"] = HER2_CLASSES[code]
    out["her2_category"] = _her2_category(code, pct_ge1, ultralow_min_pct)
    return out
