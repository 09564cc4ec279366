"""The spectral library: its check, and its flat (dark-offset) columns."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from qdquant.errors import InputError
from qdquant.unmixing.validation import as_spectra

#: :func:`check_library` warns when the library's condition number (columns
#: scaled to unit norm) is above this. Noise in the worst-separated direction
#: is amplified up to this many times more than in the best one.
CONDITION_LIMIT = 100.0


def flat_columns(spectra):
    """(K,) bool: the columns of a (C, K) library that are flat (a dark offset, not an emitter)."""
    a = np.asarray(spectra, dtype=np.float64)
    return np.ptp(a, axis=0) <= 1e-9 * np.abs(a).max(axis=0)


@dataclass(frozen=True)
class LibraryCheck:
    """How well a spectral library separates its endmembers.

    Attributes
    ----------
    condition_number : float
        2-norm condition number of the library with columns scaled to unit
        norm (1 = orthogonal spectra; noise amplification of the worst
        direction relative to the best).
    most_collinear : tuple of str
        Names of the two endmembers whose spectra are most alike.
    cosine : float
        Cosine similarity of that pair (1 = identical shapes).
    """

    condition_number: float
    most_collinear: tuple[str, str]
    cosine: float


def check_library(spectra, names):
    """Condition number and most collinear pair of a spectral library.

    Parameters
    ----------
    spectra : (C, K) array_like
        The library, one column per endmember.
    names : sequence of K str
        Endmember names, in column order.

    Returns
    -------
    LibraryCheck

    Warns
    -----
    UserWarning
        When the condition number is above :data:`CONDITION_LIMIT` (100).

    Raises
    ------
    InputError
        For a malformed library (see :func:`unmix`) or a wrong number of names.
    """
    a = as_spectra(spectra)
    names = [str(n) for n in names]
    k = a.shape[1]
    if len(names) != k:
        raise InputError(f"{len(names)} names given for {k} spectra columns; spectra shape {a.shape}")
    u = a / np.linalg.norm(a, axis=0)
    s = np.linalg.svd(u, compute_uv=False)
    cond = float(s[0] / s[-1])
    if k > 1:
        cos = u.T @ u
        np.fill_diagonal(cos, -np.inf)
        i, j = np.unravel_index(np.argmax(cos), cos.shape)
        pair, cosine = (names[min(i, j)], names[max(i, j)]), float(cos[i, j])
    else:
        pair, cosine = (names[0], names[0]), 1.0
    if cond > CONDITION_LIMIT:
        warnings.warn(
            f"spectral library is ill-conditioned (condition number {cond:.3g} > "
            f"{CONDITION_LIMIT:g}); most collinear: {pair[0]} and {pair[1]} "
            f"(cosine {cosine:.4f})",
            UserWarning,
            stacklevel=2,
        )
    return LibraryCheck(condition_number=cond, most_collinear=pair, cosine=cosine)


# --------------------------------------------------------------------------
# library refinement on the slide
# --------------------------------------------------------------------------


def cosine_similarity(u, v) -> float:
    """Cosine similarity of two spectra (1: the same shape whatever their scale)."""
    return float(u @ v / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-300))
