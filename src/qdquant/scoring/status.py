"""Tumour gate, receptor status and the surrogate intrinsic subtype."""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
from skimage.filters import threshold_otsu

from qdquant.config.defaults import default
from qdquant.errors import InputError
from qdquant.scoring._common import HER2_CLASSES, NOT_ASSESSABLE, _pct_or_nan, _real


def receptor_status(pct_positive) -> str:
    """ASCO/CAP 2020 ER/PR status from the % of positive cells.

    Returns
    -------
    str
        ``'negative'`` below 1 %, ``'low_positive'`` from 1 to 10 % (both
        inclusive), ``'positive'`` above 10 %; ``'not assessable'`` for NaN
        or None (no evaluable cell).
    """
    pct = _pct_or_nan(pct_positive, "pct_positive")
    if math.isnan(pct):
        return NOT_ASSESSABLE
    if pct < 1:
        return "negative"
    if pct <= 10:
        return "low_positive"
    return "positive"


def _ge(x: float, c: float):
    return None if math.isnan(x) else x >= c


def _lt(x: float, c: float):
    return None if math.isnan(x) else x < c


def _or(a, b):
    if a is True or b is True:
        return True
    if a is None or b is None:
        return None
    return False


def _and(a, b):
    if a is False or b is False:
        return False
    if a is None or b is None:
        return None
    return True


def _not(a):
    return None if a is None else not a


def surrogate_subtype(
    her2_score,
    er_pct,
    pr_pct,
    ki67_pct=None,
    *,
    pr_cutoff_pct=default("subtype.pr_cutoff_pct"),
    ki67_cutoff_pct=default("subtype.ki67_cutoff_pct"),
) -> str:
    """St Gallen 2013 surrogate intrinsic subtype (contract's first-match table).

    Parameters
    ----------
    her2_score : {'0', '1+', '2+', '3+'} or None
        Sample HER2 score: 3+ positive, 2+ equivocal, 0/1+ negative. None
        (or NaN) means not assessable.
    er_pct, pr_pct : float
        % positive cells of ER and PR (NaN: no evaluable cell).
    ki67_pct : float or None, optional
        % Ki67-positive cells; None when Ki67 is not in the panel (NaN: in
        the panel, but no evaluable cell).
    pr_cutoff_pct, ki67_cutoff_pct : float, optional
        Cut-offs in percent. Default: the config schema's
        ``subtype.pr_cutoff_pct`` and ``subtype.ki67_cutoff_pct``.

    Returns
    -------
    str
        The first matching row wins (HR-positive: ER or PR >= 1 %):

        =========  ========  ==============================  ===================================
        HER2       HR        also                            result
        =========  ========  ==============================  ===================================
        equivocal  any                                       ``HER2-equivocal``
        positive   positive                                  ``Luminal B-like (HER2-positive)``
        positive   negative                                  ``HER2-positive (non-luminal)``
        negative   negative                                  ``Triple-negative``
        negative   positive  ER < 1 % or PR < pr_cutoff_pct  ``Luminal B-like (HER2-negative)``
        negative   positive  Ki67 not in the panel           ``Luminal (HER2-negative)``
        negative   positive  Ki67 < ki67_cutoff_pct          ``Luminal A-like``
        negative   positive  Ki67 >= ki67_cutoff_pct         ``Luminal B-like (HER2-negative)``
        =========  ========  ==============================  ===================================

        ``'not assessable'`` when the HER2 score is None, or when a
        percentage needed to decide a row before a match is NaN (e.g. a
        HER2-negative sample whose ER is NaN and PR is < 1 %). A NaN that
        the first matching row does not need is harmless (HER2-equivocal
        needs neither ER nor PR).
    """
    if her2_score is None or (isinstance(her2_score, float) and math.isnan(her2_score)):
        return NOT_ASSESSABLE
    if her2_score not in HER2_CLASSES:
        raise InputError(
            f"unknown HER2 score {her2_score!r}; expected one of {', '.join(HER2_CLASSES)}"
        )
    er = _pct_or_nan(er_pct, "er_pct")
    pr = _pct_or_nan(pr_pct, "pr_pct")
    ki67_in_panel = ki67_pct is not None
    ki67 = _pct_or_nan(ki67_pct, "ki67_pct")
    pr_cut = _pct_or_nan(_real(pr_cutoff_pct, "pr_cutoff_pct"), "pr_cutoff_pct")
    ki67_cut = _pct_or_nan(_real(ki67_cutoff_pct, "ki67_cutoff_pct"), "ki67_cutoff_pct")

    her2_pos = her2_score == "3+"
    her2_equiv = her2_score == "2+"
    her2_neg = her2_score in ("0", "1+")
    hr_pos = _or(_ge(er, 1), _ge(pr, 1))
    hr_neg = _not(hr_pos)

    rows = (
        (her2_equiv, "HER2-equivocal"),
        (_and(her2_pos, hr_pos), "Luminal B-like (HER2-positive)"),
        (_and(her2_pos, hr_neg), "HER2-positive (non-luminal)"),
        (_and(her2_neg, hr_neg), "Triple-negative"),
        (_and(_and(her2_neg, hr_pos), _or(_lt(er, 1), _lt(pr, pr_cut))),
         "Luminal B-like (HER2-negative)"),
        (_and(_and(her2_neg, hr_pos), not ki67_in_panel), "Luminal (HER2-negative)"),
        (_and(_and(her2_neg, hr_pos), _and(ki67_in_panel, _lt(ki67, ki67_cut))), "Luminal A-like"),
        (_and(_and(her2_neg, hr_pos), _and(ki67_in_panel, _ge(ki67, ki67_cut))),
         "Luminal B-like (HER2-negative)"),
    )
    for matches, subtype in rows:
        if matches is None:  # cannot tell whether this row matches
            return NOT_ASSESSABLE
        if matches:
            return subtype
    return NOT_ASSESSABLE  # unreachable: the table covers every case


