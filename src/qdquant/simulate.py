"""Deterministic simulator of multispectral quantum-dot stained breast tissue.

A :func:`simulate_slide` call builds a (31, Y, X) raw camera cube of a breast
carcinoma section stained with the default quantum-dot panel
(:func:`default_panel`), together with its ground truth: the abundance maps
that generated it, the nucleus and cell label images, a per-cell table of the
designed classes (HER2 0/1+/2+/3+, ER/PR bins, Ki67, mTOR, E-cadherin) and the
sample-level scores obtained by applying the user contract's rules to those
designed classes.

Model, in order
---------------
1. **Tissue.** Irregular epithelial tumour nests (a thresholded smooth random
   field) hold tumour cells packed by Poisson-disc sampling; the stroma
   between them holds elongated fibroblast nuclei (aligned with the nest
   borders) and small round immune nuclei. Nuclei are noisy-edged ellipses
   (tumour ~8 µm across); cells grow from their nucleus (nearest-nucleus
   growth, limited to 3.5–5 µm for tumour cells, 1–2 µm in ``crowded`` nests,
   ~1 µm for stromal and immune cells), so cells in a nest touch; stromal
   cells keep a 1.5 µm gap from tumour cells (basement membrane). No cell
   touches the image border.
2. **Stains** (abundance units of the library, see below). DAPI: every
   nucleus, per-nucleus brightness and chromatin texture. E-cadherin
   (QD705): the membrane ring of tumour cells. HER2 (QD655): the membrane ring
   of tumour cells per their designed class; classes are spatially clustered
   (clonal heterogeneity) and a HER2 0 cell never touches a 2+/3+ cell. ER
   (QD565), PR (QD605), Ki67 (QD585): nuclear, at mid-bin intensities. mTOR
   (QD525): cytoplasmic. Stromal and immune cells carry none of the markers
   (HER2 class 0, all receptor bins negative). Tissue autofluorescence (AF):
   a smooth field of ~10–40 units, stronger in stroma. Every stain is
   blurred by a Gaussian PSF (``psf_sigma_px``); the designed per-cell values
   are *calibrated* so that the contract's measurements taken on the blurred
   true abundance over the TRUE masks land on them (see
   :func:`her2_ring_scores`).
3. **Camera.** ``cube = offset + Poisson(photons_per_count · shading · Σ_k
   a_k s_k) / photons_per_count + N(0, read_noise²)``, rounded and clipped
   to uint16, where ``s_k`` are the *generating* spectra: the library spectra
   shifted by ~0.5–1 nm and widened/narrowed by up to 3 % per endmember (and
   by up to ``drift_nm`` more), as real tissue spectra differ from reference
   spectra. Optional off-library autofluorescent discs (red blood cells,
   lipofuscin) add light whose spectra are not in the library.

Abundance units: a pixel whose spectrum equals library column k times 100 has
abundance 100 of endmember k; every spectrum but the flat ``Offset`` has peak 1
on the band grid, so abundance ≈ counts at the endmember's peak band. The
``Offset`` abundance is the camera dark offset in counts.

The truth abundance maps are the blurred stains *before* shading (what a
shading-corrected unmixing should recover).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from qdquant.errors import InputError
from qdquant.quantification import measure_cells, membrane_sectors
from qdquant.scoring import (
    HER2_CLASSES,
    her2_cell_scores,
    her2_sample_score,
    intensity_bins,
    is_tumour,
    marker_sample_scores,
    receptor_status,
    surrogate_subtype,
    tumour_threshold_auto,
)
from qdquant.segmentation import compartments, membrane_ring

__all__ = [
    "BAND_WAVELENGTHS_NM",
    "ENDMEMBERS",
    "HER2_DEFAULTS",
    "HER2_MIX_PRESETS",
    "SimulatedSlide",
    "band_spectra",
    "default_panel",
    "her2_ring_scores",
    "membrane_ring",  # re-exported from qdquant.segmentation
    "reference_spectra",
    "sample_truth",
    "simulate_mibi",
    "simulate_slide",
    "test_cohort",
    "write_cohort",
    "write_slide",
]

#: Endmembers of the simulated library, in the order of ``abundances``.
ENDMEMBERS: tuple[str, ...] = (
    "DAPI", "QD525", "QD565", "QD585", "QD605", "QD655", "QD705", "AF", "Offset",
)
#: Band centres of the simulated camera, nm (31 bands, 10 nm apart).
BAND_WAVELENGTHS_NM: np.ndarray = np.arange(420, 721, 10, dtype=float)
#: Half-width of each band, nm: a band integrates the spectrum over centre ± this.
BAND_HALF_WIDTH_NM: float = 5.0
#: Contract defaults of the HER2 rule (abundance units, pixels).
HER2_DEFAULTS: dict = {
    "t_faint": 20.0,
    "t_weak": 60.0,
    "t_strong": 150.0,
    "complete_fraction": 0.9,
    "sectors": 36,
    "membrane_width_px": 2,
    "ultralow_min_pct": 1.0,
}
#: Contract defaults of the surrogate-subtype section (passed to
#: :func:`qdquant.scoring.surrogate_subtype`).
SUBTYPE_DEFAULTS: dict = {"pr_cutoff_pct": 20.0, "ki67_cutoff_pct": 20.0}
#: Fractions of TUMOUR cells in HER2 classes (0, 1+, 2+, 3+) for each designed score.
HER2_MIX_PRESETS: dict[str, tuple[float, float, float, float]] = {
    "null": (1.0, 0.0, 0.0, 0.0),
    "0": (1.0, 0.0, 0.0, 0.0),
    "ultralow": (0.94, 0.06, 0.0, 0.0),
    "1+": (0.57, 0.37, 0.06, 0.0),
    "2+": (0.26, 0.40, 0.30, 0.04),
    "3+": (0.05, 0.20, 0.30, 0.45),
}
#: Autofluorescence endmember: NADH + riboflavin, mixed at these weights (each at peak 1).
AF_MIX: dict[str, float] = {"NADH": 0.6, "Riboflavin": 0.4}

_SOURCE_COLUMN = {
    "DAPI": "DAPI",
    "QD525": "Qdot 525",
    "QD565": "Qdot 565",
    "QD585": "Qdot 585",
    "QD605": "Qdot 605",
    "QD655": "Qdot 655",
    "QD705": "Qdot 705",
}
_IDX = {name: i for i, name in enumerate(ENDMEMBERS)}
_CELL_TYPES = ("tumour", "stroma", "immune")


# ----------------------------------------------------------------------------
# panel and spectra


def default_panel() -> pd.DataFrame:
    """The panel of the simulated slides (``config/panel.tsv`` of the test data).

    Returns
    -------
    pandas.DataFrame
        Columns ``endmember, marker, role, compartment, score, t1, t2, t3``;
        thresholds in abundance units, NaN where not used; ``compartment`` and
        ``score`` are empty strings where not used.
    """
    nan = np.nan
    rows = [
        ("DAPI", "DAPI", "nuclear_stain", "", "none", nan, nan, nan),
        ("QD525", "mTOR", "marker", "cytoplasm", "percent_positive", 30.0, nan, nan),
        ("QD565", "ER", "marker", "nucleus", "hscore", 30.0, 80.0, 160.0),
        ("QD585", "Ki67", "marker", "nucleus", "percent_positive", 30.0, nan, nan),
        ("QD605", "PR", "marker", "nucleus", "allred", 30.0, 80.0, 160.0),
        ("QD655", "HER2", "marker", "membrane", "her2", nan, nan, nan),
        ("QD705", "ECAD", "membrane_stain", "membrane", "none", nan, nan, nan),
        ("AF", "AF", "autofluorescence", "", "none", nan, nan, nan),
        ("Offset", "Offset", "background", "", "none", nan, nan, nan),
    ]
    return pd.DataFrame(
        rows, columns=["endmember", "marker", "role", "compartment", "score", "t1", "t2", "t3"]
    )


def reference_spectra(af_mix: dict[str, float] | None = None) -> pd.DataFrame:
    """The bundled FPbase emission spectra at 1 nm, plus the mixed ``AF`` column.

    ``af_mix``: weights of the tissue fluorophores (``NADH``, ``Riboflavin``)
    in ``AF``; default :data:`AF_MIX`.

    Returns
    -------
    pandas.DataFrame
        ``wavelength_nm`` (nm) then one column per non-flat endmember
        (``DAPI, QD525, ..., QD705, AF``), each at peak 1; 0 outside the
        measured range. See ``qdquant/data/SOURCE.md``.
    """
    src = resources.files("qdquant").joinpath("data/reference_emission_spectra.csv")
    with resources.as_file(src) as path:
        raw = pd.read_csv(path).fillna(0.0)
    out = pd.DataFrame({"wavelength_nm": raw["wavelength_nm"].to_numpy(float)})
    for name, col in _SOURCE_COLUMN.items():
        out[name] = raw[col].to_numpy(float) / raw[col].max()
    af = sum(w * raw[c].to_numpy(float) / raw[c].max() for c, w in (af_mix or AF_MIX).items())
    out["AF"] = af / af.max()
    return out


def _integrate_bands(wl: np.ndarray, values: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Mean of a 1-nm sampled spectrum over each band (centre ± half-width), trapezoid rule."""
    offsets = np.arange(-BAND_HALF_WIDTH_NM, BAND_HALF_WIDTH_NM + 0.5, 0.5)
    weights = np.ones_like(offsets)
    weights[[0, -1]] = 0.5
    samples = np.interp(centres[:, None] + offsets[None, :], wl, values, left=0.0, right=0.0)
    return samples @ weights / weights.sum()


