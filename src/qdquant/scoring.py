"""Per-cell and per-sample scores: HER2, H-score, Allred, % positive, subtypes.

Every scoring rule of the user contract (``contract.md``: "HER2 scoring
rules", "Other scores", "Tumour cells, receptor status and surrogate
subtype") is implemented here, each in exactly one place:

* HER2 per cell: :func:`_stained_sectors` (which sector is stained),
  :func:`_membrane_features` (completeness and intensity) and
  :func:`_her2_class_codes` (the intensity x completeness table);
* HER2 per sample: :func:`_her2_sample_code` (the > 10 % cascade) and
  :func:`_her2_category`;
* other markers: :func:`intensity_bins`, :func:`marker_sample_scores`,
  :func:`allred_score`;
* :func:`receptor_status`, :func:`surrogate_subtype`,
  :func:`tumour_threshold_auto`, :func:`is_tumour`;
* :func:`calibrate_her2_thresholds` reuses the helpers above, so a fitted
  threshold triple is judged by the very rules used to score a slide.

All functions are pure: arrays in, arrays or dicts out, inputs never
modified. Bad input raises :class:`qdquant.errors.InputError`.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from qdquant.errors import InputError

__all__ = [
    "HER2_CLASSES",
    "HER2_CATEGORIES",
    "MARKER_SCORES",
    "NOT_ASSESSABLE",
    "allred_score",
    "calibrate_her2_thresholds",
    "her2_cell_scores",
    "her2_sample_score",
    "intensity_bins",
    "is_tumour",
    "marker_sample_scores",
    "receptor_status",
    "surrogate_subtype",
    "tumour_threshold_auto",
]

#: Per-cell and per-sample HER2 scores, in order (index = class code).
HER2_CLASSES = ("0", "1+", "2+", "3+")

#: ``her2_category`` values of a sample.
HER2_CATEGORIES = (
    "HER2-positive",
    "HER2-equivocal",
    "HER2-low",
    "HER2-ultralow",
    "HER2-null",
)

#: Score kinds handled by :func:`marker_sample_scores`.
MARKER_SCORES = ("hscore", "allred", "percent_positive")

#: What a score reads when it cannot be computed (no cells, missing input).
NOT_ASSESSABLE = "not assessable"

# Sample-level rules use "strictly more than 10 % of the cells".
_SAMPLE_PCT = 10.0


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------


def _real(value, name: str) -> float:
    """``value`` as a finite float, else InputError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (Real, np.number)):
        raise InputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be finite, got {value!r}")
    return value


def _increasing_thresholds(*, strict: bool = True, **named) -> tuple[float, ...]:
    """Check thresholds (in the given order) are finite, >= 0 and rising.

    ``strict``: each must be > the previous one, else >=.
    """
    values = []
    for name, value in named.items():
        value = _real(value, name)
        if value < 0:
            raise InputError(f"{name} must be >= 0, got {value:g}")
        values.append((name, value))
    for (n0, v0), (n1, v1) in zip(values, values[1:]):
        if (v0 >= v1) if strict else (v0 > v1):
            raise InputError(f"{n0} ({v0:g}) must be {'<' if strict else '<='} {n1} ({v1:g})")
    return tuple(v for _, v in values)


def _complete_fraction(value) -> float:
    value = _real(value, "complete_fraction")
    if not 0 < value <= 1:
        raise InputError(f"complete_fraction must be in (0, 1], got {value:g}")
    return value


def _ultralow_min_pct(value) -> float:
    value = _real(value, "ultralow_min_pct")
    if not 0 <= value <= _SAMPLE_PCT:
        raise InputError(f"ultralow_min_pct must be in [0, 10] (percent), got {value:g}")
    return value


def _pct_or_nan(value, name: str) -> float:
    """A percentage in [0, 100], or NaN (None counts as NaN)."""
    if value is None:
        return math.nan
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (Real, np.number)):
        raise InputError(f"{name} must be a percentage or NaN, got {value!r}")
    value = float(value)
    if math.isnan(value):
        return value
    if not 0 <= value <= 100:
        raise InputError(f"{name} must be a percentage in [0, 100], got {value:g}")
    return value


