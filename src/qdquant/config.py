"""The run's configuration: config.yaml, the sample sheet, the panel and the library.

Everything is parsed once into plain frozen dataclasses. Every bad value is
reported as an :class:`~qdquant.errors.InputError` whose one-line message
names the file, the key or row, and what is wrong.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import jsonschema
import numpy as np
import pandas as pd
import yaml

from qdquant.errors import InputError

ROLES = ("nuclear_stain", "membrane_stain", "marker", "autofluorescence", "background")
COMPARTMENTS = ("nucleus", "cytoplasm", "membrane", "cell")
SCORES = ("her2", "hscore", "allred", "percent_positive", "none")
BINNED_SCORES = ("hscore", "allred", "percent_positive")
CONTROL_SCORES = ("0", "1+", "2+", "3+")
_SAMPLE_ID = re.compile(r"^[A-Za-z0-9_-]+$")


def schema() -> dict:
    """The JSON schema of config.yaml (also used by the Snakefile)."""
    text = resources.files("qdquant").joinpath("schemas/config.schema.yaml").read_text()
    return yaml.safe_load(text)


SCHEMA_PATH = Path(str(resources.files("qdquant").joinpath("schemas/config.schema.yaml")))


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


# The sections' values, defaults included, come from the validated config: every default is
# defined once, in the schema (``schemas/config.schema.yaml``), not repeated here.


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


@dataclass(frozen=True)
class Unmixing:
    refine_library: str | bool = "auto"
    max_shift_nm: float = 6.0
    poisson_weights: bool = False
    flag_poor_fit: bool = True
    #: "slide" (spectra from the slide's stain-free pixels) or "library"
    autofluorescence: str = "slide"


@dataclass(frozen=True)
class Dask:
    """The ``dask`` section: the scheduler each step computes with (see :mod:`qdquant.scheduler`)."""

    scheduler: str = "threads"  # threads | processes | synchronous | a dask.distributed address
    num_workers: int | None = None  # None: the rule's threads (--threads), else dask's default
    cluster: str | None = None  # "slurm": a dask-jobqueue SLURMCluster per step
    slurm: dict = field(default_factory=dict)  # its worker jobs (schema: dask.slurm), defaults filled in


@dataclass(frozen=True)
class Tumour:
    marker: str
    threshold: float | str = "auto"


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
    dask: Dask = field(default_factory=Dask)
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


# ----------------------------------------------------------------------------
# config.yaml


def _fill_defaults(instance: Any, sch: dict) -> Any:
    """Fill schema defaults into a validated config (recursively into objects)."""
    if sch.get("type") == "object" and isinstance(instance, dict):
        for key, sub in sch.get("properties", {}).items():
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                instance[key] = _fill_defaults(instance[key], sub)
    return instance


def _schema_message(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        where = "" if key == "(top level)" else f" in '{key}'"
        return f"unknown key{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}{where}"
    if error.validator == "required":
        return f"missing key {error.message.split()[0]}" + ("" if key == "(top level)" else f" in '{key}'")
    if error.validator == "oneOf":
        strict = any("exclusiveMinimum" in sub for sub in error.validator_value)
        return f"key '{key}': {error.instance!r} is not valid (expected 'auto' or a number {'>' if strict else '>='} 0)"
    if error.validator == "pattern":
        expected = " ".join(error.schema.get("description", "").split()) or f"matching {error.validator_value}"
        return f"key '{key}': {error.instance!r} is not valid (expected {expected})"
    return f"key '{key}': {error.message}"


def validate_config_dict(raw: dict, *, source: str = "config") -> dict:
    """Validate a config mapping against the schema and return it with defaults filled."""
    if not isinstance(raw, dict):
        raise InputError(f"{source}: expected a mapping of keys, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    sch = schema()
    errors = sorted(
        jsonschema.Draft202012Validator(sch).iter_errors(raw),
        key=lambda e: (len(e.absolute_path), str(e.absolute_path)),
    )
    if errors:
        raise InputError(f"{source}: {_schema_message(errors[0])}")
    return _fill_defaults(raw, sch)


def _merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base`` (as Snakemake merges config files)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"{path}: malformed YAML{where}") from None
    return raw if raw is not None else {}


# ----------------------------------------------------------------------------
# tables


def _read_table(path: Path, sep: str, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, comment=None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot parse {what} ({str(exc).splitlines()[0]})") from None
    table.columns = [c.strip() for c in table.columns]
    return table.apply(lambda col: col.str.strip())


def _require_columns(table: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")


def _number(value: str, path: Path, row: int, column: str, *, positive: bool = False) -> float | None:
    if value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        raise InputError(f"{path}, row {row}: {column} '{value}' is not a number") from None
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise InputError(
            f"{path}, row {row}: {column} must be {'> 0' if positive else '>= 0'}, got {value}"
        )
    return number


def read_samples(path: str | Path) -> tuple[Sample, ...]:
    """Parse the sample sheet. Row numbers in errors count the header as row 1."""
    path = Path(path)
    table = _read_table(path, "\t", "sample sheet")
    _require_columns(table, path, ("sample_id", "image"))
    if table.empty:
        raise InputError(f"{path}: the sample sheet lists no sample")
    samples, seen = [], {}
    for i, rec in enumerate(table.to_dict("records"), start=2):
        sid = rec["sample_id"]
        if not _SAMPLE_ID.match(sid):
            raise InputError(f"{path}, row {i}: sample_id '{sid}' must be letters, digits, '-' or '_'")
        if sid in seen:
            raise InputError(f"{path}, row {i}: duplicate sample_id '{sid}' (also row {seen[sid]})")
        seen[sid] = i
        if not rec["image"]:
            raise InputError(f"{path}, row {i}: sample '{sid}' has no image")
        control = rec.get("control_score", "") or None
        if control is not None and control not in CONTROL_SCORES:
            raise InputError(
                f"{path}, row {i}: control_score '{control}' must be one of {', '.join(CONTROL_SCORES)}"
            )
        samples.append(
            Sample(
                sample_id=sid,
                image=Path(rec["image"]),
                pixel_size_um=_number(rec.get("pixel_size_um", ""), path, i, "pixel_size_um", positive=True),
                tissue=rec.get("tissue", "") or None,
                control_score=control,
                unstained=Path(rec["unstained"]) if rec.get("unstained", "") else None,
            )
        )
    return tuple(samples)


def read_library(path: str | Path) -> Library:
    """Parse the spectral library CSV (wavelength_nm, then one column per endmember)."""
    path = Path(path)
    table = _read_table(path, ",", "spectral library")
    if table.columns[0] != "wavelength_nm":
        raise InputError(f"{path}: the first column must be 'wavelength_nm', got '{table.columns[0]}'")
    names = tuple(table.columns[1:])
    if not names:
        raise InputError(f"{path}: no endmember columns after wavelength_nm")
    if len(set(names)) != len(names):
        raise InputError(f"{path}: duplicate endmember columns")
    values = table.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if values.shape[0] == 0:
        raise InputError(f"{path}: no band rows")
    bad = ~np.isfinite(values)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise InputError(
            f"{path}, row {r + 2}: column {table.columns[c]} value '{table.iat[r, c]}'"
            " is not a finite number (empty, NaN, infinite or text)"
        )
    spectra = values[:, 1:]
    for k, name in enumerate(names):
        if (spectra[:, k] < 0).any():
            raise InputError(f"{path}: endmember {name} has negative values")
        if not spectra[:, k].any():
            raise InputError(f"{path}: endmember {name} is all zero")
    if len(names) > len(values):
        raise InputError(
            f"{path}: {len(names)} endmembers but only {len(values)} bands (need at least as many bands)"
        )
    return Library(wavelengths_nm=values[:, 0], names=names, spectra=spectra)


def read_panel(path: str | Path, library: Library) -> tuple[PanelRow, ...]:
    """Parse the panel and check it against the library."""
    path = Path(path)
    table = _read_table(path, "\t", "panel")
    _require_columns(table, path, ("endmember", "marker", "role", "compartment", "score"))
    rows = []
    for i, rec in enumerate(table.to_dict("records"), start=2):
        em, marker, role = rec["endmember"], rec["marker"], rec["role"]
        compartment, score = rec["compartment"] or None, rec["score"] or "none"
        if em not in library.names:
            raise InputError(
                f"{path}, row {i}: endmember '{em}' is not a column of the spectral library"
                f" ({', '.join(library.names)})"
            )
        if not marker:
            raise InputError(f"{path}, row {i}: endmember '{em}' has no marker name")
        if role not in ROLES:
            raise InputError(f"{path}, row {i}: role '{role}' must be one of {', '.join(ROLES)}")
        if compartment is not None and compartment not in COMPARTMENTS:
            raise InputError(
                f"{path}, row {i}: compartment '{compartment}' must be one of {', '.join(COMPARTMENTS)}"
            )
        if score not in SCORES:
            raise InputError(f"{path}, row {i}: score '{score}' must be one of {', '.join(SCORES)}")
        if role == "marker" and compartment is None:
            raise InputError(f"{path}, row {i}: marker '{marker}' needs a compartment")
        if score != "none" and role not in ("marker", "membrane_stain"):
            raise InputError(f"{path}, row {i}: only markers can be scored, '{marker}' has role {role}")
        if score in BINNED_SCORES and compartment is None:
            raise InputError(f"{path}, row {i}: scored marker '{marker}' needs a compartment")
        t = [_number(rec.get(c, ""), path, i, c) for c in ("t1", "t2", "t3")]
        if score in BINNED_SCORES:
            need = 1 if score == "percent_positive" else 3
            if any(x is None for x in t[:need]):
                raise InputError(
                    f"{path}, row {i}: marker '{marker}' scored {score} needs "
                    + ("t1" if need == 1 else "t1, t2 and t3")
                )
            given = [x for x in t if x is not None]
            if given != sorted(given):
                raise InputError(f"{path}, row {i}: thresholds of '{marker}' must rise (t1 <= t2 <= t3)")
        rows.append(PanelRow(em, marker, role, compartment, score, *t))

    def duplicates(values):
        return sorted({v for v in values if values.count(v) > 1})

    if dup := duplicates([r.endmember for r in rows]):
        raise InputError(f"{path}: endmember {dup[0]} is listed more than once")
    if dup := duplicates([r.marker for r in rows]):
        raise InputError(f"{path}: marker {dup[0]} is listed more than once")
    if missing := [n for n in library.names if n not in {r.endmember for r in rows}]:
        raise InputError(f"{path}: library endmember {missing[0]} has no panel row")
    n_nuclear = sum(r.role == "nuclear_stain" for r in rows)
    if n_nuclear != 1:
        raise InputError(f"{path}: needs exactly one nuclear_stain row, found {n_nuclear}")
    if sum(r.role == "membrane_stain" for r in rows) > 1:
        raise InputError(f"{path}: at most one membrane_stain row is allowed")
    return tuple(rows)


# ----------------------------------------------------------------------------
# the whole configuration


def _dask_settings(section: dict, given: dict, source: str) -> Dask:
    """The ``dask`` section (defaults filled in); a cluster and a scheduler address together are an error."""
    if section.get("cluster") is not None and "scheduler" in given and section["scheduler"] != "threads":
        raise InputError(
            f"{source}: key 'dask.cluster': '{section['cluster']}' starts its own cluster; remove"
            f" 'dask.scheduler' ('{section['scheduler']}') or the cluster"
        )
    if given.get("slurm") and section.get("cluster") != "slurm":
        raise InputError(f"{source}: key 'dask.slurm' needs 'dask.cluster: slurm'")
    # the worker jobs' settings only where they are used (so a default section compares equal)
    return Dask(**{**section, "slurm": section.get("slurm", {}) if section.get("cluster") == "slurm" else {}})


def load_config(
    config: str | Path | dict | list,
    *,
    source: str | None = None,
    check_images: bool = False,
    image_will_exist: Callable[[Path], bool] | None = None,
) -> Config:
    """Read and check the whole configuration.

    Parameters
    ----------
    config : path, list of paths, or mapping
        config.yaml; several files, merged in order (later keys win, nested
        sections merged, as Snakemake merges ``--configfile``); or the
        already-parsed mapping (as Snakemake holds it).
    source : str, optional
        The name errors give the config (default: its path, or "config").
    check_images : bool
        Also open every sample's image header and check its band count
        against the library (reads metadata only).
    image_will_exist : callable, optional
        For images that do not exist yet: return True when the workflow will
        make the file (the bundled test slides), so it is not an error.
    """
    if isinstance(config, dict):
        source, raw = source or "config", config
    elif isinstance(config, (list, tuple)):
        source, raw = source or " + ".join(map(str, config)), {}
        for path in config:
            raw = _merge(raw, read_config_file(path))
    else:
        source, raw = source or str(config), read_config_file(config)
    cfg = validate_config_dict(raw, source=source)

    library = read_library(cfg["spectra"])
    panel = read_panel(cfg["panel"], library)
    samples = read_samples(cfg["samples"])
    seg = Segmentation(**cfg["segmentation"])

    her2 = None
    if "her2" in cfg:
        h = cfg["her2"]
        explicit = any(k in (raw.get("her2") or {}) for k in ("t_faint", "t_weak", "t_strong"))
        her2 = Her2(**h, thresholds_explicit=explicit)
        if not her2.t_faint < her2.t_weak < her2.t_strong:
            raise InputError(f"{source}: key 'her2': thresholds must rise (t_faint < t_weak < t_strong)")
        row = next((r for r in panel if r.marker == her2.marker), None)
        if row is None:
            raise InputError(f"{source}: key 'her2.marker': '{her2.marker}' is not a marker in {cfg['panel']}")
        if row.score != "her2":
            raise InputError(f"{cfg['panel']}: marker '{her2.marker}' (her2.marker) must be scored 'her2'")
    her2_rows = [r.marker for r in panel if r.score == "her2"]
    if len(her2_rows) > (1 if her2 else 0) or (her2 and her2_rows != [her2.marker]):
        raise InputError(
            f"{cfg['panel']}: rows scored 'her2' ({', '.join(her2_rows)}) must be exactly the her2.marker"
            + ("" if her2 else " (the config has no 'her2' section)")
        )

    markers = {r.marker for r in panel}
    binned = {r.marker for r in panel if r.score in BINNED_SCORES}
    tumour = None
    if "tumour" in cfg:
        tumour = Tumour(**cfg["tumour"])
        if tumour.marker not in markers:
            raise InputError(f"{source}: key 'tumour.marker': '{tumour.marker}' is not a marker in {cfg['panel']}")
    subtype = None
    if "subtype" in cfg:
        subtype = Subtype(**cfg["subtype"])
        for key in ("er", "pr", "ki67"):
            value = getattr(subtype, key)
            if value is not None and value not in binned:
                raise InputError(
                    f"{source}: key 'subtype.{key}': '{value}' is not a panel marker scored"
                    " hscore, allred or percent_positive"
                )
        if her2 is None:
            raise InputError(f"{source}: key 'subtype' needs a 'her2' section")

    result = Config(
        samples=samples,
        library=library,
        panel=panel,
        results=Path(cfg["results"]),
        pixel_size_um=float(cfg["pixel_size_um"]),
        chunk_size=int(cfg["chunk_size"]),
        segmentation=seg,
        her2=her2,
        unmixing=Unmixing(**cfg["unmixing"]),
        illumination=cfg["illumination"],
        tumour=tumour,
        subtype=subtype,
        dask=_dask_settings(cfg["dask"], raw.get("dask") or {}, source),
        source=source,
        raw=cfg,
    )
    af_rows = [r for r in result.panel if r.role == "autofluorescence"]
    if any(s.unstained for s in samples) and len(af_rows) != 1:
        raise InputError(
            f"{cfg['samples']}: column 'unstained' needs exactly one panel row with role autofluorescence"
            f" in {cfg['panel']} (found {len(af_rows)})"
        )
    if check_images:
        for sample in samples:
            paths = [p for p in (sample.image, sample.unstained) if p is not None]
            if image_will_exist and any(not p.exists() and image_will_exist(p) for p in paths):
                continue
            check_image(result, sample)
    return result


def check_image(cfg: Config, sample: Sample) -> tuple[tuple[int, ...], float]:
    """Check a sample's image header against the library; return its shape and pixel size (µm)."""
    from qdquant.io import read_cube_header

    n_bands = len(cfg.library.wavelengths_nm)

    def header(image, what):
        shape, dtype, meta_px = read_cube_header(image)
        if shape[0] != n_bands:
            raise InputError(
                f"{image}: {shape[0]} bands but the spectral library has {n_bands} rows"
                f" ({what} of sample '{sample.sample_id}')"
            )
        return shape, meta_px

    if sample.unstained is not None:
        header(sample.unstained, "unstained control")
    shape, meta_px = header(sample.image, "image")
    return shape, pixel_size_for(cfg, sample, meta_px)


