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

Layout
------
:mod:`~qdquant.simulate.spectra` (panel, spectra, band grid),
:mod:`~qdquant.simulate.tissue` (nests, nuclei, cells),
:mod:`~qdquant.simulate.her2_design` (HER2 classes and rings),
:mod:`~qdquant.simulate.rendering` (calibrated stains, camera cube),
:mod:`~qdquant.simulate.truth` (per-cell and sample-level truth),
:mod:`~qdquant.simulate.reference` (the contract's rules, written apart from
the pipeline's code),
:mod:`~qdquant.simulate.slide` (:func:`simulate_slide`, :func:`write_slide`),
:mod:`~qdquant.simulate.cohort` (the bundled cohorts),
:mod:`~qdquant.simulate.mibi` (semi-synthetic slide from a MIBI-TOF field),
:mod:`~qdquant.simulate.wholeslide` (large slides tile by tile).
"""

from qdquant.simulate.cohort import MESSY, messy_cohort, test_cohort, write_cohort
from qdquant.simulate.her2_design import HER2_LEVELS, HER2_MIX_PRESETS
from qdquant.simulate.mibi import MIBI_CHANNELS, MIBI_MASK, simulate_mibi
from qdquant.simulate.slide import (  # noqa: F401 (_jsonable: used by benchmarks)
    SimulatedSlide,
    _jsonable,
    simulate_slide,
    write_slide,
)
from qdquant.simulate.spectra import (
    AF_MIX,
    BAND_HALF_WIDTH_NM,
    BAND_WAVELENGTHS_NM,
    ENDMEMBERS,
    band_spectra,
    default_panel,
    reference_spectra,
)
from qdquant.simulate.truth import (
    HER2_DEFAULTS,
    SUBTYPE_DEFAULTS,
    her2_ring_scores,
    membrane_ring,
    sample_truth,
)
from qdquant.simulate.wholeslide import simulate_wholeslide

__all__ = [
    "AF_MIX",
    "BAND_HALF_WIDTH_NM",
    "BAND_WAVELENGTHS_NM",
    "ENDMEMBERS",
    "HER2_DEFAULTS",
    "HER2_LEVELS",
    "HER2_MIX_PRESETS",
    "MESSY",
    "MIBI_CHANNELS",
    "MIBI_MASK",
    "SUBTYPE_DEFAULTS",
    "SimulatedSlide",
    "band_spectra",
    "default_panel",
    "her2_ring_scores",
    "membrane_ring",
    "messy_cohort",
    "reference_spectra",
    "sample_truth",
    "simulate_mibi",
    "simulate_slide",
    "simulate_wholeslide",
    "test_cohort",
    "write_cohort",
    "write_slide",
]