def _sector_arrays(sector_sum, sector_npx, name: str = "sector_sum") -> tuple[np.ndarray, np.ndarray]:
    """Validate the (n_cells, S) sector arrays; return float64 sums and int64 counts."""
    sector_sum = np.asarray(sector_sum)
    sector_npx = np.asarray(sector_npx)
    if sector_sum.ndim != 2 or sector_sum.shape != sector_npx.shape:
        raise InputError(
            f"{name} and sector_npx must both be (n_cells, S); got shapes "
            f"{sector_sum.shape} and {sector_npx.shape}"
        )
    if sector_sum.shape[1] < 1:
        raise InputError(f"{name} must have at least one sector, got shape {sector_sum.shape}")
    if not (np.issubdtype(sector_sum.dtype, np.number) and np.issubdtype(sector_npx.dtype, np.number)):
        raise InputError("sector_sum and sector_npx must be numeric")
    if np.issubdtype(sector_npx.dtype, np.integer):
        npx = sector_npx.astype(np.int64)
    else:
        if np.any(~np.isfinite(sector_npx)) or np.any(sector_npx != np.round(sector_npx)):
            raise InputError("sector_npx must hold whole pixel counts")
        npx = sector_npx.astype(np.int64)
    if np.any(npx < 0):
        raise InputError("sector_npx must be >= 0")
    sums = sector_sum.astype(np.float64)
    if np.any(~np.isfinite(sums) & (npx > 0)):
        raise InputError(f"{name} must be finite in every sector that has ring pixels")
    # A sector without pixels has no sum, whatever the caller stored there.
    sums = np.where(npx > 0, sums, 0.0)
    return sums, npx


def _class_codes(her2_class) -> np.ndarray:
    """HER2 class labels -> int codes 0..3 (index into HER2_CLASSES)."""
    labels = np.asarray(her2_class, dtype=object).ravel()
    codes = np.full(labels.shape, -1, dtype=np.int64)
    for code, label in enumerate(HER2_CLASSES):
        codes[labels == label] = code
    if np.any(codes < 0):
        bad = labels[codes < 0][0]
        raise InputError(f"unknown HER2 class {bad!r}; expected one of {', '.join(HER2_CLASSES)}")
    return codes


# --------------------------------------------------------------------------
# HER2 per cell
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# HER2 per sample
# --------------------------------------------------------------------------


def _percent(count, n):
    """100 * count / n with one rounding (exact at 10 %, 33 %, ... boundaries)."""
    return np.multiply(count, 100) / n


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


def her2_sample_score(her2_class, *, ultralow_min_pct=1.0) -> dict:
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
        otherwise HER2-null.

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


# --------------------------------------------------------------------------
# Other markers: % positive, H-score, Allred
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Receptor status and surrogate subtype
# --------------------------------------------------------------------------


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


# Three-valued logic for the subtype table: True, False or None (unknown,
# because a percentage it needs is NaN).
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
    her2_score, er_pct, pr_pct, ki67_pct=None, *, pr_cutoff_pct=20, ki67_cutoff_pct=20
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
        Cut-offs in percent (default 20 each).

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


# --------------------------------------------------------------------------
# Tumour cells
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Calibration of the HER2 thresholds on control slides
# --------------------------------------------------------------------------


def _control_tables(controls):
    """Validate controls; return [(sums, npx, means, known_code)]."""
    try:
        items = list(controls)
    except TypeError:
        raise InputError("controls must be a list of (sector_sum, sector_npx, known_score)") from None
    if not items:
        raise InputError("calibration needs at least one control slide")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise InputError(f"control {i}: expected (sector_sum, sector_npx, known_score)")
        sector_sum, sector_npx, known = item
        if known not in HER2_CLASSES:
            raise InputError(
                f"control {i}: unknown HER2 score {known!r}; expected one of {', '.join(HER2_CLASSES)}"
            )
        sums, npx = _sector_arrays(sector_sum, sector_npx, name=f"control {i} sector_sum")
        if sums.shape[0] == 0:
            raise InputError(f"control {i} (score {known}) has no cells")
        out.append((sums, npx, _sector_means(sums, npx), HER2_CLASSES.index(known)))
    missing = [c for k, c in enumerate(HER2_CLASSES) if k not in {t[3] for t in out}]
    if missing:
        raise InputError(
            "calibration needs control slides of every HER2 score (0, 1+, 2+, 3+) so that each "
            f"threshold is bounded from both sides; missing {', '.join(missing)}"
        )
    return out