def band_spectra(
    shift_nm: dict[str, float] | None = None,
    width_factor: dict[str, float] | None = None,
    wavelengths_nm: np.ndarray = BAND_WAVELENGTHS_NM,
    af_mix: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Endmember spectra on the camera's band grid, in the library's format.

    Parameters
    ----------
    shift_nm : dict, optional
        Per endmember, shift of the emission spectrum towards longer
        wavelengths, nm.
    width_factor : dict, optional
        Per endmember, stretch of the spectrum about its peak (1.02 = 2 %
        wider).
    wavelengths_nm : (C,) array
        Band centres, nm.
    af_mix : dict, optional
        Composition of ``AF`` (see :func:`reference_spectra`).

    Returns
    -------
    pandas.DataFrame
        ``wavelength_nm`` then the columns of :data:`ENDMEMBERS`; every
        non-flat column has peak 1, ``Offset`` is all ones.
    """
    shift_nm = shift_nm or {}
    width_factor = width_factor or {}
    ref = reference_spectra(af_mix)
    wl = ref["wavelength_nm"].to_numpy(float)
    centres = np.asarray(wavelengths_nm, dtype=float)
    out = pd.DataFrame({"wavelength_nm": centres})
    for name in ENDMEMBERS:
        if name == "Offset":
            out[name] = 1.0
            continue
        values = ref[name].to_numpy(float)
        peak = wl[np.argmax(values)]
        s, w = float(shift_nm.get(name, 0.0)), float(width_factor.get(name, 1.0))
        # the perturbed spectrum at wavelength x is the reference at peak + (x - s - peak) / w
        source_wl = peak + (wl - peak) * w + s
        bands = _integrate_bands(source_wl, values, centres)
        out[name] = bands / bands.max()
    return out


def _off_library_spectra(wavelengths_nm: np.ndarray) -> pd.DataFrame:
    """Broad autofluorescence spectra absent from the library (parametric proxies).

    ``RBC``: red-blood-cell autofluorescence, a broad band peaking near 580 nm
    with a red shoulder; ``lipofuscin``: the very broad 500–700 nm emission of
    lipofuscin granules (peak ~610 nm). Peak 1 on the band grid.
    """
    x = np.asarray(wavelengths_nm, dtype=float)
    rbc = np.exp(-0.5 * ((x - 580) / 38) ** 2) + 0.45 * np.exp(-0.5 * ((x - 660) / 30) ** 2)
    lipo = np.exp(-0.5 * ((x - 610) / 75) ** 2)
    return pd.DataFrame({"wavelength_nm": x, "RBC": rbc / rbc.max(), "lipofuscin": lipo / lipo.max()})


# ----------------------------------------------------------------------------
# the slide


@dataclass
class SimulatedSlide:
    """A simulated multispectral slide and its ground truth.

    Attributes
    ----------
    cube : (31, Y, X) ndarray of uint16
        Raw camera counts: offset + signal + noise.
    wavelengths_nm : (31,) ndarray
        Band centres, nm.
    library : pandas.DataFrame
        The spectral library a user would have (``config/spectra.csv``
        format: ``wavelength_nm`` + one column per endmember); it differs
        slightly from ``true_spectra``.
    true_spectra : pandas.DataFrame
        The spectra that generated the cube, same format.
    abundances : (9, Y, X) ndarray of float32
        True abundance maps in :data:`ENDMEMBERS` order (library units; blurred
        by the PSF, before shading).
    nuclei, cells : (Y, X) ndarray of int32
        True nucleus and cell labels; a cell and its nucleus share the id.
    cells_truth : pandas.DataFrame
        One row per cell (see :func:`simulate_slide`).
    truth : dict
        Sample-level truth (see :func:`sample_truth`) and the simulation
        parameters (JSON-serialisable).
    pixel_size_um : float
        Pixel size, µm.
    shading : (Y, X) ndarray of float32
        The multiplicative field-of-view shading applied to the signal (all
        ones without shading).
    off_library : (2, Y, X) ndarray of float32
        Abundance of the off-library autofluorescence (RBC, lipofuscin), in
        units of ``off_library_spectra``; zeros unless ``off_library_af``.
    off_library_spectra : pandas.DataFrame
        ``wavelength_nm``, ``RBC``, ``lipofuscin``.
    panel : pandas.DataFrame
        The panel (:func:`default_panel`).
    """

    cube: np.ndarray
    wavelengths_nm: np.ndarray
    library: pd.DataFrame
    true_spectra: pd.DataFrame
    abundances: np.ndarray
    nuclei: np.ndarray
    cells: np.ndarray
    cells_truth: pd.DataFrame
    truth: dict
    pixel_size_um: float
    shading: np.ndarray | None = None
    off_library: np.ndarray | None = None
    off_library_spectra: pd.DataFrame | None = None
    panel: pd.DataFrame = field(default_factory=default_panel)

    @property
    def endmembers(self) -> list[str]:
        """Endmember names, in ``abundances`` order."""
        return list(ENDMEMBERS)

    def abundance(self, endmember: str) -> np.ndarray:
        """The (Y, X) true abundance map of one endmember."""
        return self.abundances[_IDX[endmember]]


# ----------------------------------------------------------------------------
# per-cell measurements: the contract's rules live in the core package
# (qdquant.segmentation, qdquant.quantification, qdquant.scoring); the
# simulator only calls them


def _centroids(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel count, row and column centroid of labels 0..n (NaN where empty)."""
    flat = labels.ravel()
    yy, xx = np.indices(labels.shape)
    count = np.bincount(flat, minlength=n + 1).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, weights=yy.ravel(), minlength=n + 1) / count
        cx = np.bincount(flat, weights=xx.ravel(), minlength=n + 1) / count
    return count, cy, cx


