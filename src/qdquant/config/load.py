"""The whole configuration: config files, sample sheet, panel and library read and
cross-checked into one :class:`~qdquant.config.model.Config`; image headers checked
against the library."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from qdquant.config.model import (
    BINNED_SCORES,
    Config,
    Dask,
    Her2,
    Sample,
    Segmentation,
    Subtype,
    Tumour,
    Unmixing,
)
from qdquant.config.tables import read_library, read_panel, read_samples
from qdquant.config.validate import _merge, read_config_file, validate_config_dict
from qdquant.errors import InputError


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


def _read_config(config, source: str | None) -> tuple[str, dict]:
    """The config as one mapping (files merged in order) and the name errors give it."""
    if isinstance(config, dict):
        return source or "config", config
    if isinstance(config, (list, tuple)):
        raw = {}
        for path in config:
            raw = _merge(raw, read_config_file(path))
        return source or " + ".join(map(str, config)), raw
    return source or str(config), read_config_file(config)


def _her2_section(cfg: dict, raw: dict, panel, source: str) -> Her2 | None:
    """The ``her2`` section, checked against the panel: its marker is the one row scored 'her2'."""
    her2 = None
    if "her2" in cfg:
        explicit = any(k in (raw.get("her2") or {}) for k in ("t_faint", "t_weak", "t_strong"))
        her2 = Her2(**cfg["her2"], thresholds_explicit=explicit)
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
    return her2


def _tumour_and_subtype_sections(cfg: dict, panel, her2: Her2 | None, source: str):
    """The ``tumour`` and ``subtype`` sections (or None), their markers checked against the panel."""
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
    return tumour, subtype


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
    source, raw = _read_config(config, source)
    cfg = validate_config_dict(raw, source=source)

    library = read_library(cfg["spectra"])
    panel = read_panel(cfg["panel"], library)
    samples = read_samples(cfg["samples"])
    her2 = _her2_section(cfg, raw, panel, source)
    tumour, subtype = _tumour_and_subtype_sections(cfg, panel, her2, source)
    result = Config(
        samples=samples,
        library=library,
        panel=panel,
        results=Path(cfg["results"]),
        pixel_size_um=float(cfg["pixel_size_um"]),
        chunk_size=int(cfg["chunk_size"]),
        segmentation=Segmentation(**cfg["segmentation"]),
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
