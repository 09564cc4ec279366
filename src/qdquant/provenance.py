"""What a run did: the record written to ``{results}/provenance/params.yml``.

Resolved config, the thresholds used, the library used per sample, package
versions and checksums of every input, and the run itself (qdquant version and
git revision, host, start and end), so that a cohort's numbers can be traced to
exactly what produced them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd

#: Inputs up to this size are hashed whole; larger ones (whole slides) by their size and their
#: first and last PARTIAL_BYTES, which any rescan, re-export or truncation changes, in a second.
WHOLE_HASH_BYTES = 256 * 2**20
PARTIAL_BYTES = 32 * 2**20
#: The run's start (``{results}/provenance/.run-started.json``): written when a workflow run
#: starts (Snakemake's onstart, workflow/Snakefile), read into the record by the cohort step,
#: removed when the run ends.
RUN_START_FILE = ".run-started.json"
PACKAGES = ("qdquant", "numpy", "scipy", "scikit-image", "tifffile", "imagecodecs", "dask", "zarr", "ome-zarr",
            "pandas", "numba", "snakemake")


def checksum(path: str | Path) -> dict:
    """SHA-256 of a file (whole, or size + first and last PARTIAL_BYTES for a large one).

    Returns
    -------
    dict
        ``path``, ``bytes``, ``sha256`` and ``method`` (``whole`` or ``head+tail``).
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        if size <= WHOLE_HASH_BYTES:
            for block in iter(lambda: fh.read(2**20), b""):
                digest.update(block)
            method = "whole"
        else:
            digest.update(str(size).encode())
            digest.update(fh.read(PARTIAL_BYTES))
            fh.seek(size - PARTIAL_BYTES)
            digest.update(fh.read(PARTIAL_BYTES))
            method = f"size+first+last {PARTIAL_BYTES // 2**20} MiB"
    return {"path": str(path), "bytes": size, "sha256": digest.hexdigest(), "method": method}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def record_run_start(folder: str | os.PathLike) -> Path:
    """Note in ``folder`` (``{results}/provenance``) that a run starts now; returns the file.

    The workflow calls this as it starts (a run killed and resumed: as it
    resumes), so that the record says when the run that wrote it began,
    whichever steps it ran. Written whole by a rename.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_START_FILE
    tmp = folder / f".{RUN_START_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"started": _now()}))
    os.replace(tmp, path)
    return path


def clear_run_start(folder: str | os.PathLike) -> None:
    """Remove the note of :func:`record_run_start` (the run has ended)."""
    (Path(folder) / RUN_START_FILE).unlink(missing_ok=True)


def run_start(folder: str | os.PathLike) -> str | None:
    """When the run under way started (ISO 8601, UTC), from the note in ``folder``; None without one."""
    try:
        return json.loads((Path(folder) / RUN_START_FILE).read_text())["started"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_record(cfg, outputs, *, started: str | None = None) -> dict:
    """The provenance of a finished run, as plain data for YAML.

    Parameters
    ----------
    cfg : qdquant.config.Config
    outputs : callable
        ``outputs(cfg, sample_id)`` -> dict of the sample's output paths
        (:func:`qdquant.pipeline.outputs`).
    started : str, optional
        When the run started (:func:`run_start`); None when unknown.
    """
    samples = {}
    for sample in cfg.samples:
        out = outputs(cfg, sample.sample_id)
        summary = pd.read_csv(out["summary"]).iloc[0].to_dict() if out["summary"].is_file() else {}
        library = pd.read_csv(out["spectra_used"]) if out["spectra_used"].is_file() else None
        refinement = out["unmixing_qc"].parent / "library_refinement.csv"
        nucleus = out.get("nucleus_size")
        samples[sample.sample_id] = {
            "image": checksum(sample.image),
            **({"unstained": checksum(sample.unstained)} if sample.unstained is not None else {}),
            "library_used": {
                "file": checksum(out["spectra_used"]) if library is not None else None,
                "endmembers": [] if library is None else [c for c in library.columns if c != "wavelength_nm"],
                "refinement_shifts_nm": (
                    pd.read_csv(refinement).set_index("endmember")["shift_nm"].round(3).to_dict()
                    if refinement.is_file() else None),
            },
            "nucleus_diameter_um": (pd.read_csv(nucleus).iloc[0]["used_um"].item()
                                    if nucleus is not None and Path(nucleus).is_file() else None),
            "thresholds_used": {k: _plain(v) for k, v in summary.items()
                                if k.startswith("her2_t_") or k in ("her2_thresholds_source", "tumour_threshold")},
        }
    return {
        "written": _now(),
        "run": run_facts(started),
        "config": _plain(cfg.raw),
        "inputs": {"config": [checksum(p) for p in _config_files(cfg)],
                   "samples": checksum(cfg.raw["samples"]), "spectra": checksum(cfg.raw["spectra"]),
                   "panel": checksum(cfg.raw["panel"])},
        "samples": samples,
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
    }


def run_facts(started: str | None = None) -> dict:
    """qdquant's version and git revision, the host, and when the run started and ended.

    ``started`` is given (the workflow's note, :func:`run_start`: the start
    of the Snakemake run that wrote the record, the resumed one after a
    kill), None when the steps ran without the workflow; ``finished`` is now
    (the cohort step writes the record last). ``host`` is the machine that
    writes the record. ``git_revision`` is the commit of the qdquant source
    that ran, with ``+dirty`` for uncommitted changes, or None for an
    installed package.
    """
    import qdquant

    return {
        "qdquant_version": qdquant.__version__,
        "git_revision": git_revision(Path(qdquant.__file__).parent),
        "host": platform.node(),
        "started": started,
        "finished": _now(),
    }


def git_revision(folder: Path) -> str | None:
    """The git commit ``folder`` is checked out at (``+dirty`` with uncommitted changes), or None."""
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def _config_files(cfg) -> list[Path]:
    files = [Path(part.strip()) for part in str(cfg.source).split(" + ")]
    return [f for f in files if f.is_file()]


def _plain(value):
    """Numbers, strings, lists and dicts only (YAML without Python tags)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