def _label_means(image: np.ndarray, labels: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Mean of ``image`` over each label's pixels inside ``mask`` (NaN where none); index = id."""
    ids = labels[mask]
    total = np.bincount(ids, weights=image[mask].astype(float), minlength=n + 1)
    count = np.bincount(ids, minlength=n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _her2_cells(her2: np.ndarray, cells: np.ndarray, n: int, cy: np.ndarray, cx: np.ndarray):
    """The contract's per-cell HER2 rule on the labels 1..n, as arrays indexed by id.

    Sector sums from :func:`qdquant.quantification.membrane_sectors` (around
    the centroids ``cy``, ``cx``), scored by
    :func:`qdquant.scoring.her2_cell_scores` with :data:`HER2_DEFAULTS`.

    Returns
    -------
    intensity, completeness : (n + 1,) float64
    her2_class : (n + 1,) object (str)
        Index 0 (background) and ids without pixels read 0, 0, "0".
    """
    ids = np.arange(1, n + 1)
    sums, npx = membrane_sectors(
        cells, np.asarray(her2), ids, np.column_stack([cy[ids], cx[ids]]),
        HER2_DEFAULTS["membrane_width_px"], sectors=HER2_DEFAULTS["sectors"],
    )
    inten, comp, cls = her2_cell_scores(sums, npx, **_rule_kw())
    return (
        np.concatenate([[0.0], inten]),
        np.concatenate([[0.0], comp]),
        np.concatenate([np.array(["0"], dtype=object), cls]),
    )


def her2_ring_scores(
    her2: np.ndarray,
    cells: np.ndarray,
    *,
    membrane_width_px: float = 2,
    sectors: int = 36,
    t_faint: float = 20.0,
    t_weak: float = 60.0,
    t_strong: float = 150.0,
    complete_fraction: float = 0.9,
) -> pd.DataFrame:
    """The contract's per-cell HER2 rule applied to an abundance map and cell labels.

    A thin wrapper: sector sums from
    :func:`qdquant.quantification.membrane_sectors` around each cell's
    centroid, scored by :func:`qdquant.scoring.her2_cell_scores`. Used to
    verify the simulator's truth (on the true abundance and the TRUE cells).

    Parameters
    ----------
    her2 : (Y, X) ndarray
        HER2 abundance (library units).
    cells : (Y, X) ndarray of int
        Cell labels, 0 = background.
    membrane_width_px, sectors, t_faint, t_weak, t_strong, complete_fraction
        The contract's ``segmentation.membrane_width_px`` (pixels) and ``her2``
        settings (abundance units; completeness as a fraction).

    Returns
    -------
    pandas.DataFrame
        One row per cell present: ``CellID``, ``her2_membrane_intensity``
        (abundance units), ``her2_completeness`` (0–1), ``her2_class``.
    """
    cells = np.asarray(cells).astype(np.int64)
    n = int(cells.max(initial=0))
    count, cy, cx = _centroids(cells, n)
    present = np.nonzero(count[1:] > 0)[0] + 1
    sums, npx = membrane_sectors(
        cells, np.asarray(her2, dtype=float), present, np.column_stack([cy[present], cx[present]]),
        membrane_width_px, sectors=sectors,
    )
    intensity, completeness, her2_class = her2_cell_scores(
        sums, npx, t_faint=t_faint, t_weak=t_weak, t_strong=t_strong,
        complete_fraction=complete_fraction,
    )
    return pd.DataFrame(
        {
            "CellID": present,
            "her2_membrane_intensity": intensity,
            "her2_completeness": completeness,
            "her2_class": her2_class,
        }
    )


# ----------------------------------------------------------------------------
# sample-level truth (the contract's rules applied to the designed classes)


#: cells_truth column holding each scored marker's designed bin (0..3; -1 not evaluable).
_MARKER_BIN_COLUMN = {"ER": "er_bin", "PR": "pr_bin", "Ki67": "ki67_bin", "mTOR": "mtor_bin"}


def sample_truth(cells_truth: pd.DataFrame, panel: pd.DataFrame | None = None) -> dict:
    """Sample-level scores from per-cell truth classes, by the contract's rules.

    Computed twice: over all cells (keys suffixed ``_all``) and over the
    tumour cells (``cell_type == "tumour"``, suffix ``_tumour``). The rules
    are those of :mod:`qdquant.scoring` (:func:`~qdquant.scoring.her2_sample_score`,
    :func:`~qdquant.scoring.marker_sample_scores`,
    :func:`~qdquant.scoring.receptor_status`,
    :func:`~qdquant.scoring.surrogate_subtype`), applied to the designed
    classes: a cell's designed bin b (0..3) is scored as the value b against
    thresholds 1, 2, 3, which puts it back in bin b.

    Parameters
    ----------
    cells_truth : pandas.DataFrame
        Needs ``cell_type``, ``her2_class`` and the bin columns ``er_bin``,
        ``pr_bin``, ``ki67_bin``, ``mtor_bin`` (0..3; a negative bin marks a
        cell that is not evaluable, left out of the denominators) of the
        panel's scored markers.
    panel : pandas.DataFrame, optional
        Default :func:`default_panel`.

    Returns
    -------
    dict
        ``n_cells``, ``n_tumour_cells``, ``n_stroma_cells``,
        ``n_immune_cells`` and, per scope: ``n_cells_{scope}``,
        ``her2_score``, ``her2_category``, ``her2_pct_0/1plus/2plus/3plus``
        (percent), ``{marker}_pct_positive`` and ``{marker}_status`` for every
        marker scored hscore/allred/percent_positive, ``{marker}_hscore``
        (0–300) or ``{marker}_allred`` (0–8) as scored, and
        ``surrogate_subtype``. A scope without cells gets the core's "not
        assessable" values (NaN percentages and scores, ``her2_score`` None).
    """
    panel = default_panel() if panel is None else panel
    out: dict = {
        "n_cells": int(len(cells_truth)),
        "n_tumour_cells": int((cells_truth["cell_type"] == "tumour").sum()),
        "n_stroma_cells": int((cells_truth["cell_type"] == "stroma").sum()),
        "n_immune_cells": int((cells_truth["cell_type"] == "immune").sum()),
    }
    scored = panel[panel["score"].isin(["hscore", "allred", "percent_positive"])]
    for scope in ("all", "tumour"):
        ct = cells_truth if scope == "all" else cells_truth[cells_truth["cell_type"] == "tumour"]
        res = {"n_cells": int(len(ct))}
        her2 = her2_sample_score(
            ct["her2_class"].to_numpy(object), ultralow_min_pct=HER2_DEFAULTS["ultralow_min_pct"]
        )
        for k in ("her2_score", "her2_category", "her2_pct_0", "her2_pct_1plus",
                  "her2_pct_2plus", "her2_pct_3plus"):
            res[k] = her2[k]
        pct_pos = {}
        for _, row in scored.iterrows():
            marker = row["marker"]
            col = _MARKER_BIN_COLUMN.get(marker)
            if col is None or col not in ct:
                continue
            bins = ct[col].to_numpy(float)
            bins[bins < 0] = np.nan  # not evaluable
            scores = marker_sample_scores(bins, score=row["score"], t1=1, t2=2, t3=3, marker=marker)
            pos = scores[f"{marker}_pct_positive"]
            pct_pos[marker] = pos
            res[f"{marker}_pct_positive"] = pos
            res[f"{marker}_status"] = receptor_status(pos)
            if row["score"] in ("hscore", "allred"):
                res[f"{marker}_{row['score']}"] = scores[f"{marker}_{row['score']}"]
        if "ER" in pct_pos and "PR" in pct_pos:
            res["surrogate_subtype"] = surrogate_subtype(
                res["her2_score"], pct_pos["ER"], pct_pos["PR"], pct_pos.get("Ki67"),
                **SUBTYPE_DEFAULTS,
            )
        out.update({f"{k}_{scope}": v for k, v in res.items()})
    return out


# ----------------------------------------------------------------------------
# geometry helpers


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, zero mean and unit standard deviation (float32).

    Wide filters (sigma >= 8 px) are computed on a coarser grid and
    interpolated back (the field is smooth there anyway), which is much
    faster.
    """
    factor = int(sigma // 4) if sigma >= 8 else 1
    if factor > 1:
        small = tuple(-(-s // factor) + 2 for s in shape)
        f = ndi.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma / factor)
        f = ndi.zoom(f, factor, order=1)[: shape[0], : shape[1]]
    else:
        f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (f - f.mean()) / max(float(f.std()), 1e-12)


def _abundance_stack(shape, offset_counts: float, **maps: np.ndarray) -> np.ndarray:
    """(K, Y, X) float32 abundances in ENDMEMBERS order: the given maps (>= 0), 0 elsewhere, the offset flat."""
    abund = np.zeros((len(ENDMEMBERS),) + tuple(shape), np.float32)
    for name, image in maps.items():
        abund[_IDX[name]] = image
    abund[_IDX["Offset"]] = offset_counts
    return np.maximum(abund, 0.0, out=abund)


def _autofluorescence(rng: np.random.Generator, stroma: np.ndarray, px_per_um: float) -> np.ndarray:
    """Tissue autofluorescence abundance: smooth, ~10-40 units, stronger in stroma."""
    stroma_w = ndi.gaussian_filter(stroma.astype(np.float32), 6 * px_per_um)
    n01 = 1.0 / (1.0 + np.exp(-_smooth_noise(rng, stroma.shape, 10 * px_per_um)))
    return (10.0 + 24.0 * stroma_w * (0.6 + 0.4 * n01) + 6.0 * n01).astype(np.float32)


def _poisson_disc(rng: np.random.Generator, points: np.ndarray, radius: float) -> np.ndarray:
    """A maximal subset of ``points`` no two closer than ``radius`` (Luby's parallel MIS).

    Points win by random priority, so the result is a random packing
    (deterministic given ``rng``), vectorised over rounds.
    """
    n = len(points)
    if n == 0:
        return points
    pairs = cKDTree(points).query_pairs(radius, output_type="ndarray")
    prio = rng.random(n)
    state = np.zeros(n, dtype=np.int8)  # 0 undecided, 1 kept, -1 dropped
    while (state == 0).any():
        und = state == 0
        p = pairs[und[pairs[:, 0]] & und[pairs[:, 1]]]
        best = np.full(n, -1.0)
        np.maximum.at(best, p[:, 0], prio[p[:, 1]])
        np.maximum.at(best, p[:, 1], prio[p[:, 0]])
        win = und & (prio > best)
        state[win] = 1
        state[np.concatenate([p[win[p[:, 0]], 1], p[win[p[:, 1]], 0]])] = -1
    return points[state == 1]


def _candidates(rng, mask: np.ndarray, pitch: float) -> np.ndarray:
    """Jittered-grid sub-pixel positions (y, x) inside a boolean mask, one per ``pitch``² cell."""
    pitch = max(float(pitch), 1.0)
    gy = np.arange(0.0, mask.shape[0], pitch)
    gx = np.arange(0.0, mask.shape[1], pitch)
    pts = np.stack(np.meshgrid(gy, gx, indexing="ij"), axis=-1).reshape(-1, 2)
    pts = pts + rng.uniform(0.0, pitch, pts.shape)
    pts = pts[(pts[:, 0] <= mask.shape[0] - 1) & (pts[:, 1] <= mask.shape[1] - 1)]
    keep = mask[np.rint(pts[:, 0]).astype(int), np.rint(pts[:, 1]).astype(int)]
    return pts[keep]


def _pairs_within(labels: np.ndarray, radius: float) -> np.ndarray:
    """Unique unordered pairs (i < j) of different nonzero labels within ``radius`` pixels."""
    r = int(np.ceil(radius))
    m, n = labels.shape
    codes = []
    for dy in range(0, r + 1):
        for dx in range(-r, r + 1):
            if (dy == 0 and dx <= 0) or dy * dy + dx * dx > radius * radius:
                continue
            a = labels[0 : m - dy, max(0, -dx) : n - max(0, dx)]
            b = labels[dy:m, max(0, dx) : n - max(0, -dx)]
            sel = (a > 0) & (b > 0) & (a != b)
            lo = np.minimum(a[sel], b[sel]).astype(np.int64)
            hi = np.maximum(a[sel], b[sel]).astype(np.int64)
            codes.append(lo * (1 << 32) + hi)
    if not codes:
        return np.zeros((0, 2), dtype=np.int64)
    u = np.unique(np.concatenate(codes))
    return np.column_stack([u >> 32, u & ((1 << 32) - 1)])


def _exact_counts(fractions, n: int) -> np.ndarray:
    """Integer counts summing to ``n`` closest to ``fractions * n`` (largest remainder)."""
    f = np.asarray(fractions, dtype=float)
    f = f / f.sum()
    raw = f * n
    counts = np.floor(raw).astype(int)
    rest = n - counts.sum()
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


def _shading_map(shape, amount: float, fov_px: int) -> np.ndarray:
    """Per-field-of-view vignetting: 1 at each FOV centre, 1 - amount at its corners."""
    yy, xx = np.indices(shape, dtype=np.float32)
    c = (fov_px - 1) / 2.0
    r2 = ((yy % fov_px - c) ** 2 + (xx % fov_px - c) ** 2) / (2 * c * c)
    return (1.0 - amount * r2).astype(np.float32)


# ----------------------------------------------------------------------------
# rendering helpers


def _render_cells(
    target: np.ndarray,
    draw_labels: np.ndarray,
    pattern: np.ndarray,
    measure,
    sigma: float,
    *,
    iterations: int = 3,
    min_target: float = 1e-9,
    amp_min: np.ndarray | float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Blurred per-cell stain whose per-cell measurement matches ``target``.

    The stain is ``amp[label] * pattern`` on the pixels of ``draw_labels``,
    blurred by a Gaussian of ``sigma`` pixels; ``amp`` starts at ``target``
    and is rescaled by target / measured a few times (the map is linear in
    ``amp``, and a cell's measurement depends mostly on its own amplitude).

    Returns
    -------
    image : (Y, X) float32
    amp : (n + 1,) float
    """
    amp = np.asarray(target, dtype=float).copy()
    calibrate = amp > min_target
    image = None
    for it in range(iterations + 1):
        image = ndi.gaussian_filter((amp[draw_labels] * pattern).astype(np.float32), sigma)
        if it == iterations:
            break
        measured = measure(image)
        ok = calibrate & np.isfinite(measured) & (measured > 0)
        amp[ok] *= np.clip(target[ok] / measured[ok], 0.5, 2.0)
        amp = np.where(calibrate, np.maximum(amp, amp_min), amp)
    return image, amp


def _render_cube(
    rng: np.random.Generator,
    abundances: np.ndarray,
    spectra: np.ndarray,
    *,
    shading: np.ndarray,
    extra: np.ndarray | None,
    extra_spectra: np.ndarray | None,
    photons_per_count: float,
    read_noise: float,
    offset_counts: float,
) -> np.ndarray:
    """Camera counts, band by band: offset + shot noise(shading · signal) + read noise.

    ``abundances`` (K, Y, X) without the offset endmember; ``spectra`` (C, K).
    Shot noise: electrons are drawn exactly from a Poisson law where the
    expected count λ is below :data:`_POISSON_EXACT_BELOW` electrons, and from
    its normal approximation N(λ, λ) above (indistinguishable there once the
    read noise is added, and several times faster). Counts = electrons /
    photons_per_count + offset + N(0, read_noise²), rounded and clipped to
    uint16.
    """
    n_bands = spectra.shape[0]
    shape = abundances.shape[1:]
    cube = np.empty((n_bands,) + shape, dtype=np.uint16)
    signal_all = np.asarray(spectra, dtype=np.float32) @ abundances.reshape(abundances.shape[0], -1)
    if extra is not None:
        signal_all += np.asarray(extra_spectra, dtype=np.float32) @ extra.reshape(extra.shape[0], -1)
    shading = np.asarray(shading, dtype=np.float32).ravel()
    ppc = np.float32(photons_per_count)
    read_e = np.float32(read_noise * photons_per_count)  # read noise in electrons
    read_e2 = read_e * read_e
    for c in range(n_bands):
        lam = np.maximum(signal_all[c] * shading, 0.0) * ppc
        z = rng.standard_normal(lam.shape, dtype=np.float32)
        # bright pixels: shot and read noise together, one normal draw (variances add)
        counts = (lam + np.sqrt(lam + read_e2) * z) / ppc
        low = np.nonzero(lam < _POISSON_EXACT_BELOW)[0]
        counts[low] = (rng.poisson(lam[low].astype(np.float64)) + read_e * z[low]) / ppc
        counts += np.float32(offset_counts)
        cube[c] = np.clip(np.rint(counts), 0, 65535).astype(np.uint16).reshape(shape)
    return cube


#: Expected photo-electrons below which shot noise is drawn exactly (Poisson).
_POISSON_EXACT_BELOW = 12.0


def _spectral_perturbation(rng: np.random.Generator, drift_nm: float):
    """Per-endmember shift (nm) and width factor of the generating spectra vs the library."""
    shifts, widths = {}, {}
    for name in ENDMEMBERS:
        if name == "Offset":
            continue
        base = rng.uniform(0.5, 1.0)
        drift = drift_nm * rng.uniform(0.5, 1.0)
        shifts[name] = float(rng.choice([-1.0, 1.0]) * max(base, drift))
        widths[name] = float(rng.uniform(0.97, 1.03))
    return shifts, widths


# ----------------------------------------------------------------------------
# simulate_slide


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise InputError(msg)


def _build_tissue(rng, shape, um, *, crowded, nest_fraction, stroma_fraction, immune_fraction):
    """Nests, nuclei and cells of a synthetic breast carcinoma field.

    Returns
    -------
    nuclei, cells : (Y, X) int32
        Labels 1..n (a cell and its nucleus share the id).
    ctype : (n,) int8
        0 tumour, 1 stroma (fibroblast), 2 immune, for ids 1..n.
    nest : (Y, X) bool
        Tumour nests.
    inner : (Y, X) bool
        The image minus an 11 µm frame.
    """
    yy, xx = np.indices(shape)
    field_big = _smooth_noise(rng, shape, 12 * um)
    field_small = _smooth_noise(rng, shape, 3 * um)
    nest_field = field_big + 0.25 * field_small
    nest = nest_field > np.quantile(nest_field, 1 - nest_fraction)
    nest = ndi.binary_opening(nest, iterations=2)
    d_in = ndi.distance_transform_edt(nest)
    d_out = ndi.distance_transform_edt(~nest)
    margin = 11 * um
    inner = np.zeros(shape, bool)
    inner[int(margin) : shape[0] - int(margin), int(margin) : shape[1] - int(margin)] = True

    spacing = (7.2 if crowded else 10.0) * um
    t_pts = _poisson_disc(rng, _candidates(rng, nest & inner & (d_in >= 1.5 * um), spacing / 4),
                          spacing)
    n_t = len(t_pts)
    n_s = int(round(n_t * stroma_fraction / (1 - stroma_fraction)))
    s_region = (~nest) & inner & (d_out >= 8 * um)
    s_pts = _poisson_disc(rng, _candidates(rng, s_region, 13 * um / 3), 13 * um)
    s_pts = s_pts[rng.permutation(len(s_pts))[:n_s]]
    n_i = int(round(len(s_pts) * immune_fraction))
    pts = np.concatenate([t_pts, s_pts]) if len(s_pts) else t_pts
    ctype = np.array([0] * n_t + [2] * n_i + [1] * (len(s_pts) - n_i), dtype=np.int8)  # 0 t, 1 s, 2 i
    # one centre per pixel (matters only for very coarse pixels)
    _, first = np.unique(np.rint(pts).astype(np.int64) @ np.array([shape[1], 1]), return_index=True)
    first = np.sort(first)
    pts, ctype = pts[first], ctype[first]
    n0 = len(pts)

    # nucleus ellipses (semi-axes in pixels, orientation in radians)
    r_eq = np.where(ctype == 0, np.clip(rng.normal(4.0, 0.45, n0), 3.2, 5.0),
                    rng.uniform(2.6, 3.2, n0)) * um
    q = np.where(ctype == 0, rng.uniform(0.72, 0.95, n0), rng.uniform(0.85, 1.0, n0))
    a = r_eq / np.sqrt(q)
    b = r_eq * np.sqrt(q)
    fib = ctype == 1
    a[fib] = rng.uniform(5.0, 7.0, fib.sum()) * um
    b[fib] = rng.uniform(1.4, 2.0, fib.sum()) * um
    theta = rng.uniform(0, np.pi, n0)
    gy, gx = np.gradient(ndi.gaussian_filter(nest_field, 4 * um))
    py, px = np.clip(np.rint(pts[:, 0]).astype(int), 0, shape[0] - 1), np.clip(
        np.rint(pts[:, 1]).astype(int), 0, shape[1] - 1)
    tangent = np.arctan2(gy[py, px], gx[py, px]) + np.pi / 2
    theta[fib] = tangent[fib] + rng.normal(0, 0.25, fib.sum())
    max_exp = np.select(
        [ctype == 0, ctype == 1],
        [rng.uniform(1.0, 2.0, n0) if crowded else rng.uniform(3.5, 5.0, n0),
         rng.uniform(1.0, 1.5, n0)],
        rng.uniform(0.5, 1.0, n0),
    ) * um

    # rasterise nuclei: Voronoi of the centres, inside each (noisy-edged) ellipse
    seeds = np.zeros(shape, np.int32)
    seeds[py, px] = np.arange(1, n0 + 1)
    _, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    near = seeds[iy, ix] - 1
    dy, dx = yy - pts[near, 0], xx - pts[near, 1]
    ct, st = np.cos(theta[near]), np.sin(theta[near])
    u = (dx * ct + dy * st) / a[near]
    v = (-dx * st + dy * ct) / b[near]
    rough = 1.0 + 0.07 * _smooth_noise(rng, shape, 1.5)
    nuclei = np.where(u * u + v * v <= rough * rough, near + 1, 0).astype(np.int32)

    # grow cells from their nucleus, limited per cell
    ext = np.concatenate([[0.0], max_exp])
    is_t = np.concatenate([[False], ctype == 0])
    dist, (iy, ix) = ndi.distance_transform_edt(nuclei == 0, return_indices=True)
    grown = nuclei[iy, ix]
    cells = np.where(dist <= ext[grown], grown, 0).astype(np.int32)
    outside_nest = (d_out > 1.5 * um) & (nuclei == 0)
    cells[is_t[cells] & outside_nest] = 0
    d_tum = ndi.distance_transform_edt(~is_t[cells])
    cells[(cells > 0) & ~is_t[cells] & (d_tum <= 1.5 * um) & (nuclei == 0)] = 0

    # keep cells away from the image border and with a real nucleus; relabel 1..n
    border = np.unique(np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]]))
    nuc_area = np.bincount(nuclei.ravel(), minlength=n0 + 1)
    keep = nuc_area >= np.where(is_t, 20 * um * um / 4, 8 * um * um / 4)
    keep[border] = False
    keep[0] = False
    new_id = np.zeros(n0 + 1, np.int32)
    new_id[keep] = np.arange(1, keep.sum() + 1)
    cells = new_id[cells]
    nuclei = new_id[nuclei]
    kept = np.nonzero(keep[1:])[0]
    ctype = ctype[kept]
    n = len(kept)
    _check(n > 0, "shape: too small to hold any cell")

    return nuclei, cells, ctype, nest, inner


