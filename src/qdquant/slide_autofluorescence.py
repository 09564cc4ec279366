"""Tissue autofluorescence measured on the slide itself (semi-blind unmixing).

A library's autofluorescence spectrum is a guess: tissue autofluorescence
differs between stroma and epithelium, between tissues and fixations. Light
the library's spectrum does not explain is fitted by the narrow QD spectra
next to it (a HER2-null slide then reads 1+), while the residual stays near
the noise, so neither the residual nor library refinement (a shift of a
spectrum) finds it. This module takes the autofluorescence spectra from the
slide's own stain-free pixels instead, as SUFI-style semi-blind unmixing does:
pixels where neither the nuclear nor the membrane stain contributes are
autofluorescence plus noise, and their spectra, grouped by shape, are the
slide's autofluorescence endmembers.
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.vq import kmeans2

from qdquant.errors import InputError
from qdquant.unmixing.spectra import cosine_similarity as _cosine

__all__ = ["autofluorescence_from_slide"]

#: Stain share allowed in the first round of choosing stain-free pixels (see ``n_rounds``).
FIRST_ROUND_SHARE = 0.35


def _shares(pixels: np.ndarray, spectra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each endmember's share of each pixel's fitted light (norm of ``a_k x_k``), and the total."""
    from qdquant.unmixing import unmix

    abundances, _ = unmix(pixels[:, None, :], spectra)
    norms = np.linalg.norm(spectra, axis=0)[:, None] * abundances[:, 0, :].astype(np.float64)
    total = norms.sum(axis=0)
    return norms / np.maximum(total, 1e-12), total


