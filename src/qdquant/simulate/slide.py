"""A simulated slide: the :class:`SimulatedSlide` record, :func:`simulate_slide` and writing.

Designed per-cell levels (abundance units, as measured on the true masks
after the PSF): HER2 0 → faint ring 0–2.5 (no sector reaches t_faint),
1+ → 30–42, 2+ → 85–115 complete or 250–320 on 40–60 % of the ring,
3+ → 230–300 complete (``her2_levels="separated"``; see
:data:`~qdquant.simulate.her2_design.HER2_LEVELS`); ER/PR nuclear means by
bin: negative 0–8, 1+ 45–65, 2+ 105–135, 3+ 220–300 (thresholds 30/80/160);
Ki67 positive 60–150, negative 0–6; mTOR cytoplasm positive 60–110, negative
0–6; E-cadherin ring 70–150 on tumour cells; DAPI 120–260 per nucleus (x1.1
fibroblasts, x1.4 immune cells) with chromatin texture. Stromal and immune
cells carry no marker (0). The HER2 classes of touching tumour cells differ
by at most one class, and a strong-incomplete 2+ cell only touches 2+/3+
cells, with its missing arc facing away from the brightest neighbours:
through the PSF, brighter neighbours would otherwise make a cell read a
class higher. ``cells_truth`` records both the designed class and the class
the contract's rule measures on the true abundance and true cells (they
agree for >= 98 % of cells, typically all). Stromal and immune cells, and
some tumour cells of ``crowded`` nests, have no cytoplasm in the contract's
sense (all their non-nuclear pixels are membrane ring); such cells are
mTOR-negative by design.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from qdquant.simulate.her2_design import (
    HER2_LEVELS,
    HER2_MIX_PRESETS,
    _design_her2,
    _repair_level_jumps,
    _values_at,
)
from qdquant.simulate.reference import HER2_CLASSES, compartments
from qdquant.simulate.rendering import _camera, _check_camera_args
from qdquant.simulate.stains import _design_markers, _off_library_discs
from qdquant.simulate.spectra import (
    AF_MIX,
    BAND_WAVELENGTHS_NM,
    ENDMEMBERS,
    _IDX,
    _off_library_spectra,
    default_panel,
)
from qdquant.simulate.tissue import (
    _abundance_stack,
    _autofluorescence,
    _build_tissue,
    _check,
    _exact_counts,
    _pairs_within,
    _smooth_noise,
)
from qdquant.simulate.truth import (
    HER2_DEFAULTS,
    _centroids,
    _her2_cells,
    _her2_geometry,
    sample_truth,
)


_CELL_TYPES = ("tumour", "stroma", "immune")

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
        One row per cell: ``CellID``, ``X_centroid``, ``Y_centroid``
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
        mean), ``dapi`` (nuclear DAPI level); abundance units. (A
        semi-synthetic slide, :func:`~qdquant.simulate.mibi.simulate_mibi`,
        has its own.)
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
        The cube, the spectra and the ground truth (per cell:
        :attr:`SimulatedSlide.cells_truth`; the designed levels are in this
        module's description).
    """
    key = str(her2_score)
    _check_slide_args(locals())
    mix = np.asarray(her2_mix if her2_mix is not None else HER2_MIX_PRESETS[key], dtype=float)
    rng = np.random.default_rng(seed)
    shape = (int(shape[0]), int(shape[1]))
    um = 1.0 / pixel_size_um  # pixels per µm

    nuclei, cells, ctype, nest, inner = _build_tissue(
        rng, shape, um, crowded=crowded, nest_fraction=nest_fraction,
        stroma_fraction=stroma_fraction, immune_fraction=immune_fraction,
    )
    width = HER2_DEFAULTS["membrane_width_px"]
    masks = compartments(cells, nuclei, width)  # nucleus, membrane ring, cytoplasm
    cls, her2 = _design_her2_classes(rng, cells, ctype, masks[1], mix, um=um, width=width,
                                     incomplete_fraction=her2_incomplete_fraction, psf_sigma_px=psf_sigma_px,
                                     levels=HER2_LEVELS[her2_levels])
    mk = _design_markers(
        rng, cells, nuclei, ctype, masks, um=um, psf_sigma_px=psf_sigma_px,
        pcts=(er_pct, pr_pct, ki67_pct, mtor_pct), receptor_split=receptor_split,
    )
    af_img = _autofluorescence(rng, ~nest, um)
    abund = _abundance_stack(
        shape, offset_counts, DAPI=mk["dapi_img"], QD525=mk["mtor_img"], QD565=mk["er_img"],
        QD585=mk["ki_img"], QD605=mk["pr_img"], QD655=her2["image"], QD705=mk["ecad_img"], AF=af_img,
    )
    if unstained:  # autofluorescence and camera offset only
        abund[[i for i, e in enumerate(ENDMEMBERS) if e not in ("AF", "Offset")]] = 0.0
    off, off_info = np.zeros((2,) + shape, np.float32), {"n_rbc": 0, "n_lipofuscin": 0}
    if off_library_af:
        off, off_info = _off_library_discs(
            rng, cells, nuclei, ctype, nest, inner, um=um, psf_sigma_px=psf_sigma_px,
            lipofuscin_in_cells=lipofuscin_in_cells,
        )
    camera = _camera(rng, abund, drift_nm=drift_nm, shading=shading, fov_px=fov_px,
                     photons_per_count=photons_per_count, read_noise=read_noise, offset_counts=offset_counts,
                     af_mix=af_mix, exact=exact_library, extra=off if off_library_af else None)
    cells_truth = _cells_truth_table(cells, nuclei, ctype, cls, her2, mk, abund[_IDX["QD655"]], pixel_size_um)
    truth = _slide_truth(cells_truth, mix, camera, off_info, _slide_params(locals()))
    return _slide_record(camera, truth, abund, nuclei.astype(np.int32), cells.astype(np.int32), cells_truth,
                         pixel_size_um, off)


