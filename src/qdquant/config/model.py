"""The run's configuration as plain frozen dataclasses, and the vocabularies of the panel.

The sections' values, defaults included, come from the validated config
(:func:`qdquant.config.load_config`): every default is defined once, in the
schema (``schemas/config.schema.yaml``), not repeated here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from qdquant.config.defaults import default
from qdquant.errors import InputError


ROLES = ("nuclear_stain", "membrane_stain", "marker", "autofluorescence", "background")


COMPARTMENTS = ("nucleus", "cytoplasm", "membrane", "cell")


SCORES = ("her2", "hscore", "allred", "percent_positive", "none")


BINNED_SCORES = ("hscore", "allred", "percent_positive")


CONTROL_SCORES = ("0", "1+", "2+", "3+")


@dataclass(frozen=True)
class Sample:
    sample_id: str
    image: Path
    pixel_size_um: float | None = None
    tissue: str | None = None
    control_score: str | None = None
    #: an unstained control slide of the same tissue and scanner: the source
    #: of the sample's autofluorescence spectrum (sample sheet column ``unstained``)
    unstained: Path | None = None


@dataclass(frozen=True)
class PanelRow:
    endmember: str
    marker: str
    role: str
    compartment: str | None
    score: str
    t1: float | None = None
    t2: float | None = None
    t3: float | None = None


@dataclass(frozen=True)
class Library:
    """The spectral library: ``spectra[:, k]`` is endmember ``names[k]``, one row per band."""

    wavelengths_nm: np.ndarray
    names: tuple[str, ...]
    spectra: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        table = pd.DataFrame(self.spectra, columns=list(self.names))
        table.insert(0, "wavelength_nm", self.wavelengths_nm)
        return table


@dataclass(frozen=True)
class Segmentation:
    #: "auto" (estimated from the nuclear stain) or a hint in micrometres (see
    #: :func:`qdquant.nucleus_size.resolve_nucleus_diameter`)
    nucleus_diameter_um: float | str
    cell_expansion_um: float
    membrane_width_px: float


@dataclass(frozen=True)
class Her2:
    marker: str
    t_faint: float
    t_weak: float
    t_strong: float
    complete_fraction: float
    sectors: int
    ultralow_min_pct: float
    #: True when the config file gave any threshold (explicit thresholds beat calibration)
    thresholds_explicit: bool = False

    @property
    def thresholds(self) -> dict[str, float]:
        """The three intensity thresholds by name (as :func:`qdquant.scoring.her2_cell_scores` takes them)."""
        return {"t_faint": self.t_faint, "t_weak": self.t_weak, "t_strong": self.t_strong}


@dataclass(frozen=True)
class Unmixing:
    refine_library: str | bool
    max_shift_nm: float
    poisson_weights: bool
    flag_poor_fit: bool
    #: "slide" (spectra from the slide's stain-free pixels) or "library"
    autofluorescence: str
    #: Gaussian sigma (um) of the smoothing along membranes before the fit; 0: none
    #: (see :mod:`qdquant.unmixing.smoothing`)
    smoothing_um: float = default("unmixing.smoothing_um")


@dataclass(frozen=True)
class Dask:
    """The ``dask`` section: the scheduler each step computes with (see :mod:`qdquant.scheduler`)."""

    scheduler: str  # threads | processes | synchronous | a dask.distributed address
    num_workers: int | None  # None: the rule's threads (--threads), else dask's default
    cluster: str | None = default("dask.cluster")  # "slurm": a dask-jobqueue SLURMCluster per step
    slurm: dict = field(default_factory=dict)  # its worker jobs (schema: dask.slurm), defaults filled in


@dataclass(frozen=True)
class Tumour:
    marker: str
    threshold: float | str


@dataclass(frozen=True)
class Subtype:
    er: str
    pr: str
    pr_cutoff_pct: float
    ki67_cutoff_pct: float
    ki67: str | None = None


@dataclass(frozen=True)
class Config:
    samples: tuple[Sample, ...]
    library: Library
    panel: tuple[PanelRow, ...]
    results: Path
    pixel_size_um: float
    chunk_size: int
    segmentation: Segmentation
    her2: Her2 | None
    unmixing: Unmixing
    illumination: str
    tumour: Tumour | None
    subtype: Subtype | None
    dask: Dask
    source: str = "config"
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def sample(self, sample_id: str) -> Sample:
        for s in self.samples:
            if s.sample_id == sample_id:
                return s
        raise InputError(f"{self.source}: no sample '{sample_id}' in the sample sheet")

    def panel_row(self, *, role: str | None = None, marker: str | None = None) -> PanelRow | None:
        """The first panel row with this role or marker, or None."""
        for row in self.panel:
            if (role is None or row.role == role) and (marker is None or row.marker == marker):
                return row
        return None

    @property
    def measured(self) -> tuple[PanelRow, ...]:
        """Panel rows measured per cell: every role except ``background``."""
        return tuple(r for r in self.panel if r.role != "background")

    @property
    def scored(self) -> tuple[PanelRow, ...]:
        """Panel rows scored by intensity bins (H-score, Allred, % positive)."""
        return tuple(r for r in self.panel if r.score in BINNED_SCORES)

    @property
    def controls(self) -> tuple[Sample, ...]:
        return tuple(s for s in self.samples if s.control_score is not None)