def check_results_writable(cfg: Config) -> None:
    """A clear error, before any step runs, when the ``results`` folder cannot be written."""
    import tempfile

    try:
        cfg.results.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cfg.results, prefix=".qdquant-write-check-"):
            pass
    except OSError as exc:
        raise InputError(f"{cfg.source}: key 'results': cannot write to {cfg.results} "
                         f"({exc.strerror or exc})") from None


def pixel_size_for(cfg: Config, sample: Sample, metadata_um: float | None) -> float:
    """Pixel size (µm): the OME metadata, else the sample sheet, else the config default."""
    if metadata_um:
        return float(metadata_um)
    if sample.pixel_size_um:
        return float(sample.pixel_size_um)
    return cfg.pixel_size_um


# ----------------------------------------------------------------------------
# chunk size from the memory a step is given

#: Bytes a dask worker holds per pixel and band of its chunk in the unmix step,
#: the heaviest step: the raw chunk and its rechunked copy, numba's float64
#: per-pixel work, the float32 abundances and residual, the residual-QC
#: recompute and zarr's write buffers. Measured with
#: ``benchmarks/bench_wholeslide.py`` (4096², 31 bands, 2 workers, 2048-px
#: chunks: peak RSS 2821 MiB, about 9.8 bytes per pixel and band including the
#: interpreter), rounded up.
UNMIX_BYTES_PER_PX_PER_BAND = 10.0
#: Share of ``mem_mb`` the workers' chunks may fill; the rest is headroom.
CHUNK_MEMORY_FRACTION = 0.8
#: Chunk edges chosen from memory are multiples of this (and at least this).
CHUNK_QUANTUM = 256