def _feasible(tables, complete_fraction, gf, gw, gs, *, cell_chunk=4096):
    """Boolean (len(gf), len(gw), len(gs)): the triples scoring every control as known.

    Per t_faint the cells' stained sectors, completeness and intensity come
    from :func:`_stained_sectors` / :func:`_membrane_features`. Then, by the
    table in :func:`_her2_class_codes`, "class >= 2+" depends on t_weak only
    (as t_strong >= t_weak) and "class 3+" on t_strong only (as t_weak <=
    t_strong), so both are counted on their own axis by broadcasting the
    class rule over the grid, and the sample rule
    :func:`_her2_sample_code` is broadcast over the (t_weak, t_strong) plane.
    """
    ok = np.ones((gf.size, gw.size, gs.size), dtype=bool)
    # the contract needs t_faint < t_weak < t_strong
    ok &= gf[:, None, None] < gw[None, :, None]
    ok &= gw[None, :, None] < gs[None, None, :]
    for sums, npx, means, known in tables:
        n = sums.shape[0]
        for i, tf in enumerate(gf):
            if not ok[i].any():
                continue
            stained = _stained_sectors(means, tf)
            completeness, intensity, any_st = _membrane_features(sums, npx, stained)
            complete = completeness >= complete_fraction
            n_ge1 = int(any_st.sum())
            n_ge2 = np.zeros(gw.size, np.int64)
            n_3 = np.zeros(gs.size, np.int64)
            # only cells with a stained sector can reach 2+ / 3+
            idx = np.flatnonzero(any_st)
            for start in range(0, idx.size, cell_chunk):
                j = idx[start : start + cell_chunk]
                a, inten, comp = any_st[j], intensity[j], complete[j]
                n_ge2 += (
                    _her2_class_codes(a, inten, comp, gw[:, None], np.inf) >= 2
                ).sum(axis=1)
                n_3 += (
                    _her2_class_codes(a, inten, comp, gs[:, None], gs[:, None]) == 3
                ).sum(axis=1)
            code = _her2_sample_code(
                _percent(n_ge1, n),
                _percent(n_ge2, n)[:, None],
                _percent(n_3, n)[None, :],
            )
            ok[i] &= code == known
    return ok


def _most_robust(ok, axes):
    """Grid point deepest inside the feasible set (Euclidean, in log space).

    The region outside the grid counts as infeasible. Ties are broken by
    the point nearest to the centroid of the tied points.
    """
    steps = [float(np.diff(np.log(a)).mean()) if a.size > 1 else 1.0 for a in axes]
    padded = np.pad(ok, 1, constant_values=False)
    depth = ndi.distance_transform_edt(padded, sampling=steps)[1:-1, 1:-1, 1:-1]
    best = depth.max()
    tied = np.argwhere(depth >= best * (1 - 1e-9))
    centre = tied.mean(axis=0)
    pick = tied[np.argmin((((tied - centre) * steps) ** 2).sum(axis=1))]
    return tuple(int(k) for k in pick), best


