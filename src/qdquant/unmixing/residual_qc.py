"""Residual QC: pixels the library cannot explain.

:func:`noise_model` fits the residual expected from photon and read noise;
:func:`flag_poor_fit` flags pixels whose residual is far above it,
:func:`flag_broadband` those holding broad off-library light that the RMS
residual misses (along :func:`broadband_probes`); :func:`grow_mask` widens
the flags by a margin.
"""

from __future__ import annotations

import dask.array as da
import numpy as np

from qdquant.errors import InputError
from qdquant.unmixing.validation import as_spectra


def noise_model(cube, residual, *, n_bins: int = 32) -> tuple[float, float]:
    """Fit the residual expected from photon and read noise: ``residual² ≈ a·m + b``.

    ``m`` is a pixel's mean count over the bands. Shot noise makes the
    variance of each band grow linearly with its counts (``a`` = 1 / electrons
    per count, up to the fit's degrees of freedom) and read noise adds a
    constant ``b``. The line is fitted through the medians of residual² in
    quantile bins of ``m`` (robust to the pixels that fit badly) by the
    Theil–Sen estimator (robust to bins that are all poorly fitted, such as
    the brightest bins when an off-library object is the brightest thing on
    the slide).

    Parameters
    ----------
    cube : (C, Y, X) array
        Raw counts (a sample of the slide is enough).
    residual : (Y, X) array
        RMS residual of the fit of ``cube``, counts.

    Returns
    -------
    a, b : float
        Slope (counts) and intercept (counts²), both >= 0 (b > 0).
    """
    cube = np.asarray(cube, dtype=np.float64)
    residual = np.asarray(residual, dtype=np.float64)
    if cube.ndim != 3 or residual.shape != cube.shape[1:]:
        raise InputError(f"cube (C, Y, X) and residual (Y, X) must match, got {cube.shape} and {residual.shape}")
    mean = cube.reshape(cube.shape[0], -1).mean(axis=0)
    r2 = residual.ravel() ** 2
    edges = np.unique(np.quantile(mean, np.linspace(0, 1, n_bins + 1)))
    if len(edges) < 3:
        return 0.0, max(float(np.median(r2)), 1e-12)
    which = np.clip(np.searchsorted(edges, mean, side="right") - 1, 0, len(edges) - 2)
    order = np.argsort(which, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(which, minlength=len(edges) - 1))[:-1])
    groups = [g for g in groups if len(g) >= 20]
    centres = np.array([np.median(mean[g]) for g in groups])
    medians = np.array([np.median(r2[g]) for g in groups])
    if len(groups) < 2:
        return 0.0, max(float(medians.mean()), 1e-12)
    from scipy.stats import theilslopes

    a, b, _, _ = theilslopes(medians, centres)
    return max(float(a), 0.0), max(float(b), 1e-12)


#: Pixels per slice of a block in the flag tests: their temporaries (a few per band or probe)
#: then stay in the CPU's cache instead of costing a whole block's memory each.
PIXEL_SLICE = 1 << 15


def _by_pixels(func, flat, *per_pixel):
    """``func(flat[:, s], *(p[s] for p in per_pixel))`` over slices ``s`` of the pixel axis, joined."""
    n = flat.shape[1]
    if n <= PIXEL_SLICE:
        return func(flat, *per_pixel)
    return np.concatenate([func(flat[:, i : i + PIXEL_SLICE], *(p[i : i + PIXEL_SLICE] for p in per_pixel))
                           for i in range(0, n, PIXEL_SLICE)])


def flag_poor_fit(cube, residual, noise: tuple[float, float], *, factor: float = 5.0):
    """Pixels whose residual is far above the noise expected from their counts.

    A pixel is flagged when ``residual > factor · sqrt(a·m + b)`` (see
    :func:`noise_model`): light the library cannot explain, such as red blood
    cells, lipofuscin or elastin with spectra outside the library. Such pixels
    are left out of every per-cell mean.

    Parameters
    ----------
    cube : (C, Y, X) numpy or dask array
        Raw counts.
    residual : (Y, X) numpy or dask array
        RMS residual, counts.
    noise : (float, float)
        ``(a, b)`` from :func:`noise_model`.
    factor : float
        How many expected standard deviations make a pixel poorly fitted.

    Returns
    -------
    flagged : (Y, X) bool array (dask when ``cube`` is dask)
    """
    a, b = noise

    def part(flat, r):
        return r**2 > factor**2 * (a * flat.mean(axis=0) + b)

    def block(c, r):
        c = np.asarray(c, dtype=np.float32)
        r = np.asarray(r, dtype=np.float32).reshape(-1)
        return _by_pixels(part, c.reshape(c.shape[0], -1), r).reshape(c.shape[1:])

    if isinstance(cube, da.Array) or isinstance(residual, da.Array):
        cube = da.asarray(cube)
        residual = da.asarray(residual).rechunk(cube.chunks[1:])
        return da.map_blocks(block, cube.rechunk({0: -1}), residual, drop_axis=0, dtype=bool)
    return block(cube, residual)