def _check_slide_args(args: dict) -> None:
    """InputError for any of :func:`simulate_slide`'s arguments (``args``: its locals) out of range."""
    her2_score, her2_mix, shape = args["her2_score"], args["her2_mix"], args["shape"]
    _check(str(her2_score) in HER2_MIX_PRESETS or her2_mix is not None,
           f"her2_score: unknown value {her2_score!r} (one of {sorted(HER2_MIX_PRESETS)})")
    mix = np.asarray(her2_mix if her2_mix is not None else HER2_MIX_PRESETS[str(her2_score)], dtype=float)
    _check(mix.shape == (4,) and (mix >= 0).all() and mix.sum() > 0,
           "her2_mix: expected 4 non-negative fractions (0, 1+, 2+, 3+)")
    _check(len(shape) == 2 and min(shape) >= 64, f"shape: expected (Y, X) >= 64, got {shape}")
    _check(args["pixel_size_um"] > 0, "pixel_size_um: must be > 0")
    _check_camera_args(args)
    _check(args["her2_levels"] in HER2_LEVELS,
           f"her2_levels: one of {sorted(HER2_LEVELS)}, got {args['her2_levels']!r}")
    _check(0 <= args["stroma_fraction"] < 1, "stroma_fraction: must be in [0, 1)")
    _check(0 <= args["immune_fraction"] <= 1, "immune_fraction: must be in [0, 1]")
    for name in ("er_pct", "pr_pct", "ki67_pct", "mtor_pct"):
        _check(0 <= args[name] <= 100, f"{name}: must be a percentage in [0, 100]")
    _check(0.05 <= args["nest_fraction"] <= 0.9, "nest_fraction: must be in [0.05, 0.9]")
    if args["exact_library"]:
        _check(args["drift_nm"] == 0 and args["af_mix"] is None, "exact_library: needs drift_nm=0 and no af_mix")


def _slide_params(args: dict) -> dict:
    """:func:`simulate_slide`'s arguments (``args``: its locals), as the truth records them."""
    a = args
    return {
        "her2_score": str(a["her2_score"]), "shape": list(a["shape"]), "seed": int(a["seed"]),
        "pixel_size_um": float(a["pixel_size_um"]), "er_pct": float(a["er_pct"]),
        "pr_pct": float(a["pr_pct"]), "ki67_pct": float(a["ki67_pct"]),
        "mtor_pct": float(a["mtor_pct"]), "stroma_fraction": float(a["stroma_fraction"]),
        "immune_fraction": float(a["immune_fraction"]),
        "photons_per_count": float(a["photons_per_count"]), "read_noise": float(a["read_noise"]),
        "offset_counts": float(a["offset_counts"]), "drift_nm": float(a["drift_nm"]),
        "shading": float(a["shading"]), "off_library_af": bool(a["off_library_af"]),
        "lipofuscin_in_cells": bool(a["lipofuscin_in_cells"]), "crowded": bool(a["crowded"]),
        "her2_incomplete_fraction": float(a["her2_incomplete_fraction"]),
        "her2_levels": a["her2_levels"],
        "receptor_split": [float(x) for x in a["receptor_split"]], "nest_fraction": float(a["nest_fraction"]),
        "psf_sigma_px": float(a["psf_sigma_px"]), "fov_px": int(a["fov_px"]),
        "af_mix": dict(a["af_mix"] or AF_MIX), "unstained": bool(a["unstained"]),
        "exact_library": bool(a["exact_library"]),
    }


