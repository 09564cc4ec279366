"""The vocabulary of scores and the input checks every scoring module shares."""

from __future__ import annotations

import math
from numbers import Real

import numpy as np

from qdquant.config.defaults import default
from qdquant.errors import InputError

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


# Contract defaults: read from the config schema, where they are defined.
ULTRALOW_MIN_PCT = default("her2.ultralow_min_pct")


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


def _percent(count, n):
    """100 * count / n with one rounding (exact at 10 %, 33 %, ... boundaries)."""
    return np.multiply(count, 100) / n
