"""Semi-synthetic slide from a real MIBI-TOF field of view."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage as ndi

from qdquant.errors import InputError
from qdquant.simulate.reference import compartments, membrane_ring
from qdquant.simulate.rendering import _camera, _check_camera_args
from qdquant.simulate.slide import SimulatedSlide, _slide_record
from qdquant.simulate.spectra import _IDX, default_panel
from qdquant.simulate.tissue import _abundance_stack, _autofluorescence, _check
from qdquant.simulate.truth import (
    HER2_DEFAULTS,
    _centroids,
    _her2_cells,
    _her2_geometry,
    _label_means,
    sample_truth,
)

# ----------------------------------------------------------------------------
# semi-synthetic slide from a real MIBI-TOF field of view


#: MIBI channel files used by :func:`simulate_mibi` (under ``{mibi_dir}/TIFs``).
MIBI_CHANNELS = ("HH3", "ECadherin", "PanKeratin", "HER2", "ER", "Ki67", "CD45")
#: Mesmer whole-cell mask of the MIBI field of view (under ``mibi_dir``).
MIBI_MASK = "fov8_feature_0_wholecell_mask_mesmer.tiff"


def _read_mibi(mibi_dir: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    if not mibi_dir.is_dir():
        raise FileNotFoundError(
            f"{mibi_dir}: MIBI data folder not found (expected TIFs/ and {MIBI_MASK}; "
            "see ark_mibi_tnbc_fov8/SOURCE.txt)"
        )
    paths = {c: mibi_dir / "TIFs" / f"{c}.tiff" for c in MIBI_CHANNELS}
    paths["_mask"] = mibi_dir / MIBI_MASK
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{mibi_dir}: MIBI file(s) not found: {', '.join(missing)}")
    mask = tifffile.imread(paths.pop("_mask")).astype(np.int32)
    chans = {c: tifffile.imread(p).astype(np.float32) for c, p in paths.items()}
    for c, img in chans.items():
        if img.shape != mask.shape:
            raise InputError(f"{paths[c]}: shape {img.shape} differs from the mask's {mask.shape}")
    return chans, mask


def simulate_mibi(
    mibi_dir: str | os.PathLike,
    *,
    seed: int = 0,
    pixel_size_um: float = 0.5,
    mibi_pixel_size_um: float = 0.390625,
    crop: tuple[int, int, int, int] | None = None,
    her2_gamma: float = 2.0,
    her2_p90: float = 200.0,
    nuclear_z_t1: float = 4.0,
    photons_per_count: float = 4.0,
    read_noise: float = 2.5,
    offset_counts: float = 100.0,
    drift_nm: float = 0.0,
    shading: float = 0.0,
    psf_sigma_px: float = 0.8,
    fov_px: int = 256,
) -> SimulatedSlide:
    """Semi-synthetic slide: real breast-tumour morphology from a MIBI-TOF field of view.

    The ark-analysis example field of view (Keren et al. 2018, triple-negative
    breast cancer, ``ark_mibi_tnbc_fov8``) supplies the tissue: its HH3 image
    becomes the DAPI abundance, ECadherin the E-cadherin membrane stain
    (QD705) — kept to the keratin-rich epithelial nests (Otsu of the smoothed
    PanKeratin image), as ECadherin alone is weak in this field — HER2 the
    HER2 abundance (QD655), ER the ER nuclear stain (QD565) and Ki67 the Ki67
    stain (QD585); PR (QD605) and mTOR (QD525) have no MIBI channel and are
    0. Each sparse MIBI count image is despiked (clipped at
    its 99.9th percentile), smoothed (Gaussian, 1.5 MIBI pixels), resampled
    to ``pixel_size_um`` and blurred by the PSF. The Mesmer whole-cell mask
    gives the true cells; the true nuclei are the HH3-bright part of each
    cell (Otsu; the cell's core where HH3 shows none).

    Truth classes are *measured* on the true abundance over the true cells
    by the simulator's reference implementation of the contract's rules
    (:mod:`qdquant.simulate.reference`): HER2 from the membrane ring
    sectors, ER/Ki67 bins from the mean over the nucleus; tumour cells are
    those whose E-cadherin ring mean passes the contract's
    ``tumour: threshold: auto`` gate (Otsu on log1p; the threshold is recorded as
    ``tumour_threshold_ecad``), immune cells the other cells whose CD45 cell
    mean is 3 robust standard deviations above the median, the rest stroma.

    Parameters
    ----------
    mibi_dir : path-like
        Folder holding ``TIFs/{HH3,ECadherin,HER2,ER,Ki67,CD45}.tiff`` and
        ``fov8_feature_0_wholecell_mask_mesmer.tiff``.
    seed : int
        Seed of the noise, spectra perturbation and autofluorescence field.
    pixel_size_um : float
        Output pixel size, µm.
    mibi_pixel_size_um : float
        Pixel size of the MIBI images, µm (800 µm over 2048 px).
    crop : (y0, y1, x0, x1), optional
        Region of the MIBI images to use, MIBI pixels.
    her2_gamma, her2_p90 : float
        HER2 abundance = scale · smoothed_counts ** her2_gamma, the scale
        chosen so that the 90th percentile of the cells' ring means is
        ``her2_p90`` units: with the defaults the cells span all four HER2
        classes.
    nuclear_z_t1 : float
        ER and Ki67 (whose MIBI counts are sparse and near background here)
        are background-subtracted (median of the nuclear means) and scaled
        so that a nucleus this many robust standard deviations (MAD) above
        the background reaches t1 = 30 units.
    photons_per_count, read_noise, offset_counts, drift_nm, shading, psf_sigma_px, fov_px
        As in :func:`simulate_slide`.

    Raises
    ------
    FileNotFoundError
        When ``mibi_dir`` or one of its files is missing.
    """
    chans, mask = _read_mibi(Path(mibi_dir))
    _check(pixel_size_um > 0 and mibi_pixel_size_um > 0, "pixel sizes must be > 0")
    _check_camera_args(locals())
    if crop is not None:
        y0, y1, x0, x1 = (int(v) for v in crop)
        mask = mask[y0:y1, x0:x1]
        chans = {c: v[y0:y1, x0:x1] for c, v in chans.items()}
        _check(min(mask.shape) >= 32, f"crop: region {crop} is too small")
    rng = np.random.default_rng(seed)
    sm, cells, mesmer_ids = _resampled(chans, mask, zoom=mibi_pixel_size_um / pixel_size_um)
    n = int(cells.max())
    _check(n > 0, f"{mibi_dir}: the Mesmer mask holds no cell in this region")
    nuclei = _mibi_nuclei(sm["HH3"], cells, n)
    masks = compartments(cells, nuclei, HER2_DEFAULTS["membrane_width_px"])  # nucleus, membrane ring, cytoplasm
    stains, nest = _mibi_stains(sm, cells, masks, n, her2_gamma=her2_gamma, her2_p90=her2_p90,
                                nuclear_z_t1=nuclear_z_t1, psf_sigma_px=psf_sigma_px)
    af = _autofluorescence(rng, ~(cells > 0), 1.0 / pixel_size_um)
    abund = _abundance_stack(cells.shape, offset_counts, **stains, AF=af)
    camera = _camera(rng, abund, drift_nm=drift_nm, shading=shading, fov_px=fov_px,
                     photons_per_count=photons_per_count, read_noise=read_noise, offset_counts=offset_counts)
    cells_truth, thresholds = _mibi_cells_truth(abund, sm["CD45"], cells, nuclei, masks, n, mesmer_ids, pixel_size_um)
    truth = sample_truth(cells_truth)
    truth.update(
        {
            "nest_fraction": float(nest.mean()),
            "source": "ark-analysis example MIBI-TOF fov8 (Keren et al. 2018), Mesmer whole-cell mask",
            "truth_rule": "contract rules measured on the true abundance over the true cells",
            **thresholds,
            "spectral_shift_nm": camera["shifts"],
            "spectral_width_factor": camera["widths"],
            "shading": float(shading),
            "shading_fov_px": int(fov_px),
            "off_library_af": False,
            "params": {
                "seed": int(seed), "pixel_size_um": float(pixel_size_um),
                "mibi_pixel_size_um": float(mibi_pixel_size_um),
                "crop": list(crop) if crop is not None else None,
                "her2_gamma": float(her2_gamma), "her2_p90": float(her2_p90),
                "photons_per_count": float(photons_per_count), "read_noise": float(read_noise),
                "offset_counts": float(offset_counts), "drift_nm": float(drift_nm),
                "shading": float(shading), "psf_sigma_px": float(psf_sigma_px),
                "fov_px": int(fov_px),
            },
        }
    )
    return _slide_record(camera, truth, abund, nuclei, cells, cells_truth, pixel_size_um,
                         np.zeros((2,) + cells.shape, np.float32))


def _resampled(chans: dict, mask: np.ndarray, *, zoom: float):
    """The MIBI images despiked, smoothed and resampled by ``zoom``, and the Mesmer cells on the same grid.

    Returns the smoothed images by channel, the (Y, X) int32 cells (ids
    1..n, consecutive) and the Mesmer id of each cell id (index 0: 0).
    """

    def prep(img):
        img = np.minimum(img, np.percentile(img, 99.9))
        img = ndi.gaussian_filter(img, 1.5)
        img = ndi.zoom(img, zoom, order=1) if zoom != 1 else img
        return np.maximum(img, 0.0).astype(np.float32)

    sm = {c: prep(v) for c, v in chans.items()}
    shape = sm["HH3"].shape
    cells = ndi.zoom(mask, zoom, order=0) if zoom != 1 else mask.copy()
    cells = cells[: shape[0], : shape[1]]
    cells = np.where(cells > 0, cells, 0).astype(np.int64)
    mesmer_ids, inv = np.unique(cells, return_inverse=True)
    cells = inv.reshape(shape).astype(np.int32)  # 0 stays 0 (it sorts first)
    if mesmer_ids[0] != 0:
        cells += 1
        mesmer_ids = np.concatenate([[0], mesmer_ids])
    return sm, cells, mesmer_ids


def _mibi_nuclei(hh3: np.ndarray, cells: np.ndarray, n: int) -> np.ndarray:
    """The true nuclei: the HH3-bright part of each cell (Otsu), else the cell's core."""
    from skimage.filters import threshold_otsu

    inside = cells > 0
    thr = threshold_otsu(hh3[inside]) if np.ptp(hh3[inside]) > 0 else np.inf
    nuclei = np.where(ndi.binary_opening(ndi.binary_fill_holes(hh3 >= thr)) & inside, cells, 0)
    depth = ndi.distance_transform_edt(membrane_ring(cells, 1.0) | ~inside)
    depth = np.where(inside, depth, 0)
    max_depth = ndi.maximum(depth, cells, np.arange(n + 1))
    nuc_area = np.bincount(nuclei.ravel(), minlength=n + 1)
    core = inside & (depth >= 0.5 * max_depth[cells]) & (nuc_area[cells] < 10)
    return np.where(core, cells, nuclei).astype(np.int32)


def _mibi_stains(sm: dict, cells, masks, n: int, *, her2_gamma, her2_p90, nuclear_z_t1, psf_sigma_px):
    """The stain abundances (by endmember: DAPI, QD565 ER, QD585 Ki67, QD655 HER2, QD705 E-cadherin)
    made from the smoothed MIBI images, blurred by the PSF; and the epithelial nests (Y, X) bool."""
    from skimage.filters import threshold_otsu

    nucleus_m, ring_m, _ = masks
    shape = cells.shape

    def blur(img):
        return ndi.gaussian_filter(img.astype(np.float32), psf_sigma_px)

    def scale_to(img, mask_, value, q):
        ref = float(np.percentile(img[mask_], q)) if mask_.any() else 0.0
        return img * (value / ref) if ref > 0 else img

    dapi = blur(scale_to(sm["HH3"], nucleus_m, 180.0, 50))
    # epithelium: the keratin-rich nests (Otsu of the heavily smoothed PanKeratin)
    pank = ndi.gaussian_filter(sm["PanKeratin"], 6.0)
    nest = pank >= threshold_otsu(pank) if np.ptp(pank) > 0 else np.ones(shape, bool)
    nest = ndi.binary_fill_holes(ndi.binary_opening(nest, iterations=3))
    nest_w = ndi.gaussian_filter(nest.astype(np.float32), 3.0)
    ecad_raw = blur(sm["ECadherin"] * nest_w)
    ecad_cell = _label_means(ecad_raw, cells, ring_m, n)
    ecad = ecad_raw * (120.0 / max(np.nanpercentile(ecad_cell[1:], 90), 1e-9))
    her2_raw = blur(sm["HER2"] ** her2_gamma)
    her2_cell = _label_means(her2_raw, cells, ring_m, n)
    her2 = her2_raw * (her2_p90 / max(np.nanpercentile(her2_cell[1:], 90), 1e-9))

    def robust_nuclear(img, t1):
        # background-subtracted: t1 is reached at median + nuclear_z_t1 MADs of the nuclear means
        raw = blur(img)
        means = _label_means(raw, cells, nucleus_m, n)[1:]
        med = float(np.nanmedian(means))
        mad = float(np.nanmedian(np.abs(means - med))) * 1.4826
        if not np.isfinite(mad) or mad <= 0:
            return np.zeros(shape, np.float32)
        return np.maximum(raw - med, 0.0) * (t1 / (nuclear_z_t1 * mad))

    er = robust_nuclear(sm["ER"], 30.0)
    ki67 = robust_nuclear(sm["Ki67"], 30.0)
    return {"DAPI": dapi, "QD565": er, "QD585": ki67, "QD655": her2, "QD705": ecad}, nest


def _mibi_cells_truth(abund, cd45_image, cells, nuclei, masks, n, mesmer_ids, pixel_size_um):
    """One row per cell, its classes *measured* by the contract's rules on the true abundance over the
    true cells; and the tumour and immune thresholds used (as recorded in the truth)."""
    nucleus_m, ring_m, _ = masks
    inside = cells > 0
    area, cy, cx = _centroids(cells, n)
    nuc_area = np.bincount(nuclei.ravel(), minlength=n + 1)
    inten, comp, her2_cls = _her2_cells(abund[_IDX["QD655"]], _her2_geometry(cells, n, cy, cx))
    markers = {name: abund[_IDX[em]] for name, em in (("ECAD", "QD705"), ("ER", "QD565"), ("Ki67", "QD585"))}
    ecad_ring = _label_means(markers["ECAD"], cells, ring_m, n)
    tumour_thr = _otsu_log1p(ecad_ring[1:])
    cd45 = _label_means(cd45_image, cells, inside, n)
    cd45_med = float(np.nanmedian(cd45[1:]))
    immune_thr = cd45_med + 3.0 * 1.4826 * float(np.nanmedian(np.abs(cd45[1:] - cd45_med)))
    with np.errstate(invalid="ignore"):
        tumour_cell = ecad_ring >= tumour_thr
    ctype = np.where(tumour_cell, "tumour", np.where(cd45 >= immune_thr, "immune", "stroma"))
    panel = default_panel().set_index("marker")

    def nuc_bins(marker):
        m = _label_means(markers[marker], cells, nucleus_m, n)
        bins = np.zeros(n + 1, dtype=np.int64)
        for t in panel.loc[marker, ["t1", "t2", "t3"]].astype(float):
            if np.isfinite(t):
                with np.errstate(invalid="ignore"):
                    bins += m >= t
        bins[np.isnan(m)] = -1
        return m, bins

    er_m, er_bin = nuc_bins("ER")
    ki_m, ki_bin = nuc_bins("Ki67")
    ids = np.arange(1, n + 1)
    present = area[ids] > 0
    ids = ids[present]
    zeros = np.zeros(len(ids))
    cells_truth = pd.DataFrame(
        {
            "CellID": ids,
            "mesmer_id": mesmer_ids[ids].astype(int),
            "X_centroid": cx[ids],
            "Y_centroid": cy[ids],
            "X_um": cx[ids] * pixel_size_um,
            "Y_um": cy[ids] * pixel_size_um,
            "Area": area[ids].astype(int),
            "NucleusArea": nuc_area[ids].astype(int),
            "cell_type": ctype[ids].astype(object),
            "is_tumour": tumour_cell[ids],
            "her2_class": her2_cls[ids],
            "her2_intensity": inten[ids],
            "her2_completeness": comp[ids],
            "her2_membrane_intensity_true": inten[ids],
            "her2_completeness_true": comp[ids],
            "her2_class_true": her2_cls[ids],
            "er_bin": er_bin[ids],
            "pr_bin": zeros.astype(int),
            "ki67_bin": ki_bin[ids],
            "mtor_bin": zeros.astype(int),
            "ki67_positive": ki_bin[ids] > 0,
            "mtor_positive": zeros.astype(bool),
            "er_intensity": er_m[ids],
            "pr_intensity": zeros,
            "ki67_intensity": ki_m[ids],
            "mtor_intensity": zeros,
            "ecad": ecad_ring[ids],
            "cd45": cd45[ids],
        }
    )
    thresholds = {"tumour_threshold_ecad": float(tumour_thr), "immune_threshold_cd45_counts": float(immune_thr)}
    return cells_truth, thresholds


def _otsu_log1p(values: np.ndarray) -> float:
    """Tumour gate: Otsu's threshold on ``log1p`` of the finite values, back in value units.

    The threshold sits midway (in log1p) between the highest value below it
    and the lowest above it, so that it does not fall on a cell.
    """
    from skimage.filters import threshold_otsu

    logv = np.log1p(np.maximum(values[np.isfinite(values)], 0.0))
    if logv.size == 0 or logv.min() == logv.max():
        return float(np.expm1(logv.min())) if logv.size else np.nan
    t = threshold_otsu(logv)
    return float(np.expm1((logv[logv <= t].max() + logv[logv > t].min()) / 2))