def simulate_slide(
    *,
    her2_score: str = "2+",
    shape: tuple[int, int] = (512, 512),
    seed: int = 0,
    pixel_size_um: float = 0.5,
    er_pct: float = 70.0,
    pr_pct: float = 45.0,
    ki67_pct: float = 15.0,
    mtor_pct: float = 50.0,
    stroma_fraction: float = 0.125,
    immune_fraction: float = 0.4,
    photons_per_count: float = 4.0,
    read_noise: float = 2.5,
    offset_counts: float = 100.0,
    drift_nm: float = 0.0,
    shading: float = 0.0,
    off_library_af: bool = False,
    lipofuscin_in_cells: bool = False,
    crowded: bool = False,
    her2_mix: tuple[float, float, float, float] | None = None,
    her2_incomplete_fraction: float = 0.4,
    her2_levels: str = "separated",
    receptor_split: tuple[float, float, float] = (0.25, 0.35, 0.40),
    nest_fraction: float = 0.6,
    psf_sigma_px: float = 0.8,
    fov_px: int = 256,
    af_mix: dict[str, float] | None = None,
    unstained: bool = False,
    exact_library: bool = False,
) -> SimulatedSlide:
    """Simulate a multispectral QD-stained breast carcinoma slide with ground truth.

    Parameters
    ----------
    her2_score : {"0", "null", "ultralow", "1+", "2+", "3+"}
        Designed sample HER2 score; picks the mix of tumour-cell classes from
        :data:`HER2_MIX_PRESETS` ("0" = "null"; "ultralow" is a 0 with 6 % of
        tumour cells at 1+). Ignored for the mix when ``her2_mix`` is given.
    shape : (int, int)
        Image size (Y, X), pixels.
    seed : int
        Seed of ``numpy.random.default_rng``; the same arguments give the
        same slide, bit for bit.
    pixel_size_um : float
        Pixel size, µm. Tissue sizes are in µm, so the pixel size scales them.
    er_pct, pr_pct, ki67_pct, mtor_pct : float
        Percent of TUMOUR cells positive (>= t1) for ER, PR, Ki67, mTOR.
        ER/PR positives are split over bins 1+/2+/3+ by ``receptor_split``.
    stroma_fraction : float
        Fraction of all cells that are not tumour cells (fibroblasts + immune).
    immune_fraction : float
        Fraction of those non-tumour cells that are immune cells.
    photons_per_count : float
        Photo-electrons per camera count (>= 1.5 supported); lower is noisier.
    read_noise : float
        Gaussian read noise, counts (standard deviation).
    offset_counts : float
        Camera dark offset, counts (the ``Offset`` abundance).
    drift_nm : float
        Extra spectral drift of the generating spectra vs the library, nm
        (0–10; each endmember moves by 0.5·d–d nm, random sign).
    shading : float
        Field-of-view vignetting: corners of each ``fov_px`` tile are this
        much darker (0–0.9); multiplies the signal, not the offset.
    off_library_af : bool
        Add bright autofluorescent discs in stroma (red blood cells,
        lipofuscin granules) whose spectra are not in the library.
    lipofuscin_in_cells : bool
        With ``off_library_af``, put the lipofuscin granules in the cytoplasm
        of tumour cells (where lipofuscin accumulates), close to or on their
        membrane ring, instead of in stroma: the case residual masking is for.
    crowded : bool
        Packed nests: touching nuclei, 1–2 µm of cytoplasm.
    her2_mix : 4 floats, optional
        Fractions of tumour cells at HER2 0, 1+, 2+, 3+.
    her2_incomplete_fraction : float
        Share of the 2+ tumour cells designed as strong but incomplete
        (intensity 250–320 on 40–60 % of the ring); the others are moderate
        and complete (85–115). Only 2+ cells whose tumour neighbours are all
        2+/3+ qualify, so fewer may be drawn (truth key
        ``n_her2_strong_incomplete_2plus``).
    her2_levels : {"separated", "continuous"}
        Where in its class's intensity bin a cell's designed HER2 lies.
        "separated": well inside (1+ 30–42, moderate 2+ 85–115, 3+ 230–300;
        a 25 % loss of light moves no cell across a threshold).
        "continuous": across the bin, as on real slides (1+ 23–55, moderate
        2+ 66–140, 3+ 165–300): shading, noise and unmixing errors then move
        the cells near a threshold.
    receptor_split : 3 floats
        Shares of ER/PR-positive cells in bins 1+, 2+, 3+.
    nest_fraction : float
        Fraction of the image covered by tumour nests.
    psf_sigma_px : float
        Gaussian PSF, pixels.
    fov_px : int
        Edge of a camera field of view, pixels (shading tiles).
    af_mix : dict, optional
        Composition of the tissue autofluorescence that generates the cube
        (weights of ``NADH`` and ``Riboflavin``); the library keeps the
        default :data:`AF_MIX`, so a different mix is an autofluorescence the
        library misdescribes.
    unstained : bool
        An unstained control section: the same tissue, autofluorescence
        (and off-library objects) only, no stain (no DAPI, no QD). It is a
        control image; its truth tables are not meaningful.
    exact_library : bool
        Generate the cube with exactly the library's spectra (no lot-to-lot
        spread, no drift; needs ``drift_nm=0`` and no ``af_mix``).

    Returns
    -------
    SimulatedSlide
        ``cells_truth`` columns: ``CellID``, ``X_centroid``, ``Y_centroid``
        (pixels), ``X_um``, ``Y_um``, ``Area``, ``NucleusArea`` (pixels),
        ``cell_type`` (tumour/stroma/immune), ``is_tumour``, ``her2_class``
        ('0', '1+', '2+', '3+'), ``her2_intensity`` and ``her2_completeness``
        (designed values of the contract's her2_membrane_intensity and
        her2_completeness; 0 for class 0), ``her2_pattern`` (none, faint,
        complete, incomplete), ``her2_ring_level`` (designed mean HER2 over
        the drawn ring), ``her2_membrane_intensity_true``,
        ``her2_completeness_true``, ``her2_class_true`` (the contract's rule on
        the true abundance over the true cells), ``er_bin``, ``pr_bin``,
        ``ki67_bin``, ``mtor_bin`` (0..3), ``ki67_positive``,
        ``mtor_positive``, ``er_intensity``, ``pr_intensity``,
        ``ki67_intensity`` (designed nuclear means), ``mtor_intensity``
        (designed cytoplasmic mean), ``ecad`` (designed E-cadherin ring
        mean), ``dapi`` (nuclear DAPI level); abundance units.

    Notes
    -----
    Designed per-cell levels (abundance units, as measured on the true masks
    after the PSF): HER2 0 → faint ring 0–2.5 (no sector reaches t_faint),
    1+ → 30–42, 2+ → 85–115 complete or 250–320 on 40–60 % of the ring,
    3+ → 230–300 complete (``her2_levels="separated"``; see
    :data:`HER2_LEVELS`); ER/PR nuclear means by bin: negative 0–8, 1+
    45–65, 2+ 105–135, 3+ 220–300 (thresholds 30/80/160); Ki67 positive
    60–150, negative 0–6; mTOR cytoplasm positive 60–110, negative 0–6;
    E-cadherin ring 70–150 on tumour cells; DAPI 120–260 per nucleus (x1.1
    fibroblasts, x1.4 immune cells) with chromatin texture. Stromal and
    immune cells carry no marker (0). The HER2 classes of touching tumour
    cells differ by at most one class, and a strong-incomplete 2+ cell only
    touches 2+/3+ cells, with its missing arc facing away from the brightest
    neighbours: through the PSF, brighter neighbours would otherwise make a
    cell read a class higher. ``cells_truth`` records both the designed
    class and the class the contract's rule measures on the true abundance
    and true cells (they agree for >= 98 % of cells, typically all).
    Stromal and immune cells, and some tumour cells of ``crowded`` nests,
    have no cytoplasm in the contract's sense (all their non-nuclear pixels
    are membrane ring); such cells are mTOR-negative by design.
    """
    width = HER2_DEFAULTS["membrane_width_px"]
    key = str(her2_score)
    _check(key in HER2_MIX_PRESETS or her2_mix is not None,
           f"her2_score: unknown value {her2_score!r} (one of {sorted(HER2_MIX_PRESETS)})")
    mix = np.asarray(her2_mix if her2_mix is not None else HER2_MIX_PRESETS[key], dtype=float)
    _check(mix.shape == (4,) and (mix >= 0).all() and mix.sum() > 0,
           "her2_mix: expected 4 non-negative fractions (0, 1+, 2+, 3+)")
    _check(len(shape) == 2 and min(shape) >= 64, f"shape: expected (Y, X) >= 64, got {shape}")
    _check(pixel_size_um > 0, "pixel_size_um: must be > 0")
    _check(photons_per_count > 0, "photons_per_count: must be > 0")
    _check(read_noise >= 0, "read_noise: must be >= 0")
    _check(0 <= drift_nm <= 10, "drift_nm: must be in [0, 10]")
    _check(0 <= shading < 0.9, "shading: must be in [0, 0.9)")
    _check(her2_levels in HER2_LEVELS, f"her2_levels: one of {sorted(HER2_LEVELS)}, got {her2_levels!r}")
    _check(0 <= stroma_fraction < 1, "stroma_fraction: must be in [0, 1)")
    _check(0 <= immune_fraction <= 1, "immune_fraction: must be in [0, 1]")
    for name, v in (("er_pct", er_pct), ("pr_pct", pr_pct), ("ki67_pct", ki67_pct),
                    ("mtor_pct", mtor_pct)):
        _check(0 <= v <= 100, f"{name}: must be a percentage in [0, 100]")
    _check(0.05 <= nest_fraction <= 0.9, "nest_fraction: must be in [0.05, 0.9]")

    rng = np.random.default_rng(seed)
    shape = (int(shape[0]), int(shape[1]))
    um = 1.0 / pixel_size_um  # pixels per µm
    yy, xx = np.indices(shape)

    # --- tissue: nests and stroma ------------------------------------------
    nuclei, cells, ctype, nest, inner = _build_tissue(
        rng, shape, um, crowded=crowded, nest_fraction=nest_fraction,
        stroma_fraction=stroma_fraction, immune_fraction=immune_fraction,
    )
    n = len(ctype)

    area, cy, cx = _centroids(cells, n)
    nuc_area = np.bincount(nuclei.ravel(), minlength=n + 1)
    nucleus_m, ring_m, cyto_m = compartments(cells, nuclei, width)
    tum_ids = np.nonzero(ctype == 0)[0] + 1
    n_t = len(tum_ids)

    # --- HER2 design ---------------------------------------------------------
    her2_field = _smooth_noise(rng, shape, 18 * um)
    rank_val = _values_at(her2_field, cy[tum_ids], cx[tum_ids]) + 0.05 * rng.standard_normal(n_t)
    counts = _exact_counts(mix, n_t)
    cls = np.zeros(n + 1, np.int8)  # class index 0..3 per cell id (0 for non-tumour)
    cls[tum_ids[np.argsort(rank_val, kind="stable")]] = np.repeat(np.arange(4), counts)
    pairs = _pairs_within(cells, width + 0.5)
    is_tum = np.concatenate([[False], ctype == 0])
    _repair_level_jumps(cls, pairs, is_tum, _values_at(her2_field, cy, cx))
    her2 = _design_her2(
        rng, cls, pairs, is_tum, cells, ring_m, cy, cx, yy, xx,
        incomplete_fraction=her2_incomplete_fraction, psf_sigma_px=psf_sigma_px,
        levels=HER2_LEVELS[her2_levels],
    )
    her2_img = her2["image"]
    ring_ids = np.where(ring_m, cells, 0)

    # --- nuclear and cytoplasmic markers ------------------------------------
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

    af_img = _autofluorescence(rng, ~nest, um)

    abund = _abundance_stack(shape, offset_counts, DAPI=dapi_img, QD525=mtor_img, QD565=er_img, QD585=ki_img,
                             QD605=pr_img, QD655=her2_img, QD705=ecad_img, AF=af_img)
    if unstained:  # autofluorescence and camera offset only
        abund[[i for i, e in enumerate(ENDMEMBERS) if e not in ("AF", "Offset")]] = 0.0

    # --- off-library autofluorescence ---------------------------------------
    off = np.zeros((2,) + shape, np.float32)
    off_spec = _off_library_spectra(BAND_WAVELENGTHS_NM)
    off_info = {"n_rbc": 0, "n_lipofuscin": 0}
    if off_library_af:
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
        off_info = {"n_rbc": int(n_rbc), "n_lipofuscin": int(len(cand) - n_rbc)}

    # --- spectra and camera --------------------------------------------------
    library = band_spectra()
    shifts, widths = _spectral_perturbation(rng, drift_nm)
    if exact_library:
        _check(drift_nm == 0 and af_mix is None, "exact_library: needs drift_nm=0 and no af_mix")
        shifts, widths = {k: 0.0 for k in shifts}, {k: 1.0 for k in widths}
    true_spectra = band_spectra(shifts, widths, af_mix=af_mix)
    shade = _shading_map(shape, shading, fov_px) if shading > 0 else np.ones(shape, np.float32)
    non_offset = [i for i, e in enumerate(ENDMEMBERS) if e != "Offset"]
    cube = _render_cube(
        rng,
        abund[non_offset],
        true_spectra[[ENDMEMBERS[i] for i in non_offset]].to_numpy(float),
        shading=shade,
        extra=off if off_library_af else None,
        extra_spectra=off_spec[["RBC", "lipofuscin"]].to_numpy(float),
        photons_per_count=photons_per_count,
        read_noise=read_noise,
        offset_counts=offset_counts,
    )

    # --- truth tables --------------------------------------------------------
    inten_t, comp_t, cls_t = _her2_cells(abund[_IDX["QD655"]], cells, n, cy, cx)
    ids = np.arange(1, n + 1)
    cells_truth = pd.DataFrame(
        {
            "CellID": ids,
            "X_centroid": cx[ids],
            "Y_centroid": cy[ids],
            "X_um": cx[ids] * pixel_size_um,
            "Y_um": cy[ids] * pixel_size_um,
            "Area": area[ids].astype(int),
            "NucleusArea": nuc_area[ids].astype(int),
            "cell_type": np.array(_CELL_TYPES, dtype=object)[ctype],
            "is_tumour": ctype == 0,
            "her2_class": np.array(HER2_CLASSES, dtype=object)[cls[ids]],
            "her2_intensity": her2["intensity"][ids],
            "her2_completeness": her2["completeness"][ids],
            "her2_pattern": her2["pattern"][ids].astype(str),
            "her2_ring_level": her2["ring_level"][ids],
            "her2_membrane_intensity_true": inten_t[ids],
            "her2_completeness_true": comp_t[ids],
            "her2_class_true": cls_t[ids],
            "er_bin": er_bin[ids].astype(int),
            "pr_bin": pr_bin[ids].astype(int),
            "ki67_bin": ki67_bin[ids].astype(int),
            "mtor_bin": mtor_bin[ids].astype(int),
            "ki67_positive": ki67_bin[ids] > 0,
            "mtor_positive": mtor_bin[ids] > 0,
            "er_intensity": er_t[ids],
            "pr_intensity": pr_t[ids],
            "ki67_intensity": ki67_t[ids],
            "mtor_intensity": mtor_t[ids],
            "ecad": ecad_t[ids],
            "dapi": dapi_lvl[ids],
        }
    )
    truth = sample_truth(cells_truth)
    truth.update(
        {
            "n_her2_strong_incomplete_2plus": int(
                ((cells_truth["her2_class"] == "2+") & (cells_truth["her2_pattern"] == "incomplete")).sum()
            ),
            "design_her2_score": key,
            "her2_mix_tumour": [float(x) for x in mix / mix.sum()],
            "her2_class_agreement_true_masks": float(
                np.mean(cells_truth["her2_class"] == cells_truth["her2_class_true"])
            ),
            "spectral_shift_nm": shifts,
            "spectral_width_factor": widths,
            "shading": float(shading),
            "shading_fov_px": int(fov_px),
            "shading_model": "signal x (1 - shading * r^2), r = distance from the FOV centre "
                             "normalised to 1 at its corners; offset not shaded",
            "off_library_af": bool(off_library_af), "lipofuscin_in_cells": bool(lipofuscin_in_cells),
            **off_info,
            "params": {
                "her2_score": key, "shape": list(shape), "seed": int(seed),
                "pixel_size_um": float(pixel_size_um), "er_pct": float(er_pct),
                "pr_pct": float(pr_pct), "ki67_pct": float(ki67_pct),
                "mtor_pct": float(mtor_pct), "stroma_fraction": float(stroma_fraction),
                "immune_fraction": float(immune_fraction),
                "photons_per_count": float(photons_per_count), "read_noise": float(read_noise),
                "offset_counts": float(offset_counts), "drift_nm": float(drift_nm),
                "shading": float(shading), "off_library_af": bool(off_library_af),
                "lipofuscin_in_cells": bool(lipofuscin_in_cells), "crowded": bool(crowded), "her2_incomplete_fraction": float(her2_incomplete_fraction),
                "her2_levels": her2_levels,
                "receptor_split": [float(x) for x in split], "nest_fraction": float(nest_fraction),
                "psf_sigma_px": float(psf_sigma_px), "fov_px": int(fov_px),
                "af_mix": dict(af_mix or AF_MIX), "unstained": bool(unstained),
                "exact_library": bool(exact_library),
            },
            "her2_thresholds": {k: HER2_DEFAULTS[k] for k in HER2_DEFAULTS},
            "pixel_size_um": float(pixel_size_um),
            "endmembers": list(ENDMEMBERS),
        }
    )
    truth = _jsonable(truth)
    return SimulatedSlide(
        cube=cube,
        wavelengths_nm=BAND_WAVELENGTHS_NM.copy(),
        library=library,
        true_spectra=true_spectra,
        abundances=abund,
        nuclei=nuclei.astype(np.int32),
        cells=cells.astype(np.int32),
        cells_truth=cells_truth,
        truth=truth,
        pixel_size_um=float(pixel_size_um),
        shading=shade,
        off_library=off,
        off_library_spectra=off_spec,
    )