def autofluorescence_from_slide(
    pixels,
    spectra,
    *,
    autofluorescence: int,
    stains,
    n_types: int = 3,
    max_stain_share: float = 0.1,
    min_pixels: int = 500,
    n_rounds: int = 2,
    same_cosine: float = 0.998,
    min_cosine: float = 0.8,
    seed: int = 0,
):
    """Autofluorescence spectra of a slide, from its stain-free pixels.

    Parameters
    ----------
    pixels : (C, N) array_like
        A sample of the slide's pixels, counts with the dark offset
        subtracted (and the shading divided out, if any).
    spectra : (C, K) array_like
        The library.
    autofluorescence : int
        Column of the library's autofluorescence.
    stains : sequence of int
        Columns whose share decides whether a pixel is stain-free: the
        nuclear and membrane stains and markers spread over whole cells or
        their cytoplasm. Not the nuclear or membrane markers (they sit where
        the stains are) and not those whose fitted abundance a wrong
        autofluorescence biases most (all QD markers would be: choosing by
        them finds no epithelium).
    n_types : int, optional
        Autofluorescence spectra to look for (k-means on the shapes of the
        stain-free pixels; stroma and epithelium differ).
    max_stain_share : float, optional
        A pixel is stain-free when every stain gives less than this share of
        its fitted light (norm of ``a_k x_k`` over the sum of those norms).
    min_pixels : int, optional
        Fewer stain-free pixels than this and no spectrum is returned.
    n_rounds : int, optional
        Rounds of choosing pixels and finding spectra: the stain share
        allowed falls from :data:`FIRST_ROUND_SHARE` to ``max_stain_share``,
        each round's spectra replacing the library's autofluorescence in the
        next (a library autofluorescence that is off lends part of the
        tissue's light to the stains, a blue one to DAPI, which hides the
        stain-free pixels from a strict first round).
    same_cosine : float, optional
        Spectra whose cosine similarity is at least this are the same: a
        second type that close to the first is dropped, and when the one
        left is that close to the library's, none is returned (the library
        is right for this slide).
    min_cosine : float, optional
        A type whose cosine similarity to the library's autofluorescence is
        below this is dropped: not the tissue autofluorescence the library
        describes a little off, but another emitter (lipofuscin, red blood
        cells), which the residual flags leave out of the measurements.
    seed : int, optional
        Seed of the k-means initialisation (the result is deterministic).

    Returns
    -------
    afs : (C, J) float64 ndarray
        Peak-normalised spectra, most populous first; J = 0 when the
        library's spectrum is right for the slide, when none is close enough
        to it to be tissue autofluorescence, when there are fewer
        than ``min_pixels`` stain-free pixels, or when the spectra found fit
        those pixels no better than the library's.
    n_pixels : int
        Stain-free pixels they come from.

    Notes
    -----
    Only the brighter stain-free pixels are used (total fitted light
    between the median and the 95th percentile of those with any), so the
    spectra are of the tissue, neither of the glass's noise nor of a few
    bright off-library objects (red blood cells, lipofuscin granules). Each
    type must hold at least 5 % of the pixels.
    """
    pixels = np.asarray(pixels, dtype=np.float64)
    a = np.asarray(spectra, dtype=np.float64)
    if pixels.ndim != 2 or a.ndim != 2 or pixels.shape[0] != a.shape[0]:
        raise InputError(f"pixels (C, N) and spectra (C, K) must share C; got {pixels.shape} and {a.shape}")
    if not 1 <= n_types:
        raise InputError(f"n_types must be >= 1, got {n_types}")
    if not 0 <= autofluorescence < a.shape[1]:
        raise InputError(f"autofluorescence must be a column of spectra (0..{a.shape[1] - 1}), got {autofluorescence}")
    others = [i for i in range(a.shape[1]) if i != autofluorescence]
    stains = list(stains)
    if autofluorescence in stains:
        raise InputError(f"stains must not include the autofluorescence column {autofluorescence}")
    chosen, fit = stains, a
    bounds = np.geomspace(FIRST_ROUND_SHARE, max_stain_share, n_rounds) if n_rounds > 1 else [max_stain_share]
    for bound in bounds:
        afs, free = _find(pixels, fit, stains, n_types, bound, min_pixels, seed)
        if afs.shape[1] == 0:
            return afs, int(free.sum())
        fit = np.column_stack([a[:, others], afs])
        stains = [others.index(i) for i in chosen]
    library_af = a[:, autofluorescence]
    afs = afs[:, [j for j in range(afs.shape[1]) if _cosine(afs[:, j], library_af) >= min_cosine]]
    if afs.shape[1] > 1 and _cosine(afs[:, 0], afs[:, 1]) >= same_cosine:
        afs = afs[:, :1]
    if afs.shape[1] == 1 and _cosine(afs[:, 0], library_af) >= same_cosine:
        return afs[:, :0], int(free.sum())
    x = pixels[:, free]
    if _rms_residual(x, np.column_stack([a[:, others], afs])) > _rms_residual(x, a):
        return afs[:, :0], int(free.sum())
    return afs, int(free.sum())


def _rms_residual(x, a) -> float:
    from qdquant.unmixing import unmix

    _, residual = unmix(x[:, None, :], a)
    return float(np.sqrt(np.mean(np.square(residual, dtype=np.float64))))


def _find(pixels, a, stains, n_types, max_stain_share, min_pixels, seed):
    """One round of :func:`autofluorescence_from_slide`: the stain-free pixels under ``a``, grouped by
    shape. Returns the spectra and the mask of the pixels used."""
    share, total = _shares(pixels, a)
    free = (share[stains] < max_stain_share).all(axis=0)
    lit = total > 0
    if lit.any():
        low, high = np.percentile(total[lit], [50, 95])
        free &= (total > low) & (total <= high)
    n = int(free.sum())
    if n < min_pixels:
        return np.zeros((a.shape[0], 0)), free
    x = pixels[:, free]
    shapes = x / np.maximum(x.sum(axis=0), 1e-12)
    k = min(n_types, n)
    if k > 1:
        _, label = kmeans2(shapes.T, k, seed=np.random.default_rng(seed), minit="++")
    else:
        label = np.zeros(n, dtype=int)
    counts = np.bincount(label, minlength=k)
    afs = []
    for j in np.argsort(-counts):
        if counts[j] < 0.05 * n:
            continue
        spectrum = np.clip(x[:, label == j].mean(axis=1), 0, None)
        if spectrum.max() > 0:
            afs.append(spectrum / spectrum.max())
    return (np.column_stack(afs) if afs else np.zeros((a.shape[0], 0))), free
