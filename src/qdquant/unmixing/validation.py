"""Input checks shared by the functions of :mod:`qdquant.unmixing`."""

from __future__ import annotations

import numpy as np

from qdquant.errors import InputError


class NonFiniteCube(InputError):
    """The cube has a NaN or inf value (seen as a non-finite fit or residual)."""


def as_spectra(spectra, n_bands=None):
    """Validate a library and return it as a C-contiguous float64 (C, K) array."""
    try:
        a = np.array(spectra, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"spectra: not a numeric (C, K) array ({exc})") from None
    if a.ndim != 2:
        raise InputError(f"spectra must be a 2-D (C bands, K endmembers) array, got shape {a.shape}")
    c, k = a.shape
    if n_bands is not None and c != n_bands:
        raise InputError(
            f"spectra has {c} rows (bands) but the cube has {n_bands} bands; "
            f"spectra shape {a.shape}"
        )
    if k == 0:
        raise InputError(f"spectra has no endmember column; shape {a.shape}")
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise InputError(
            f"spectra contains NaN or inf (first at band {bad[0]}, endmember {bad[1]}); "
            f"shape {a.shape}"
        )
    if (a < 0).any():
        bad = np.argwhere(a < 0)[0]
        raise InputError(
            f"spectra contains negative values (first {a[bad[0], bad[1]]:g} at band {bad[0]}, "
            f"endmember {bad[1]}); shape {a.shape}"
        )
    zero = np.flatnonzero(~a.any(axis=0))
    if zero.size:
        raise InputError(f"spectra column {int(zero[0])} is all zero; shape {a.shape}")
    if k > c:
        raise InputError(
            f"spectra has more endmembers ({k}) than bands ({c}): the fit is underdetermined; "
            f"shape {a.shape}"
        )
    if k > 62:
        raise InputError(f"spectra has {k} endmembers; at most 62 are supported; shape {a.shape}")
    s = np.linalg.svd(a / np.linalg.norm(a, axis=0), compute_uv=False)
    if s[-1] <= s[0] * 1e-10:
        raise InputError(
            f"spectra columns are linearly dependent (condition number > 1e10); shape {a.shape}"
        )
    return np.ascontiguousarray(a)


def check_cube_shape(cube):
    """Raise InputError unless ``cube`` is a 3-D integer or float array."""
    shape = getattr(cube, "shape", None)
    if shape is None or len(shape) != 3:
        raise InputError(f"cube must be a 3-D (C, Y, X) array, got shape {shape}")
    dtype = np.dtype(cube.dtype)
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)) or dtype == np.bool_:
        raise InputError(f"cube must have an integer or float dtype, got {dtype}; shape {shape}")


def as_offset(offset, n_bands):
    """None, or a float64 (C,) offset."""
    if offset is None:
        return None
    o = np.asarray(offset, dtype=np.float64)
    if o.ndim == 0:
        o = np.full(n_bands, float(o))
    if o.shape != (n_bands,):
        raise InputError(f"offset must be a scalar or have shape ({n_bands},), got shape {o.shape}")
    if not np.isfinite(o).all():
        raise InputError(f"offset contains NaN or inf; shape {o.shape}")
    return o


# --------------------------------------------------------------------------
# FC-NNLS core


def parse_offset(offset, cube):
    """None or a float64 (C,) offset from the ``offset`` argument of :func:`~qdquant.unmixing.unmix`.

    ``"auto"`` is :func:`~qdquant.unmixing.estimate_offset` of ``cube``.
    """
    if isinstance(offset, str):
        if offset != "auto":
            raise InputError(f"offset must be None, a number, a (C,) array or 'auto', got {offset!r}")
        from qdquant.unmixing.offset import estimate_offset

        offset = estimate_offset(cube)
    return as_offset(offset, cube.shape[0])


def raise_if_overflows(cube):
    """A clear error for finite values whose fit overflows float32 (abundances are float32)."""
    if not np.issubdtype(cube.dtype, np.floating):
        return
    huge = np.argwhere(np.abs(cube) > np.finfo(np.float32).max / 1e3)
    if len(huge):
        b, y, x = huge[0]
        raise InputError(
            f"cube value {float(cube[b, y, x]):.3g} at band {b}, y {y}, x {x} overflows the fit "
            f"(abundances are float32, at most {np.finfo(np.float32).max:.3g}); shape {cube.shape}"
        ) from None
