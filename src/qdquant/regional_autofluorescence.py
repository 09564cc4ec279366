"""Tissue autofluorescence fitted per region of the slide: stroma and epithelium apart.

Stroma (collagen, elastin) and epithelium (flavins, NADH) fluoresce with
different spectra, and a crowded tumour nest has almost no pixel free of
stain, so :mod:`qdquant.slide_autofluorescence` (stain-free pixels) finds the
stroma's spectrum but not the epithelium's. Light of the epithelium that the
library's spectrum does not explain goes to the QD spectra beside it: a
HER2-null slide reads HER2-ultralow or 1+. Here the slide's sampled windows
are cut into blocks of a few cells, the blocks grouped by their fitted
composition (nests against stroma), and the library's autofluorescence is
shifted and widened to fit each group's pixels, every other endmember held
as it is, so it takes the shape of the group's own autofluorescence without
being free to take up a stain's light.
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.vq import kmeans2
from scipy.interpolate import CubicSpline
from scipy.optimize import minimize

from qdquant.errors import InputError
from qdquant.unmixing.spectra import cosine_similarity as _cosine

__all__ = ["autofluorescence_by_region"]

#: Starting shifts (nm) of the fit of each region's spectrum: the stroma's lies far to the
#: blue of a library spectrum taken between the two, the epithelium's to the red.
START_SHIFTS_NM = (-15.0, 0.0, 15.0)

#: A fitted shift beyond this (nm), or a width changed by more than this factor either way, is
#: not the tissue's autofluorescence but other light the spectrum was bent to explain (on a
#: slide whose autofluorescence is the library's, a QD's drift left over halved its width);
#: that region keeps the library's spectrum.
MAX_SHIFT_NM = 40.0
MAX_WIDEN = 1.33


def _block_light(abundances, spectra, block_px: int) -> np.ndarray:
    """Each endmember's fitted light (norm of ``a_k x_k``) in each ``block_px`` block of a
    (K, Y, X) window, (K, blocks) in raster order; edge pixels beyond whole blocks left out."""
    k, h, w = abundances.shape
    ny, nx = h // block_px, w // block_px
    blocks = abundances[:, : ny * block_px, : nx * block_px].reshape(k, ny, block_px, nx, block_px).mean(axis=(2, 4))
    return np.linalg.norm(spectra, axis=0)[:, None] * blocks.reshape(k, -1)


def _regions(windows_light, shapes, block_px: int, n_regions: int, seed: int, core: float) -> list[np.ndarray]:
    """Each window's (Y, X) region of every pixel (-1: none): the tissue blocks of all windows
    grouped by k-means on their composition (each endmember's share of the block's light).

    Only each group's ``core`` share of blocks, those nearest its centre relative to the next
    group's, get its label: blocks across a nest's edge hold both tissues, and the spectrum fitted
    to a group with them lies between the two (a fifth of the blocks of the epithelium group
    were stroma on a slide of the independent generator, and its fit moved 6 of the 15 nm).
    """
    light = np.concatenate(windows_light, axis=1)
    total = light.sum(axis=0)
    label = np.full(total.size, -1)
    # tissue: blocks with at least a fifth of the light of the brightest (glass and gaps left out)
    tissue = total >= 0.2 * np.percentile(total, 95) if total.size else total.astype(bool)
    if tissue.sum() >= 2 * n_regions:
        composition = (light[:, tissue] / total[tissue]).T
        centres, group = kmeans2(composition, n_regions, seed=np.random.default_rng(seed), minit="++")
        dist = np.linalg.norm(composition[:, None, :] - centres[None], axis=2)
        own = dist[np.arange(group.size), group]
        dist[np.arange(group.size), group] = np.inf
        ratio = own / np.maximum(dist.min(axis=1), 1e-12) if n_regions > 1 else own
        core_label = np.full(group.size, -1)
        for r in range(n_regions):
            members = group == r
            if members.any():
                keep = members & (ratio <= np.quantile(ratio[members], core))
                core_label[keep] = r
        label[tissue] = core_label
    out, start = [], 0
    for h, w in shapes:
        ny, nx = h // block_px, w // block_px
        regions = np.full((h, w), -1)
        regions[: ny * block_px, : nx * block_px] = np.repeat(
            np.repeat(label[start : start + ny * nx].reshape(ny, nx), block_px, axis=0), block_px, axis=1)
        out.append(regions)
        start += ny * nx
    return out


def _trimmed_mean_square(residual: np.ndarray, trim: float) -> float:
    """Mean of the squared residuals but for the ``trim`` worst-fitted share of the pixels."""
    r2 = np.square(residual, dtype=np.float64).ravel()
    keep = max(1, int(round((1.0 - trim) * r2.size)))
    return float(np.partition(r2, keep - 1)[:keep].mean())


def _moved(spectrum, wavelengths_nm, spline, shift_nm: float, widen: float) -> np.ndarray:
    from qdquant.unmixing.refine import _shifted_many

    return _shifted_many(spectrum, wavelengths_nm, [shift_nm], widen, spline=spline)[0]


def autofluorescence_by_region(
    windows,
    spectra,
    wavelengths_nm,
    *,
    autofluorescence: int,
    block_px: int,
    n_regions: int = 2,
    trim: float = 0.1,
    max_pixels: int = 60_000,
    min_pixels: int = 2_000,
    same_cosine: float = 0.998,
    core: float = 0.5,
    seed: int = 0,
):
    """The autofluorescence spectrum of each region of a slide, from the library's.

    Parameters
    ----------
    windows : sequence of (C, Y, X) array_like
        Windows of the slide (strided alike), counts with the dark offset
        subtracted (and the shading divided out, if any).
    spectra : (C, K) array_like
        The library the windows are fitted with (other autofluorescence
        kinds excluded: only ``autofluorescence`` is moved).
    wavelengths_nm : (C,) array_like
        Band centres, nm, increasing.
    autofluorescence : int
        Column of the library's autofluorescence.
    block_px : int
        Edge of the blocks that are grouped into regions, in the windows'
        pixels: a few cells (8 µm), so a block is nest or stroma.
    n_regions : int, optional
        Regions (k-means groups of the blocks). Default 2: stroma and
        epithelium.
    trim : float, optional
        Share of each region's worst-fitted pixels left out of its fit
        (default 0.1): red blood cells and other off-library light would
        pull the spectrum.
    max_pixels : int, optional
        Pixels each region's fit uses at most (a regular subsample).
    min_pixels : int, optional
        A region with fewer pixels keeps the library's spectrum.
    same_cosine : float, optional
        Spectra of two regions whose cosine similarity is at least this
        are one: only the first is returned; and when that one is as close
        to the library's, none (the library's is right for the slide: a
        fit of its shift and width to noise would only move it).
    core : float, optional
        Share of each region's blocks its fit uses: those nearest the
        region's centre relative to the next region's (default 0.5); the
        blocks across a nest's edge hold both tissues.
    seed : int, optional
        Seed of the k-means initialisation (the result is deterministic).

    Returns
    -------
    afs : (C, J) float64 ndarray
        One spectrum per distinct region, largest region first, each with
        the library column's maximum (the library's own for a region whose
        fit ran past :data:`MAX_SHIFT_NM` or :data:`MAX_WIDEN`); J = 0 when
        the library's spectrum is right for the slide or no region's fit is
        kept.
    fits : list of dict
        Per region, largest first: ``n_pixels``, ``shift_nm``, ``widen``,
        ``gain`` (the share of the region's trimmed squared residual the
        fit removes, over the library's spectrum) and ``kept``.
    """
    from qdquant.unmixing import unmix

    a = np.asarray(spectra, dtype=np.float64)
    wl = np.asarray(wavelengths_nm, dtype=np.float64)
    windows = [np.asarray(w, dtype=np.float64) for w in windows]
    if a.ndim != 2 or wl.shape != (a.shape[0],) or any(w.ndim != 3 or w.shape[0] != a.shape[0] for w in windows):
        raise InputError(f"windows (C, Y, X), spectra (C, K) and wavelengths (C,) must share C; got "
                         f"{[w.shape for w in windows]}, {a.shape} and {wl.shape}")
    if not 0 <= autofluorescence < a.shape[1]:
        raise InputError(f"autofluorescence must be a column of spectra (0..{a.shape[1] - 1}), got {autofluorescence}")
    if block_px < 1 or n_regions < 1 or not 0 <= trim < 1 or not 0 < core <= 1:
        raise InputError(f"block_px >= 1, n_regions >= 1, 0 <= trim < 1 and 0 < core <= 1 needed; got {block_px}, "
                         f"{n_regions}, {trim}, {core}")
    light = [_block_light(unmix(w, a)[0].astype(np.float64), a, block_px) for w in windows]
    regions = _regions(light, [w.shape[1:] for w in windows], block_px, n_regions, seed, core)
    pixels = np.concatenate([w.reshape(w.shape[0], -1) for w in windows], axis=1)
    region = np.concatenate([r.ravel() for r in regions])
    base = np.delete(a, autofluorescence, axis=1)
    library_af = a[:, autofluorescence]
    spline = CubicSpline(wl, library_af)
    rng = np.random.default_rng(seed)
    fits, afs = [], []
    for r in np.argsort(-np.bincount(region[region >= 0], minlength=n_regions)):
        index = np.flatnonzero(region == r)
        if index.size < min_pixels:
            fits.append(dict(n_pixels=int(index.size), shift_nm=0.0, widen=1.0, gain=0.0, kept=False))
            continue
        x = pixels[:, np.sort(rng.choice(index, min(max_pixels, index.size), replace=False))]

        def cost(theta, x=x):
            moved = _moved(library_af, wl, spline, theta[0], np.exp(theta[1]))
            _, residual = unmix(x[:, None, :], np.column_stack([base, moved]))
            return _trimmed_mean_square(residual, trim)

        best = min((minimize(cost, np.array([s, 0.0]), method="Nelder-Mead",
                             options=dict(xatol=0.2, fatol=1e-4, maxiter=300)) for s in START_SHIFTS_NM),
                   key=lambda result: result.fun)
        shift, widen = float(best.x[0]), float(np.exp(best.x[1]))
        gain = 1.0 - best.fun / cost(np.zeros(2))  # of the region's residual, over the library's spectrum
        kept = abs(shift) <= MAX_SHIFT_NM and 1 / MAX_WIDEN <= widen <= MAX_WIDEN
        fits.append(dict(n_pixels=int(index.size), shift_nm=shift, widen=widen, gain=gain, kept=kept))
        afs.append(_moved(library_af, wl, spline, shift, widen) if kept else library_af)
    if len(afs) > 1 and _cosine(afs[0], afs[1]) >= same_cosine:
        afs = afs[:1]
    if len(afs) == 1 and _cosine(afs[0], library_af) >= same_cosine or not any(f["kept"] for f in fits):
        afs = []  # one tissue autofluorescence, the library's: it is right for this slide
    return (np.column_stack(afs) if afs else np.zeros((a.shape[0], 0))), fits
