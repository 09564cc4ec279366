"""Where each output lives: the one place that knows the results folder's layout."""

from __future__ import annotations

from pathlib import Path

from qdquant.config import Config


def sample_dir(cfg: Config, sample_id: str) -> Path:
    return cfg.results / sample_id


def outputs(cfg: Config, sample_id: str) -> dict[str, Path]:
    """Every per-sample output path, by name."""
    d = sample_dir(cfg, sample_id)
    return {
        "zarr": d / "unmixed.ome.zarr",
        "spectra_used": d / "spectra_used.csv",
        "unmixing_qc": d / "qc" / "unmixing.png",
        "segmentation_qc": d / "qc" / "segmentation.png",
        "nucleus_size": d / "qc" / "nucleus_size.csv",
        "measurements": d / "measurements.csv",
        "cells": d / "cells.csv",
        "summary": d / "summary.csv",
        "h5ad": d / "cells.h5ad",
        "report": d / "report.html",
    }


def calibration_path(cfg: Config) -> Path:
    return cfg.results / "calibration" / "her2_thresholds.csv"


def provenance_path(cfg: Config) -> Path:
    return cfg.results / "provenance" / "params.yml"