def calibrate_her2_thresholds(
    controls, *, complete_fraction, ultralow_min_pct=1.0, grid_size=64
) -> dict:
    """Fit ``t_faint < t_weak < t_strong`` to control slides of known HER2 score.

    Parameters
    ----------
    controls : sequence of (sector_sum, sector_npx, known_score)
        One tuple per control slide: the (n_cells, S) sector arrays of
        :func:`her2_cell_scores` and the slide's known score (``'0'``,
        ``'1+'``, ``'2+'`` or ``'3+'``). Every score must be present at least
        once: each threshold is only bounded from both sides by a pair of
        neighbouring scores (t_faint by 0 and 1+, t_weak by 1+ and 2+,
        t_strong by 2+ and 3+).
    complete_fraction : float
        As in :func:`her2_cell_scores` (not fitted).
    ultralow_min_pct : float, optional
        Validated and passed to :func:`her2_sample_score`; controls are
        matched on their score, which does not depend on it.
    grid_size : int, optional
        Grid points per threshold axis in each of the two search passes.

    Returns
    -------
    dict
        ``t_faint``, ``t_weak``, ``t_strong`` (floats).

    Raises
    ------
    InputError
        Bad controls, a missing score, or no threshold triple that scores
        every control as known.

    Notes
    -----
    The search runs over a log-spaced grid of threshold triples spanning
    the controls' positive sector means (thresholds outside that span
    behave like its ends). A triple is feasible when every control scores
    as known by the contract's rules (:func:`her2_cell_scores` then
    :func:`her2_sample_score`). The most robust feasible triple is the one
    farthest (Euclidean distance in log-threshold space) from any
    infeasible one: the centre of the largest ball inside the feasible
    region, i.e. the widest safety margin on every threshold at once. A
    second pass repeats the search on a finer grid over the bounding box of
    the feasible component found first. The result is checked by scoring
    every control with the public functions.
    """
    complete_fraction = _complete_fraction(complete_fraction)
    ultralow_min_pct = _ultralow_min_pct(ultralow_min_pct)
    if isinstance(grid_size, (bool, np.bool_)) or not isinstance(grid_size, (int, np.integer)) or grid_size < 8:
        raise InputError(f"grid_size must be an integer >= 8, got {grid_size!r}")
    tables = _control_tables(controls)

    finite = np.concatenate([m[np.isfinite(m)] for _, _, m, _ in tables])
    positive = finite[finite > 0]
    if positive.size == 0:
        raise InputError("calibration: no control has a sector with positive HER2 abundance")
    hi = positive.max() * 1.05
    lo = max(positive.min(), hi * 1e-5) / 1.05

    # pass 1: the whole span, one common log grid for the three thresholds
    grid = np.geomspace(lo, hi, grid_size)
    ok = _feasible(tables, complete_fraction, grid, grid, grid)
    if not ok.any():
        raise InputError(
            "calibration: no thresholds t_faint < t_weak < t_strong score every control slide "
            "as its known HER2 score"
        )
    pick, _ = _most_robust(ok, (grid, grid, grid))

    # pass 2: finer grid over the feasible component holding that point
    labels, _ = ndi.label(ok, structure=np.ones((3, 3, 3), bool))
    comp = np.argwhere(labels == labels[pick])
    first = np.maximum(comp.min(axis=0) - 1, 0)
    last = np.minimum(comp.max(axis=0) + 1, grid_size - 1)
    axes = tuple(np.geomspace(grid[a], grid[b], grid_size) for a, b in zip(first, last))
    ok2 = _feasible(tables, complete_fraction, *axes)
    if ok2.any():
        pick2, _ = _most_robust(ok2, axes)
        fitted = tuple(float(ax[k]) for ax, k in zip(axes, pick2))
    else:  # cannot happen (the box holds pass-1 feasible points); be safe
        fitted = tuple(float(grid[k]) for k in pick)

    result = dict(zip(("t_faint", "t_weak", "t_strong"), fitted))
    for i, (sums, npx, _, known) in enumerate(tables):
        _, _, classes = her2_cell_scores(sums, npx, complete_fraction=complete_fraction, **result)
        got = her2_sample_score(classes, ultralow_min_pct=ultralow_min_pct)["her2_score"]
        if got != HER2_CLASSES[known]:  # pragma: no cover - guards the search itself
            raise InputError(
                f"calibration: fitted thresholds score control {i} as {got}, not {HER2_CLASSES[known]}"
            )
    return result