def _rule_kw() -> dict:
    return {k: HER2_DEFAULTS[k] for k in ("t_faint", "t_weak", "t_strong", "complete_fraction")}


def _values_at(img: np.ndarray, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    y = np.clip(np.rint(np.nan_to_num(cy)).astype(int), 0, img.shape[0] - 1)
    x = np.clip(np.rint(np.nan_to_num(cx)).astype(int), 0, img.shape[1] - 1)
    return img[y, x]


def _neighbour_lists(pairs: np.ndarray, n: int):
    """CSR-like neighbour lists of labels 0..n from unordered pairs."""
    both = np.concatenate([pairs, pairs[:, ::-1]]) if len(pairs) else np.zeros((0, 2), np.int64)
    order = np.argsort(both[:, 0], kind="stable")
    both = both[order]
    start = np.searchsorted(both[:, 0], np.arange(n + 2))
    return both[:, 1], start


def _repair_level_jumps(cls, pairs, is_tumour, field_value, max_steps: int = 2000) -> None:
    """Swap HER2 classes so that touching tumour cells differ by at most one class.

    A 0 cell touching a 2+/3+ cell (or a 1+ touching a 3+) would read
    stained through the PSF blur of its neighbour's membrane. For each such
    contact, either the lower cell moves up one class while a cell of that
    class elsewhere moves down, or the upper cell moves down while one
    elsewhere moves up; a swap is kept only when it lowers the number of
    jumps, so the class counts never change and the loop ends.
    """
    if len(pairs) == 0:
        return
    n = len(cls) - 1
    tp = pairs[is_tumour[pairs[:, 0]] & is_tumour[pairs[:, 1]]]
    if len(tp) == 0:
        return
    nb, start = _neighbour_lists(tp, n)

    def jumps(c):
        return int((np.abs(c[tp[:, 0]].astype(int) - c[tp[:, 1]]) >= 2).sum())

    def local_ok(c, cell, new):
        ns = nb[start[cell] : start[cell + 1]]
        return bool(np.all(np.abs(c[ns].astype(int) - new) <= 1))

    total = jumps(cls)
    tried = set()
    for _ in range(max_steps):
        if total == 0:
            return
        viol = tp[np.abs(cls[tp[:, 0]].astype(int) - cls[tp[:, 1]]) >= 2]
        viol = [tuple(v) for v in viol if tuple(v) not in tried]
        if not viol:
            return
        a, b = viol[0]
        lo, hi = (a, b) if cls[a] < cls[b] else (b, a)
        improved = False
        for mover, step in ((lo, 1), (hi, -1)):
            old = int(cls[mover])
            new = old + step
            # partners: cells of class `new` that can take class `old` without a jump
            cand = np.nonzero((cls == new) & is_tumour)[0]
            cand = cand[cand != mover]
            if len(cand) == 0:
                continue
            # prefer partners far along the clustering field (deep in their class zone)
            cand = cand[np.argsort(field_value[cand] * (1 if step > 0 else -1), kind="stable")]
            for c in cand[:40]:
                if not local_ok(cls, c, old):
                    continue
                trial = cls.copy()
                trial[mover], trial[c] = new, old
                t = jumps(trial)
                if t < total:
                    cls[:] = trial
                    total = t
                    improved = True
                    break
            if improved:
                break
        if not improved:
            tried.add((a, b))


#: Designed HER2 stained-sector intensity of each class (abundance units; t_faint 20,
#: t_weak 60, t_strong 150): well inside each bin, or across it as on real slides.
HER2_LEVELS = {
    "separated": {"1+": (30.0, 42.0), "2+": (85.0, 115.0), "3+": (230.0, 300.0)},
    "continuous": {"1+": (23.0, 55.0), "2+": (66.0, 140.0), "3+": (165.0, 300.0)},
}


def _design_her2(
    rng, cls, pairs, is_tum, cells, ring_m, cy, cx, yy, xx, *, incomplete_fraction, psf_sigma_px,
    levels=None,
) -> dict:
    """Design and render the HER2 membrane of every cell from its class.

    Class 0 tumour cells get a faint ring (0–2.5 units, below t_faint), 1+ a
    ring measuring 30–42 (60 % complete, the rest 60–85 % of the ring), 2+
    either moderate and complete (85–115) or, for up to
    ``incomplete_fraction`` of them, strong (250–320) on 40–60 % of the ring,
    the missing arc facing away from bright neighbours (only 2+ cells whose
    tumour neighbours are all 2+/3+ qualify), 3+ strong and complete
    (230–300); ``levels`` (one of :data:`HER2_LEVELS`, default "separated",
    whose ranges these are) sets the 1+, moderate 2+ and 3+ ranges. The
    drawn amplitude of each cell is calibrated so that the
    contract's stained-sector intensity measured on the blurred image over
    the true cell lands on its target.

    Returns
    -------
    dict
        ``image`` (Y, X) float32 HER2 abundance; per-cell arrays (index = id)
        ``intensity``, ``completeness`` (designed values of the contract's
        measurements; 0 for class 0), ``pattern`` and ``ring_level`` (mean
        drawn HER2 over the ring, before blur).
    """
    n = len(cls) - 1
    shape = cells.shape
    target = np.zeros(n + 1)
    compl = np.zeros(n + 1)
    faint = np.zeros(n + 1)
    pattern = np.full(n + 1, "none", dtype=object)
    ids = np.arange(n + 1)
    i0 = ids[(cls == 0) & is_tum]
    faint[i0] = rng.uniform(0.0, 2.5, len(i0))
    pattern[i0] = "faint"
    i1 = ids[cls == 1]
    levels = levels or HER2_LEVELS["separated"]
    target[i1] = rng.uniform(*levels["1+"], len(i1))
    compl[i1] = np.where(rng.random(len(i1)) < 0.6, 1.0, rng.uniform(0.6, 0.85, len(i1)))
    i3 = ids[cls == 3]
    target[i3] = rng.uniform(*levels["3+"], len(i3))
    compl[i3] = 1.0
    i2 = ids[cls == 2]
    # strong-incomplete 2+: only cells whose tumour neighbours are all 2+/3+, preferring
    # those with most background around them (their missing arc can face it)
    low_nb = np.zeros(n + 1, int)
    np.add.at(low_nb, pairs[:, 0], (cls[pairs[:, 1]] <= 1) & is_tum[pairs[:, 1]])
    np.add.at(low_nb, pairs[:, 1], (cls[pairs[:, 0]] <= 1) & is_tum[pairs[:, 0]])
    d_bg = ndi.distance_transform_edt(cells > 0)
    bg_frac = _label_means((d_bg <= 3).astype(float), cells, ring_m, n)
    eligible = i2[low_nb[i2] == 0]
    n_inc = min(int(round(incomplete_fraction * len(i2))), len(eligible))
    order = eligible[np.lexsort((rng.random(len(eligible)), -np.nan_to_num(bg_frac[eligible])))]
    inc = np.zeros(n + 1, bool)
    inc[order[:n_inc]] = True
    mod = i2[~inc[i2]]
    target[mod] = rng.uniform(*levels["2+"], len(mod))
    compl[mod] = 1.0
    i2i = ids[inc]
    target[i2i] = rng.uniform(250.0, 320.0, len(i2i))
    compl[i2i] = rng.uniform(0.4, 0.6, len(i2i))
    pattern[cls >= 1] = np.where(compl[cls >= 1] >= 1.0, "complete", "incomplete")

    # the missing arc of each cell faces away from its HER2-bright neighbours
    wgt = target.copy()
    vy = np.zeros(n + 1)
    vx = np.zeros(n + 1)
    for s_, t_ in ((0, 1), (1, 0)):
        i, j = pairs[:, s_], pairs[:, t_]
        ddy, ddx = cy[j] - cy[i], cx[j] - cx[i]
        norm = np.maximum(np.hypot(ddy, ddx), 1e-9)
        np.add.at(vy, i, wgt[j] * ddy / norm)
        np.add.at(vx, i, wgt[j] * ddx / norm)
    rand_dir = rng.uniform(0, 2 * np.pi, n + 1)
    arc_dir = np.where(np.hypot(vy, vx) > 1e-6, np.arctan2(-vy, -vx), rand_dir)

    texture = np.clip(1.0 + 0.18 * _smooth_noise(rng, shape, 1.0), 0.5, 1.5)
    ring_ids = np.where(ring_m, cells, 0)
    ang = np.arctan2(yy - cy[cells], xx - cx[cells])
    in_gap = np.abs(np.angle(np.exp(1j * (ang - arc_dir[cells])))) < (1.0 - compl[cells]) * np.pi
    faint_img = ndi.gaussian_filter((faint[ring_ids] * texture * ring_m).astype(np.float32),
                                    psf_sigma_px)
    want = np.array(HER2_CLASSES, dtype=object)[cls]

    def measure(img):
        return _her2_cells(img + faint_img, cells, n, cy, cx)[0]

    # 1+ cells keep enough of their own ring stained (>= ~25 after blur)
    amp_min = np.where(cls == 1, 25.0 / 0.75, 0.0)
    rounds = 4
    for round_ in range(rounds):
        pattern_px = np.where(ring_m & ~((compl[cells] < 1.0) & in_gap), texture, 0.0)
        img, amp = _render_cells(target, ring_ids, pattern_px, measure, psf_sigma_px,
                                 iterations=4, amp_min=amp_min)
        img = img + faint_img
        meas = _her2_cells(img, cells, n, cy, cx)[2]
        bad = inc & (meas != want)
        if not bad.any() or round_ == rounds - 1:
            break
        # a strong-incomplete 2+ that does not read 2+ becomes a moderate complete 2+
        inc[bad] = False
        target[bad] = rng.uniform(*levels["2+"], bad.sum())
        compl[bad] = 1.0
        pattern[bad] = "complete"
    drawn = np.where(ring_m, amp[cells] * pattern_px + faint[cells] * texture, 0.0)
    ring_level = _label_means(drawn, cells, ring_m, n)
    return {
        "image": img.astype(np.float32),
        "intensity": np.where(cls >= 1, target, 0.0),
        "completeness": np.where(cls >= 1, compl, 0.0),
        "pattern": pattern,
        "ring_level": ring_level,
    }


# ----------------------------------------------------------------------------
# writing


def write_slide(slide: SimulatedSlide, directory: str | os.PathLike, name: str) -> dict[str, Path]:
    """Write a simulated slide and its truth.

    Files (atomically):

    - ``{name}.ome.tif``: the (31, Y, X) uint16 cube (channel names like
      ``"420nm"``, PhysicalSizeX = ``pixel_size_um``);
    - ``{name}_truth_cells.csv``: ``cells_truth``;
    - ``{name}_truth_labels.tif``: int32 (2, Y, X): nuclei, cells;
    - ``{name}_truth.json``: the ``truth`` dict;
    - ``{name}_library.csv``: the spectral library (``config/spectra.csv``
      format);
    - ``{name}_true_spectra.csv``: the generating spectra.

    Returns
    -------
    dict
        ``image``, ``cells``, ``labels``, ``truth``, ``library``,
        ``true_spectra`` → path.
    """
    from qdquant.io import atomic_path, write_csv, write_ome_tiff

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "image": directory / f"{name}.ome.tif",
        "cells": directory / f"{name}_truth_cells.csv",
        "labels": directory / f"{name}_truth_labels.tif",
        "truth": directory / f"{name}_truth.json",
        "library": directory / f"{name}_library.csv",
        "true_spectra": directory / f"{name}_true_spectra.csv",
    }
    write_ome_tiff(
        paths["image"],
        slide.cube,
        pixel_size_um=slide.pixel_size_um,
        channel_names=[f"{w:g}nm" for w in slide.wavelengths_nm],
    )
    write_csv(slide.cells_truth, paths["cells"])
    with atomic_path(paths["labels"]) as tmp:
        tifffile.imwrite(
            tmp, np.stack([slide.nuclei, slide.cells]).astype(np.int32),
            compression="zlib", metadata={"axes": "CYX", "Channel": {"Name": ["nuclei", "cells"]}},
        )
    with atomic_path(paths["truth"]) as tmp:
        Path(tmp).write_text(json.dumps(_jsonable(slide.truth), indent=2))
    write_csv(slide.library, paths["library"])
    write_csv(slide.true_spectra, paths["true_spectra"])
    return paths


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


