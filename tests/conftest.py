"""Shared fixtures: a tiny but complete project (config, tables, one image)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY_PANEL = """endmember\tmarker\trole\tcompartment\tscore\tt1\tt2\tt3
DAPI\tDAPI\tnuclear_stain\t\tnone\t\t\t
QD565\tER\tmarker\tnucleus\thscore\t30\t80\t160
QD655\tHER2\tmarker\tmembrane\ther2\t\t\t
Offset\tOffset\tbackground\t\tnone\t\t\t
"""


def tiny_library(n_bands: int = 8) -> pd.DataFrame:
    wl = np.linspace(450, 720, n_bands)

    def peak(centre, width):
        return np.exp(-0.5 * ((wl - centre) / width) ** 2)

    return pd.DataFrame(
        {"wavelength_nm": wl, "DAPI": peak(460, 30), "QD565": peak(565, 12), "QD655": peak(655, 14),
         "Offset": np.ones(n_bands)}
    )


def write_project(root: Path, *, config_extra: dict | None = None, n_image_bands: int = 8) -> Path:
    """Write config.yaml and its tables under root; return the config path."""
    from qdquant.io import write_ome_tiff

    root.mkdir(parents=True, exist_ok=True)
    library = tiny_library()
    library.to_csv(root / "spectra.csv", index=False)
    (root / "panel.tsv").write_text(TINY_PANEL)
    rng = np.random.default_rng(0)
    cube = rng.poisson(100, size=(n_image_bands, 64, 64)).astype(np.uint16)
    write_ome_tiff(root / "s1.ome.tif", cube, pixel_size_um=0.5)
    (root / "samples.tsv").write_text(f"sample_id\timage\ns1\t{root / 's1.ome.tif'}\n")
    config = {
        "samples": str(root / "samples.tsv"),
        "spectra": str(root / "spectra.csv"),
        "panel": str(root / "panel.tsv"),
        "results": str(root / "results"),
        "her2": {"marker": "HER2"},
    }
    config.update(config_extra or {})
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def repo_config(path: Path, samples: Path, results: Path, **overrides) -> Path:
    """Write the repository's config/config.yaml with its tables, this sample sheet and results folder."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(samples=str(samples), spectra=str(REPO / "config" / "spectra.csv"),
                  panel=str(REPO / "config" / "panel.tsv"), results=str(results), **overrides)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tiny_project(tmp_path) -> Path:
    return write_project(tmp_path / "project")


@pytest.fixture
def in_repo(monkeypatch):
    """Run in the repository root (the workflow's working directory)."""
    monkeypatch.chdir(REPO)
    return REPO


def shared(*parts) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


def need_independent_generator():
    """Put the independent slide generator (tests/independent) on the path, or skip the test
    when the FPbase spectra it renders with (../shared/data) are not beside the repository."""
    folder = Path(__file__).resolve().parent / "independent"
    sys.path.insert(0, str(folder))
    import spectra

    if not spectra.FPBASE.exists():
        pytest.skip(f"the independent generator's spectra are not found: {spectra.FPBASE}")