def _slide_truth(cells_truth: pd.DataFrame, mix: np.ndarray, camera: dict, off_info: dict, params: dict) -> dict:
    """A simulated slide's sample-level truth: the scores of its designed classes, and how it was made."""
    truth = sample_truth(cells_truth)
    truth.update(
        {
            "n_her2_strong_incomplete_2plus": int(
                ((cells_truth["her2_class"] == "2+") & (cells_truth["her2_pattern"] == "incomplete")).sum()
            ),
            "design_her2_score": params["her2_score"],
            "her2_mix_tumour": [float(x) for x in mix / mix.sum()],
            "her2_class_agreement_true_masks": float(
                np.mean(cells_truth["her2_class"] == cells_truth["her2_class_true"])
            ),
            "spectral_shift_nm": camera["shifts"],
            "spectral_width_factor": camera["widths"],
            "shading": params["shading"],
            "shading_fov_px": params["fov_px"],
            "shading_model": "signal x (1 - shading * r^2), r = distance from the FOV centre "
                             "normalised to 1 at its corners; offset not shaded",
            "off_library_af": params["off_library_af"], "lipofuscin_in_cells": params["lipofuscin_in_cells"],
            **off_info,
            "params": params,
        }
    )
    return truth


def _design_her2_classes(rng, cells, ctype, ring_m, mix, *, um, width, incomplete_fraction, psf_sigma_px, levels):
    """Each tumour cell's HER2 class (spatially clustered, in ``mix`` proportions) and its membrane.

    Returns the class index per cell id (0 for non-tumour cells) and
    :func:`~qdquant.simulate.her2_design._design_her2`'s result.
    """
    shape, n = cells.shape, len(ctype)
    yy, xx = np.indices(shape)
    _, cy, cx = _centroids(cells, n)
    tum_ids = np.nonzero(ctype == 0)[0] + 1
    n_t = len(tum_ids)
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
        incomplete_fraction=incomplete_fraction, psf_sigma_px=psf_sigma_px, levels=levels,
    )
    return cls, her2


def _slide_record(camera: dict, truth: dict, abund, nuclei, cells, cells_truth, pixel_size_um: float,
                  off) -> SimulatedSlide:
    """The :class:`SimulatedSlide`, its truth completed with what every simulated slide records."""
    truth.update(
        {
            "her2_thresholds": dict(HER2_DEFAULTS),
            "pixel_size_um": float(pixel_size_um),
            "endmembers": list(ENDMEMBERS),
        }
    )
    return SimulatedSlide(
        cube=camera["cube"],
        wavelengths_nm=BAND_WAVELENGTHS_NM.copy(),
        library=camera["library"],
        true_spectra=camera["true_spectra"],
        abundances=abund,
        nuclei=nuclei,
        cells=cells,
        cells_truth=cells_truth,
        truth=_jsonable(truth),
        pixel_size_um=float(pixel_size_um),
        shading=camera["shade"],
        off_library=off,
        off_library_spectra=_off_library_spectra(BAND_WAVELENGTHS_NM),
    )


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


def _cells_truth_table(cells, nuclei, ctype, cls, her2, mk, her2_abundance, pixel_size_um):
    """One row per cell of a simulated slide: position, size, type, designed classes and levels.

    Parameters
    ----------
    cells, nuclei : (Y, X) ndarray of int
    ctype : (n,) ndarray of int
        Cell type of ids 1..n (index into ``_CELL_TYPES``).
    cls : (n + 1,) ndarray of int
        Designed HER2 class index per id.
    her2 : dict
        :func:`~qdquant.simulate.her2_design._design_her2`'s result.
    mk : dict
        :func:`~qdquant.simulate.stains._design_markers`'s result.
    her2_abundance : (Y, X) ndarray
        True HER2 abundance, on which the ``*_true`` columns apply the rule.
    pixel_size_um : float

    Returns
    -------
    pandas.DataFrame
        The columns described in :func:`simulate_slide`.
    """
    n = len(ctype)
    area, cy, cx = _centroids(cells, n)
    nuc_area = np.bincount(nuclei.ravel(), minlength=n + 1)
    inten_t, comp_t, cls_t = _her2_cells(her2_abundance, _her2_geometry(cells, n, cy, cx))
    ids = np.arange(1, n + 1)
    return pd.DataFrame(
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
            "er_bin": mk["er_bin"][ids].astype(int),
            "pr_bin": mk["pr_bin"][ids].astype(int),
            "ki67_bin": mk["ki67_bin"][ids].astype(int),
            "mtor_bin": mk["mtor_bin"][ids].astype(int),
            "ki67_positive": mk["ki67_bin"][ids] > 0,
            "mtor_positive": mk["mtor_bin"][ids] > 0,
            "er_intensity": mk["er_t"][ids],
            "pr_intensity": mk["pr_t"][ids],
            "ki67_intensity": mk["ki67_t"][ids],
            "mtor_intensity": mk["mtor_t"][ids],
            "ecad": mk["ecad_t"][ids],
            "dapi": mk["dapi_lvl"][ids],
        }
    )