# ----------------------------------------------------------------------------
# the bundled test cohort


def test_cohort() -> dict[str, dict]:
    """Sample id → :func:`simulate_slide` keyword arguments of the bundled test data.

    Five 512² slides, one per HER2 reading (null, ultralow, 1+, 2+, 3+), and
    one harder 2+ slide (crowded nests, 3 nm spectral drift, 20 % shading,
    off-library autofluorescence, 2 electrons per count). Every sample-level
    truth is well away from the contract's 10 % (and 1 %) boundaries, over all
    cells and over tumour cells. Each has a fixed seed.
    """
    return {
        "her2_null": dict(her2_score="null", seed=101, er_pct=0.0, pr_pct=0.0,
                          ki67_pct=45.0, mtor_pct=30.0),
        "her2_ultralow": dict(her2_score="ultralow", seed=102, er_pct=85.0, pr_pct=55.0,
                              ki67_pct=8.0, mtor_pct=50.0),
        "her2_1plus": dict(her2_score="1+", seed=103, er_pct=70.0, pr_pct=5.0,
                           ki67_pct=30.0, mtor_pct=60.0),
        "her2_2plus": dict(her2_score="2+", seed=104, er_pct=60.0, pr_pct=45.0,
                           ki67_pct=30.0, mtor_pct=40.0),
        "her2_3plus": dict(her2_score="3+", seed=105, er_pct=0.0, pr_pct=0.0,
                           ki67_pct=40.0, mtor_pct=70.0),
        "her2_2plus_hard": dict(her2_score="2+", seed=106, er_pct=80.0, pr_pct=45.0,
                                ki67_pct=35.0, mtor_pct=50.0, crowded=True, drift_nm=3.0,
                                shading=0.2, off_library_af=True, photons_per_count=2.0),
    }