def chunk_size_for(
    chunk_size: int,
    n_bands: int,
    n_workers: int,
    mem_mb: float | None,
    *,
    bytes_per_px_per_band: float = UNMIX_BYTES_PER_PX_PER_BAND,
    memory_fraction: float = CHUNK_MEMORY_FRACTION,
) -> int:
    """The chunk edge a step uses: ``chunk_size``, shrunk to fit ``mem_mb``.

    The working set is estimated as ``n_workers * edge² * n_bands *
    bytes_per_px_per_band`` bytes and must fit in ``memory_fraction`` of
    ``mem_mb`` (megabytes, 10⁶ bytes, as Snakemake's ``mem_mb``). When the
    configured edge does not fit it is shrunk to the largest multiple of 256
    that does, but never below 256 (nor above ``chunk_size``: a configured
    edge is never grown). ``mem_mb=None`` (not given) keeps ``chunk_size``.
    """
    chunk_size = int(chunk_size)
    if mem_mb is None:
        return chunk_size
    per_px = max(int(n_workers), 1) * max(int(n_bands), 1) * float(bytes_per_px_per_band)
    budget = float(mem_mb) * 1e6 * memory_fraction
    if chunk_size**2 * per_px <= budget:
        return chunk_size
    edge = int(math.sqrt(max(budget, 0.0) / per_px)) // CHUNK_QUANTUM * CHUNK_QUANTUM
    return min(chunk_size, max(CHUNK_QUANTUM, edge))


def chunk_mem_mb(
    chunk_size: int,
    n_bands: int,
    n_workers: int,
    *,
    bytes_per_px_per_band: float = UNMIX_BYTES_PER_PX_PER_BAND,
    memory_fraction: float = CHUNK_MEMORY_FRACTION,
) -> int:
    """The smallest ``mem_mb`` for which :func:`chunk_size_for` keeps ``chunk_size`` (for the rules)."""
    per_px = max(int(n_workers), 1) * max(int(n_bands), 1) * float(bytes_per_px_per_band)
    return int(math.ceil(int(chunk_size) ** 2 * per_px / memory_fraction / 1e6))