def broadband_probes(spectra, wavelengths_nm, *, width_nm: float = 45.0, spacing_nm: float = 40.0,
                     min_novelty: float = 0.05) -> np.ndarray:
    """Directions of broad emission that the library cannot reproduce.

    A bank of Gaussian emission spectra (standard deviation ``width_nm``,
    centres every ``spacing_nm`` across the bands), each with its part in
    the span of the library and of a flat spectrum (a dark offset) removed,
    scaled to unit norm. Light from a broad off-library emitter (lipofuscin,
    red blood cells, elastin) has a component along them; the library's own
    endmembers, whatever their abundances, have none.

    Parameters
    ----------
    spectra : (C, K) array_like
        The library.
    wavelengths_nm : (C,) array_like
        Band centres, nm.
    width_nm, spacing_nm : float
        Standard deviation and spacing of the probe spectra, nm (QD emission
        is about 10 nm wide in standard deviation; tissue emitters 40-100 nm).
    min_novelty : float
        Probes whose norm outside the library's span is below this fraction
        of their norm are dropped (the library already describes them).

    Returns
    -------
    (C, J) float64 array
        Unit-norm probe directions orthogonal to the library and to a flat
        spectrum; J may be 0.
    """
    a = as_spectra(spectra)
    wl = np.asarray(wavelengths_nm, dtype=np.float64)
    if wl.shape != (a.shape[0],):
        raise InputError(f"wavelengths_nm must have one value per band ({a.shape[0]}), got shape {wl.shape}")
    centres = np.arange(wl.min(), wl.max() + 1e-9, spacing_nm)
    probes = np.exp(-0.5 * ((wl[:, None] - centres[None, :]) / width_nm) ** 2)
    basis, _ = np.linalg.qr(np.column_stack([a, np.ones(len(wl))]))
    novel = probes - basis @ (basis.T @ probes)
    norm = np.linalg.norm(novel, axis=0)
    keep = norm >= min_novelty * np.linalg.norm(probes, axis=0)
    return novel[:, keep] / norm[keep]


def flag_broadband(cube, probes, noise: tuple[float, float], *, n_endmembers: int, factor: float = 5.0):
    """Pixels holding broad light that no combination of the library explains.

    The projection ``t_j = p_j . y`` of a pixel's spectrum ``y`` on each
    probe of :func:`broadband_probes` is zero, up to noise, for any mixture
    of the library's endmembers and a dark offset. Its noise variance
    follows from the photon and read noise of each band,
    ``var(y_c) = s (a y_c + b)`` with ``s = C / (C - K)`` (the noise model of
    :func:`noise_model` is fitted on the RMS residual, which has ``C - K``
    degrees of freedom, not ``C``). A pixel is flagged when some
    ``t_j > factor sqrt(var(t_j))``: only extra light counts, and a bright
    pixel of the library's own dyes is not flagged however bright it is.

    This finds off-library emitters whose light the unmixing spreads over
    the QD channels and autofluorescence while the RMS residual stays within
    the noise (broad 500-700 nm lipofuscin: :func:`flag_poor_fit` misses
    most of it).

    Parameters
    ----------
    cube : (C, Y, X) numpy or dask array
        The counts that were unmixed.
    probes : (C, J) array
        From :func:`broadband_probes`.
    noise : (float, float)
        ``(a, b)`` from :func:`noise_model`.
    n_endmembers : int
        K, the library's endmembers (for the degrees of freedom).
    factor : float
        Detection threshold in noise standard deviations.

    Returns
    -------
    flagged : (Y, X) bool array (dask when ``cube`` is dask)
    """
    a, b = noise
    c = cube.shape[0]
    probes = np.asarray(probes, dtype=np.float32)
    squared = probes**2
    scale = c / max(c - n_endmembers, 1)

    def part(flat):
        t = probes.T @ flat
        var = scale * (a * (squared.T @ np.maximum(flat, 0)) + b)  # unit-norm probes: sum p^2 = 1
        return ((t > 0) & (t * t > factor**2 * var)).any(axis=0)

    def block(y):
        if probes.shape[1] == 0:
            return np.zeros(y.shape[1:], bool)
        return _by_pixels(part, np.asarray(y, dtype=np.float32).reshape(c, -1)).reshape(y.shape[1:])

    if isinstance(cube, da.Array):
        return da.map_blocks(block, cube.rechunk({0: -1}), drop_axis=0, dtype=bool)
    return block(cube)


def grow_mask(mask, radius_px: int):
    """``mask`` dilated by a disc of ``radius_px`` pixels (numpy or dask, seam-free across chunks).

    Parameters
    ----------
    mask : (Y, X) bool numpy or dask array
    radius_px : int
        Radius, pixels; 0 returns ``mask`` unchanged.

    Returns
    -------
    (Y, X) bool array of the same kind
    """
    if radius_px <= 0:
        return mask
    from scipy import ndimage as ndi
    from skimage.morphology import disk

    footprint = disk(radius_px).astype(bool)

    def block(m):
        return ndi.binary_dilation(m, footprint)

    if isinstance(mask, da.Array):
        return mask.map_overlap(block, depth=radius_px, boundary=False, dtype=bool)
    return block(np.asarray(mask))