test_cohort.__test__ = False  # not a pytest test, despite its name


#: The four real-slide phenomena of :func:`messy_cohort`, each at the top of its documented range.
MESSY = dict(crowded=True, drift_nm=4.0, shading=0.25, off_library_af=True, photons_per_count=1.5)


def messy_cohort(size: int = 512, fov_px: int = 256) -> dict[str, dict]:
    """Sample id → :func:`simulate_slide` keyword arguments of a messy cohort.

    One ``size``² slide per HER2 reading (null, ultralow, 1+, 2+, 3+), every
    one with all four real-slide phenomena (:data:`MESSY`): crowded nests
    with touching nuclei, 4 nm of spectral drift, 25 % darker corners of
    ``fov_px`` fields of view, off-library autofluorescence (red blood cells
    in stroma, lipofuscin granules in tumour cells' cytoplasm) and 1.5
    electrons per count, with HER2 intensities spread across each class's
    bin (``her2_levels="continuous"``), so that a cell near a threshold
    moves when its light is misjudged. Receptor designs as in
    :func:`test_cohort`; seeds of their own. Shading can be estimated from about 8 x 8 FOVs of 256 px
    (``size=2048``); a 512² slide holds too few.
    """
    cohort = {}
    for i, (name, kwargs) in enumerate(list(test_cohort().items())[:5]):
        cohort[f"messy_{name.removeprefix('her2_')}"] = {
            **kwargs, **MESSY, "lipofuscin_in_cells": True, "her2_levels": "continuous",
            "shape": (size, size), "fov_px": fov_px,
            "seed": 301 + i,
        }
    return cohort


