"""Input checks and length conversions shared by the segmentation steps."""

from __future__ import annotations

import numpy as np

from qdquant.errors import InputError


def _is_dask(a) -> bool:
    return type(a).__module__.startswith("dask")


def _check_image(image, name="image"):
    ndim = getattr(image, "ndim", None)
    shape = getattr(image, "shape", None)
    if ndim is None:
        image = np.asarray(image)
        ndim, shape = image.ndim, image.shape
    if ndim != 2:
        raise InputError(f"{name} must be a 2-D (Y, X) image, got shape {tuple(shape)}")
    dtype = np.dtype(image.dtype)
    if dtype.kind not in "biuf":
        raise InputError(f"{name} must be numeric, got dtype {dtype}")
    return image


def _check_scale(pixel_size_um, **lengths):
    try:
        ps = float(pixel_size_um)
    except (TypeError, ValueError):
        raise InputError(f"pixel_size_um must be a number, got {pixel_size_um!r}") from None
    if not (np.isfinite(ps) and ps > 0):
        raise InputError(f"pixel_size_um must be > 0, got {pixel_size_um}")
    out = []
    for k, v in lengths.items():
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise InputError(f"{k} must be a number, got {v!r}") from None
        strict = k == "nucleus_diameter_um"
        if not (np.isfinite(v) and (v > 0 if strict else v >= 0)):
            raise InputError(f"{k} must be a finite length in micrometres ({'> 0' if strict else '>= 0'}), got {v}")
        out.append(v)
    return ps, out


def _as_float(tile) -> np.ndarray:
    tile = np.asarray(tile, dtype=np.float32)
    if not np.all(np.isfinite(tile)):
        tile = np.where(np.isfinite(tile), tile, 0).astype(np.float32)
    return tile


def _diameter(image, pixel_size_um, nucleus_diameter_um, hint: bool):
    """The diameter to use (um): the number given, or the estimate for "auto" or a hint."""
    if isinstance(nucleus_diameter_um, str) or hint:
        from qdquant.nucleus_size import resolve_nucleus_diameter

        return resolve_nucleus_diameter(image, pixel_size_um, nucleus_diameter_um, hint=hint)[0]
    return nucleus_diameter_um


def _radius_px(d_um: float, ps: float) -> float:
    r = d_um / ps / 2
    if r < 1.5:
        raise InputError(
            f"nucleus_diameter_um={d_um} is only {2 * r:.1f} px at pixel_size_um={ps}; need >= 3 px"
        )
    return r


def _membrane_radius(ps: float) -> float:
    """Scale (pixels) of the membrane statistics: ~4 um blocks."""
    return max(4.0 / ps, 2.0)