def tumour_threshold_auto(values) -> float:
    """Tumour-marker threshold by Otsu's method on ``log1p`` of the cells' values.

    Parameters
    ----------
    values : (n_cells,) array_like of float
        Each cell's mean of the tumour marker over its membrane ring. NaN
        (no ring pixel) is ignored; negative values (unmixing noise) count
        as 0.

    Returns
    -------
    float
        Otsu's threshold (``skimage.filters.threshold_otsu``) splits the
        ``log1p`` values into a low and a high class; the value returned is
        the midpoint, in ``log1p`` space, between the highest low value and
        the lowest high value, mapped back with ``expm1``. So
        ``values >= threshold`` (:func:`is_tumour`) picks exactly Otsu's high
        class, with the widest margin on both sides.

        When the values cannot be split (fewer than two distinct values),
        the single value itself is returned: every cell is then a tumour
        cell, the same as running without a tumour gate (the recorded
        threshold shows it). With no finite value at all (no cells), NaN:
        :func:`is_tumour` then calls no cell a tumour cell.
    """
    values = np.asarray(values)
    if values.ndim != 1:
        raise InputError(f"values must be 1-D (one per cell), got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.number):
        raise InputError(f"values must be numeric, got dtype {values.dtype}")
    values = values.astype(np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan
    logv = np.log1p(np.maximum(values, 0.0))
    lo, hi = logv.min(), logv.max()
    if lo == hi:
        return float(np.expm1(lo))
    t = threshold_otsu(logv)
    low, high = logv[logv <= t], logv[logv > t]
    if low.size == 0 or high.size == 0:  # defensive: Otsu always splits >= 2 values
        return float(np.expm1(t))
    return float(np.expm1((low.max() + high.min()) / 2))


def is_tumour(values, threshold) -> np.ndarray:
    """Tumour cells: tumour-marker mean over the membrane ring >= ``threshold``.

    Parameters
    ----------
    values : array_like of float
        Each cell's membrane-ring mean of the tumour marker; NaN (no ring
        pixel) is never a tumour cell.
    threshold : float
        Abundance threshold (>= 0, may be inf). NaN (what
        :func:`tumour_threshold_auto` returns for a sample without cells)
        calls no cell a tumour cell.

    Returns
    -------
    ndarray of bool, same shape as ``values``
    """
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, (Real, np.number)):
        raise InputError(f"tumour threshold must be a number, got {threshold!r}")
    threshold = float(threshold)
    if threshold < 0:
        raise InputError(f"tumour threshold must be >= 0, got {threshold:g}")
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.number):
        raise InputError(f"values must be numeric, got dtype {values.dtype}")
    with np.errstate(invalid="ignore"):
        return np.greater_equal(values.astype(np.float64), threshold)