def write_cohort(
    directory: str | os.PathLike, cohort: dict[str, dict] | None = None
) -> dict[str, dict[str, Path]]:
    """Simulate and write every slide of a cohort, plus one table of their truths.

    Parameters
    ----------
    directory : path-like
        Output folder.
    cohort : dict, optional
        Sample id → :func:`simulate_slide` keyword arguments; default
        :func:`test_cohort`.

    Returns
    -------
    dict
        Sample id → the paths of :func:`write_slide`; key ``"_cohort"`` →
        ``{"truth": cohort_truth.csv}`` (one row per sample: ``sample_id``,
        ``pixel_size_um`` and every scalar truth value).
    """
    from qdquant.io import write_csv

    cohort = test_cohort() if cohort is None else cohort
    directory = Path(directory)
    out: dict[str, dict[str, Path]] = {}
    rows = []
    for sample_id, kwargs in cohort.items():
        slide = simulate_slide(**kwargs)
        out[sample_id] = write_slide(slide, directory, sample_id)
        row = {"sample_id": sample_id}
        row.update({k: v for k, v in slide.truth.items() if not isinstance(v, (dict, list))})
        rows.append(row)
    path = directory / "cohort_truth.csv"
    write_csv(pd.DataFrame(rows), path)
    out["_cohort"] = {"truth": path}
    return out


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
    with the core package's implementation of the contract's rules: HER2
    from the membrane ring sectors
    (:func:`qdquant.quantification.membrane_sectors`,
    :func:`qdquant.scoring.her2_cell_scores`), ER/Ki67 bins from the nuclear
    mean (:func:`qdquant.quantification.measure_cells`,
    :func:`qdquant.scoring.intensity_bins`); tumour cells are those whose
    E-cadherin ring mean passes the contract's ``tumour: threshold: auto``
    gate (:func:`qdquant.scoring.tumour_threshold_auto`,
    :func:`qdquant.scoring.is_tumour`; the threshold is recorded as
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
    _check(photons_per_count > 0, "photons_per_count: must be > 0")
    _check(0 <= drift_nm <= 10, "drift_nm: must be in [0, 10]")
    _check(0 <= shading < 0.9, "shading: must be in [0, 0.9)")
    if crop is not None:
        y0, y1, x0, x1 = (int(v) for v in crop)
        mask = mask[y0:y1, x0:x1]
        chans = {c: v[y0:y1, x0:x1] for c, v in chans.items()}
        _check(min(mask.shape) >= 32, f"crop: region {crop} is too small")
    rng = np.random.default_rng(seed)
    zoom = mibi_pixel_size_um / pixel_size_um

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
    n = int(cells.max())
    _check(n > 0, f"{mibi_dir}: the Mesmer mask holds no cell in this region")

    # nuclei: HH3-bright part of each cell, else the cell's core
    from skimage.filters import threshold_otsu

    hh3 = sm["HH3"]
    inside = cells > 0
    thr = threshold_otsu(hh3[inside]) if np.ptp(hh3[inside]) > 0 else np.inf
    nuclei = np.where(ndi.binary_opening(ndi.binary_fill_holes(hh3 >= thr)) & inside, cells, 0)
    depth = ndi.distance_transform_edt(membrane_ring(cells, 1.0) | ~inside)
    depth = np.where(inside, depth, 0)
    max_depth = ndi.maximum(depth, cells, np.arange(n + 1))
    nuc_area = np.bincount(nuclei.ravel(), minlength=n + 1)
    core = inside & (depth >= 0.5 * max_depth[cells]) & (nuc_area[cells] < 10)
    nuclei = np.where(core, cells, nuclei).astype(np.int32)
    nuc_area = np.bincount(nuclei.ravel(), minlength=n + 1)

    width = HER2_DEFAULTS["membrane_width_px"]
    nucleus_m, ring_m, cyto_m = compartments(cells, nuclei, width)

    def blur(img):
        return ndi.gaussian_filter(img.astype(np.float32), psf_sigma_px)

    def scale_to(img, mask_, value, q):
        ref = float(np.percentile(img[mask_], q)) if mask_.any() else 0.0
        return img * (value / ref) if ref > 0 else img

    dapi = blur(scale_to(hh3, nucleus_m, 180.0, 50))
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
    um = 1.0 / pixel_size_um
    af = _autofluorescence(rng, ~inside, um)

    abund = _abundance_stack(shape, offset_counts, DAPI=dapi, QD565=er, QD585=ki67, QD655=her2, QD705=ecad, AF=af)

    library = band_spectra()
    shifts, widths = _spectral_perturbation(rng, drift_nm)
    true_spectra = band_spectra(shifts, widths)
    shade = _shading_map(shape, shading, fov_px) if shading > 0 else np.ones(shape, np.float32)
    non_offset = [i for i, e in enumerate(ENDMEMBERS) if e != "Offset"]
    cube = _render_cube(
        rng, abund[non_offset], true_spectra[[ENDMEMBERS[i] for i in non_offset]].to_numpy(float),
        shading=shade, extra=None, extra_spectra=None, photons_per_count=photons_per_count,
        read_noise=read_noise, offset_counts=offset_counts,
    )

    # truth: the contract's rules on the true abundance over the true cells
    area, cy, cx = _centroids(cells, n)
    inten, comp, her2_cls = _her2_cells(abund[_IDX["QD655"]], cells, n, cy, cx)
    measured = measure_cells(
        cells, nuclei, abund[[_IDX["QD705"], _IDX["QD565"], _IDX["QD585"]]], ["ECAD", "ER", "Ki67"],
        width,
    )

    def per_id(column):
        out = np.full(n + 1, np.nan)
        out[measured["CellID"].to_numpy()] = measured[column].to_numpy()
        return out

    ecad_ring = per_id("ECAD_membrane_mean")
    tumour_thr = tumour_threshold_auto(ecad_ring[1:])
    cd45 = _label_means(sm["CD45"], cells, inside, n)
    cd45_med = float(np.nanmedian(cd45[1:]))
    immune_thr = cd45_med + 3.0 * 1.4826 * float(np.nanmedian(np.abs(cd45[1:] - cd45_med)))
    tumour_cell = is_tumour(ecad_ring, tumour_thr)
    ctype = np.where(tumour_cell, "tumour", np.where(cd45 >= immune_thr, "immune", "stroma"))
    panel = default_panel().set_index("marker")

    def nuc_bins(marker):
        m = per_id(f"{marker}_nucleus_mean")
        t1, t2, t3 = (float(v) if np.isfinite(v) else None
                      for v in panel.loc[marker, ["t1", "t2", "t3"]].astype(float))
        return m, intensity_bins(m, t1=t1, t2=t2, t3=t3)

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
    truth = sample_truth(cells_truth)
    truth.update(
        {
            "nest_fraction": float(nest.mean()),
            "source": "ark-analysis example MIBI-TOF fov8 (Keren et al. 2018), Mesmer whole-cell mask",
            "truth_rule": "contract rules measured on the true abundance over the true cells",
            "tumour_threshold_ecad": float(tumour_thr),
            "immune_threshold_cd45_counts": float(immune_thr),
            "spectral_shift_nm": shifts,
            "spectral_width_factor": widths,
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
            "her2_thresholds": dict(HER2_DEFAULTS),
            "pixel_size_um": float(pixel_size_um),
            "endmembers": list(ENDMEMBERS),
        }
    )
    truth = _jsonable(truth)
    return SimulatedSlide(
        cube=cube,
        wavelengths_nm=BAND_WAVELENGTHS_NM.copy(),
        library=library,
        true_spectra=true_spectra,
        abundances=abund,
        nuclei=nuclei,
        cells=cells,
        cells_truth=cells_truth,
        truth=truth,
        pixel_size_um=float(pixel_size_um),
        shading=shade,
        off_library=np.zeros((2,) + shape, np.float32),
        off_library_spectra=_off_library_spectra(BAND_WAVELENGTHS_NM),
    )


# ----------------------------------------------------------------------------
# whole slides, tile by tile


def simulate_wholeslide(
    size: int,
    *,
    seed: int = 0,
    tile: int = 512,
    n_unique: int = 4,
    photons_per_count: float = 4.0,
    read_noise: float = 2.5,
    offset_counts: float = 100.0,
):
    """A (31, size, size) uint16 dask cube of tissue, made tile by tile.

    For benchmarks of whole-slide scale: ``n_unique`` tissue tiles are
    simulated once (:func:`simulate_slide`, HER2 scores cycling through
    0/1+/2+/3+), then every ``tile``² block of the slide is one of them,
    flipped or transposed at random, with its own camera noise. Cells are cut
    at tile seams; there is no per-cell truth. Memory: the base tiles' noise-free
    abundances plus one block per dask worker.

    Parameters
    ----------
    size : int
        Slide edge, pixels.
    seed : int
        Everything is deterministic given the seed.
    tile : int
        Block edge, pixels (also the dask chunk edge).
    n_unique : int
        Distinct tissue tiles.
    photons_per_count, read_noise, offset_counts : float
        Camera model, as in :func:`simulate_slide`.

    Returns
    -------
    cube : (31, size, size) dask array of uint16
    """
    import dask.array as da

    scores = ("0", "1+", "2+", "3+")
    bases = []
    spectra = None
    for i in range(n_unique):
        s = simulate_slide(her2_score=scores[i % 4], shape=(tile, tile), seed=seed * 1000 + i)
        signal = [k for k, name in enumerate(ENDMEMBERS) if name != "Offset"]
        bases.append(s.abundances[signal].astype(np.float32))
        spectra = s.true_spectra[[ENDMEMBERS[k] for k in signal]].to_numpy(np.float32)

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"][1:]
        rng = np.random.default_rng([seed, y0 // tile, x0 // tile])
        base = bases[rng.integers(n_unique)]
        if rng.random() < 0.5:
            base = base[:, ::-1]
        if rng.random() < 0.5:
            base = base[:, :, ::-1]
        if rng.random() < 0.5:
            base = base.transpose(0, 2, 1)
        base = np.ascontiguousarray(base[:, : y1 - y0, : x1 - x0])
        return _render_cube(
            rng, base, spectra, shading=np.ones(base.shape[1:], np.float32), extra=None, extra_spectra=None,
            photons_per_count=photons_per_count, read_noise=read_noise, offset_counts=offset_counts,
        )

    chunks = ((len(BAND_WAVELENGTHS_NM),), *(tuple(min(tile, size - o) for o in range(0, size, tile)),) * 2)
    return da.map_blocks(block, chunks=chunks, dtype=np.uint16, meta=np.empty((0, 0, 0), np.uint16))
