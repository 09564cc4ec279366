"""Per-cell stains other than HER2 (ER, PR, Ki67, mTOR, E-cadherin, DAPI) and off-library discs."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from qdquant.simulate.rendering import _render_cells
from qdquant.simulate.tissue import _candidates, _exact_counts, _poisson_disc, _smooth_noise
from qdquant.simulate.truth import _label_means


def _design_markers(
    rng, cells, nuclei, ctype, masks, *, um, psf_sigma_px, pcts, receptor_split,
) -> dict:
    """Design and render the nuclear, cytoplasmic and membrane markers and DAPI.

    ER and PR take bins 0..3 (positives split over 1+/2+/3+ by
    ``receptor_split``), Ki67 and mTOR are positive or not (mTOR only in
    cells with a cytoplasm), E-cadherin marks every tumour cell's ring; only
    tumour cells carry markers. Each cell's drawn level is calibrated so
    that its compartment mean after the blur lands on its target.

    Parameters
    ----------
    rng : numpy.random.Generator
    cells, nuclei : (Y, X) ndarray of int
    ctype : (n,) ndarray of int
        Cell type of ids 1..n (0 tumour, 1 stroma, 2 immune).
    masks : tuple of three (Y, X) bool ndarrays
        Nucleus, membrane ring and cytoplasm.
    um : float
        Pixels per µm.
    psf_sigma_px : float
    pcts : 4 floats
        % of tumour cells positive for ER, PR, Ki67 and mTOR.
    receptor_split : 3 floats

    Returns
    -------
    dict
        Per-cell arrays (index = id) ``er_bin``, ``pr_bin``, ``ki67_bin``,
        ``mtor_bin``, ``er_t``, ``pr_t``, ``ki67_t``, ``mtor_t``, ``ecad_t``,
        ``dapi_lvl``; (Y, X) float images ``er_img``, ``pr_img``, ``ki_img``,
        ``mtor_img``, ``ecad_img``, ``dapi_img``.
    """
    nucleus_m, ring_m, cyto_m = masks
    er_pct, pr_pct, ki67_pct, mtor_pct = pcts
    shape = cells.shape
    n = len(ctype)
    tum_ids = np.nonzero(ctype == 0)[0] + 1
    n_t = len(tum_ids)
    ring_ids = np.where(ring_m, cells, 0)
    split = np.asarray(receptor_split, float)

    def bins_for(pct):
        n_pos = int(round(pct / 100.0 * n_t))
        per = _exact_counts(split, n_pos) if n_pos else np.zeros(3, int)
        out = np.zeros(n + 1, np.int8)
        out[rng.permutation(tum_ids)] = np.repeat(np.arange(4), [n_t - n_pos, *per])
        return out

    def positive_for(pct, among):
        n_pos = min(int(round(pct / 100.0 * n_t)), len(among))
        out = np.zeros(n + 1, np.int8)
        out[rng.permutation(among)[:n_pos]] = 1
        return out

    # mTOR is read on the cytoplasm: a cell without one (crowded nests) cannot be positive
    has_cyto = np.bincount(cells[cyto_m], minlength=n + 1) > 0
    er_bin, pr_bin = bins_for(er_pct), bins_for(pr_pct)
    ki67_bin = positive_for(ki67_pct, tum_ids)
    mtor_bin = positive_for(mtor_pct, tum_ids[has_cyto[tum_ids]])
    bin_lo = np.array([0.0, 45.0, 105.0, 220.0])
    bin_hi = np.array([8.0, 65.0, 135.0, 300.0])

    def bin_targets(bins):
        return np.where(np.arange(n + 1) > 0, rng.uniform(bin_lo[bins], bin_hi[bins]), 0.0)

    er_t, pr_t = bin_targets(er_bin), bin_targets(pr_bin)
    ki67_t = np.where(ki67_bin > 0, rng.uniform(60, 150, n + 1), rng.uniform(0, 6, n + 1))
    mtor_t = np.where(mtor_bin > 0, rng.uniform(60, 110, n + 1), rng.uniform(0, 6, n + 1))
    for t_ in (er_t, pr_t, ki67_t, mtor_t):  # markers only in tumour cells
        t_[0] = 0.0
        t_[1:][ctype != 0] = 0.0
    chrom = np.clip(1.0 + 0.25 * _smooth_noise(rng, shape, 0.8 * um), 0.3, 1.8)
    nuc_ids = np.where(nucleus_m, cells, 0)

    def nuc_measure(img):
        return _label_means(img, cells, nucleus_m, n)

    def cyto_measure(img):
        return _label_means(img, cells, cyto_m, n)

    er_img, _ = _render_cells(er_t, nuc_ids, chrom, nuc_measure, psf_sigma_px)
    pr_img, _ = _render_cells(pr_t, nuc_ids, chrom, nuc_measure, psf_sigma_px)
    ki_img, _ = _render_cells(ki67_t, nuc_ids, chrom, nuc_measure, psf_sigma_px)
    cyto_draw = np.where((cells > 0) & ~nucleus_m, cells, 0)
    cyto_tex = np.clip(1.0 + 0.2 * _smooth_noise(rng, shape, 1.5), 0.4, 1.6)
    mtor_img, _ = _render_cells(mtor_t, cyto_draw, cyto_tex, cyto_measure, psf_sigma_px)

    ecad_t = np.zeros(n + 1)
    ecad_t[tum_ids] = rng.uniform(70.0, 150.0, n_t)
    ecad_img, _ = _render_cells(
        ecad_t, ring_ids, np.clip(1.0 + 0.2 * _smooth_noise(rng, shape, 1.0), 0.4, 1.6),
        lambda img: _label_means(img, cells, ring_m, n), psf_sigma_px,
    )

    dapi_lvl = np.zeros(n + 1)
    dapi_lvl[1:] = rng.uniform(120.0, 260.0, n) * np.select([ctype == 2, ctype == 1], [1.4, 1.1], 1.0)
    dapi_img = ndi.gaussian_filter((dapi_lvl[nuclei] * chrom).astype(np.float32), psf_sigma_px)
    return {
        "er_bin": er_bin, "pr_bin": pr_bin, "ki67_bin": ki67_bin, "mtor_bin": mtor_bin,
        "er_t": er_t, "pr_t": pr_t, "ki67_t": ki67_t, "mtor_t": mtor_t, "ecad_t": ecad_t,
        "dapi_lvl": dapi_lvl, "er_img": er_img, "pr_img": pr_img, "ki_img": ki_img,
        "mtor_img": mtor_img, "ecad_img": ecad_img, "dapi_img": dapi_img,
    }


def _off_library_discs(
    rng, cells, nuclei, ctype, nest, inner, *, um, psf_sigma_px, lipofuscin_in_cells,
):
    """Red blood cells in stroma and lipofuscin granules, whose spectra are not in the library.

    Returns
    -------
    off : (2, Y, X) float32
        Abundance of RBC and lipofuscin (units of their spectra).
    info : dict
        ``n_rbc``, ``n_lipofuscin``.
    """
    shape = cells.shape
    off = np.zeros((2,) + shape, np.float32)
    free = (cells == 0) & (~nest) & (ndi.distance_transform_edt(cells == 0) > 5 * um) & inner
    n_rbc = max(1, int(round(14 * shape[0] * shape[1] / 512**2)))
    n_lip = max(1, int(round(10 * shape[0] * shape[1] / 512**2)))
    cand = _poisson_disc(rng, _candidates(rng, free, 3 * um), 9 * um)
    if lipofuscin_in_cells:
        cytoplasm = np.r_[False, ctype == 0][cells] & (nuclei == 0) & inner
        lip = _poisson_disc(rng, _candidates(rng, cytoplasm, 1 * um), 9 * um)
        rbc = cand[rng.permutation(len(cand))[:n_rbc]]
        cand = np.concatenate([rbc, lip[rng.permutation(len(lip))[:n_lip]]])
        n_rbc = len(rbc)
    else:
        cand = cand[rng.permutation(len(cand))[: n_rbc + n_lip]]
        n_rbc = min(n_rbc, len(cand))
    rad = np.concatenate([rng.uniform(3.3, 3.8, n_rbc), rng.uniform(0.8, 1.6, len(cand) - n_rbc)]) * um
    amp_d = np.concatenate([rng.uniform(150, 300, n_rbc), rng.uniform(250, 500, len(cand) - n_rbc)])
    dseed = np.zeros(shape, np.int32)
    dseed[np.rint(cand[:, 0]).astype(int), np.rint(cand[:, 1]).astype(int)] = np.arange(1, len(cand) + 1)
    dd, (jy, jx) = ndi.distance_transform_edt(dseed == 0, return_indices=True)
    k = dseed[jy, jx] - 1
    rr = dd / rad[k]
    inside = rr <= 1.0
    profile = np.where(k < n_rbc, 0.65 + 0.35 * rr**2, 1.0)  # biconcave red cells
    val = np.where(inside, amp_d[k] * profile, 0.0)
    off[0] = ndi.gaussian_filter(np.where(k < n_rbc, val, 0.0).astype(np.float32), psf_sigma_px)
    off[1] = ndi.gaussian_filter(np.where(k >= n_rbc, val, 0.0).astype(np.float32), psf_sigma_px)
    return off, {"n_rbc": int(n_rbc), "n_lipofuscin": int(len(cand) - n_rbc)}
