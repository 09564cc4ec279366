"""Other markers: intensity bins, H-score, Allred and % positive."""

from __future__ import annotations

import math

import numpy as np

from qdquant.errors import InputError
from qdquant.scoring._common import MARKER_SCORES, _increasing_thresholds, _percent, _real


def _bin_thresholds(t1, t2, t3) -> tuple[float, ...]:
    if t2 is None and t3 is not None:
        raise InputError("t3 given without t2")
    named = {"t1": t1}
    if t2 is not None:
        named["t2"] = t2
    if t3 is not None:
        named["t3"] = t3
    return _increasing_thresholds(strict=False, **named)


def intensity_bins(values, *, t1, t2=None, t3=None) -> np.ndarray:
    """Bin each cell's compartment mean: 0 negative, 1 (>= t1), 2 (>= t2), 3 (>= t3).

    Parameters
    ----------
    values : array_like of float
        Each cell's mean over the marker's compartment. NaN marks a cell with
        no pixel in that compartment.
    t1 : float
        Positivity threshold (>= 0).
    t2, t3 : float, optional
        Moderate and strong thresholds (``t1 <= t2 <= t3``; an equal pair
        leaves the bin between them empty: with ``t1 == t2`` a cell >= t1 is
        bin 2). With ``t1`` alone (``percent_positive``) a positive cell is
        bin 1; ``t3`` needs ``t2``.

    Returns
    -------
    bins : ndarray of int64, same shape as ``values``
        0..3, or -1 for a NaN value: "not evaluable". Not-evaluable cells
        are left out of every denominator (% positive, H-score, Allred).
    """
    thresholds = _bin_thresholds(t1, t2, t3)
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.number):
        raise InputError(f"values must be numeric, got dtype {values.dtype}")
    values = values.astype(np.float64)
    bins = np.zeros(values.shape, dtype=np.int64)
    for t in thresholds:
        bins += values >= t
    bins[np.isnan(values)] = -1
    return bins


def allred_score(pct_positive, mean_positive_bin) -> int:
    """Allred score: proportion score + intensity score (0 or 2-8).

    Parameters
    ----------
    pct_positive : float
        Percent of (evaluable) cells that are positive, 0-100.
    mean_positive_bin : float
        Mean intensity bin (1-3) of the positive cells; ignored (may be NaN)
        when ``pct_positive`` is 0.

    Returns
    -------
    int
        Proportion score: 0 no positive cell; 1 > 0 and < 1 %; 2 1-10 %
        (both inclusive); 3 > 10 and <= 33 %; 4 > 33 and <= 66 %; 5 > 66 %.
        Intensity score: 3 when m > 7/3, 2 when m > 5/3, else 1.
        The sum, or 0 when no cell is positive.
    """
    pct = _real(pct_positive, "pct_positive")
    if not 0 <= pct <= 100:
        raise InputError(f"pct_positive must be in [0, 100], got {pct:g}")
    if pct == 0:
        return 0
    m = _real(mean_positive_bin, "mean_positive_bin")
    if not 1 <= m <= 3:
        raise InputError(f"mean_positive_bin must be in [1, 3], got {m:g}")
    if pct < 1:
        proportion = 1
    elif pct <= 10:
        proportion = 2
    elif pct <= 33:
        proportion = 3
    elif pct <= 66:
        proportion = 4
    else:
        proportion = 5
    if m > 7 / 3:
        intensity = 3
    elif m > 5 / 3:
        intensity = 2
    else:
        intensity = 1
    return proportion + intensity


def marker_sample_scores(values, *, score, t1, t2=None, t3=None, marker) -> dict:
    """% positive, and H-score or Allred, of one marker over a sample's cells.

    Parameters
    ----------
    values : (n_cells,) array_like of float
        Each cell's mean over the marker's compartment (NaN: no pixel there,
        not evaluable; such cells are left out of every denominator).
    score : {'hscore', 'allred', 'percent_positive'}
        The panel's ``score`` of the marker.
    t1, t2, t3 : float
        Bin thresholds (see :func:`intensity_bins`); ``hscore`` and
        ``allred`` need all three, ``percent_positive`` only ``t1``.
    marker : str
        Marker name, used to name the keys.

    Returns
    -------
    dict
        ``{marker}_pct_positive``: % of evaluable cells >= t1, always;
        ``{marker}_hscore`` = 1*%1+ + 2*%2+ + 3*%3+ (0-300) when
        ``score == 'hscore'``; ``{marker}_allred`` (see :func:`allred_score`,
        an int) when ``score == 'allred'``. With no evaluable cell every
        value is NaN.
    """
    if score not in MARKER_SCORES:
        raise InputError(f"unknown score kind {score!r}; expected one of {', '.join(MARKER_SCORES)}")
    if not isinstance(marker, str) or not marker:
        raise InputError(f"marker must be a non-empty string, got {marker!r}")
    if score in ("hscore", "allred") and (t2 is None or t3 is None):
        raise InputError(f"score {score!r} of {marker} needs thresholds t1, t2 and t3")
    values = np.asarray(values)
    if values.ndim != 1:
        raise InputError(f"values must be 1-D (one per cell), got shape {values.shape}")
    bins = intensity_bins(values, t1=t1, t2=t2, t3=t3)
    evaluable = bins >= 0
    n = int(evaluable.sum())
    out = {}
    key_pct = f"{marker}_pct_positive"
    if n == 0:
        out[key_pct] = math.nan
        if score != "percent_positive":
            out[f"{marker}_{score}"] = math.nan
        return out
    counts = np.bincount(bins[evaluable], minlength=4)
    n_pos = int(counts[1:].sum())
    weighted = int(counts[1] + 2 * counts[2] + 3 * counts[3])
    pct_pos = float(_percent(n_pos, n))
    out[key_pct] = pct_pos
    if score == "hscore":
        out[f"{marker}_hscore"] = float(_percent(weighted, n))
    elif score == "allred":
        mean_bin = weighted / n_pos if n_pos else math.nan
        out[f"{marker}_allred"] = allred_score(pct_pos, mean_bin)
    return out
