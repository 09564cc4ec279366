"""Shared fixtures: a tiny but complete project (config, tables, one image)."""

from __future__ import annotations

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


def median_equivalent_diameter(labels: np.ndarray, min_area: float = 0) -> float:
    """The median over labelled objects larger than ``min_area`` pixels of the diameter of the
    disc of the same area, in pixels (the truth the nucleus-size tests compare against)."""
    area = np.bincount(labels.ravel())[1:]
    area = area[area > min_area]
    return float(np.median(2 * np.sqrt(area / np.pi)))


def need_independent_generator():
    """Put the independent slide generator (tests/independent) on the path, or skip the test
    when the FPbase spectra it renders with (../shared/data) are not beside the repository."""
    folder = Path(__file__).resolve().parent / "independent"
    sys.path.insert(0, str(folder))
    import spectra

    if not spectra.FPBASE.exists():
        pytest.skip(f"the independent generator's spectra are not found: {spectra.FPBASE}")


def simulated_slides(root: Path, names: list[str]) -> dict[str, Path]:
    """The bundled test slides ``names`` (presets of ``qdquant simulate --cohort``) under root/slides.

    Taken from the repository's test_data/slides where the workflow already made them, else
    simulated (a few seconds each)."""
    import shutil

    from qdquant import simulate

    folder = root / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    slides = {}
    for name in names:
        made = REPO / "test_data" / "slides" / f"{name}.ome.tif"
        if made.is_file():
            shutil.copyfile(made, folder / made.name)
        else:
            simulate.write_slide(simulate.simulate_slide(**simulate.test_cohort()[name]), folder, name)
        slides[name] = folder / f"{name}.ome.tif"
    return slides


def workflow_project(work: Path, slides: dict[str, Path], **overrides) -> Path:
    """A workflow directory: config/config.yaml (the repository's, with overrides) and a sample sheet
    of these slides (absolute paths), results under work/results. Returns work."""
    (work / "config").mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{sid}\t{path}\n" for sid, path in slides.items())
    (work / "config" / "samples.tsv").write_text("sample_id\timage\n" + rows)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(samples="config/samples.tsv", spectra=str(REPO / "config" / "spectra.csv"),
                  panel=str(REPO / "config" / "panel.tsv"), results="results", **overrides)
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return work


def assert_same_outputs(expected: Path, got: Path) -> list[str]:
    """Every CSV under two results folders byte-identical, and every array of every OME-Zarr store equal.

    Returns the files compared (relative paths)."""
    import zarr

    compared = []
    csvs = sorted(p.relative_to(expected) for p in expected.rglob("*.csv"))
    assert csvs, f"no CSV under {expected}"
    assert csvs == sorted(p.relative_to(got) for p in got.rglob("*.csv")), "different CSV files"
    for rel in csvs:
        assert (expected / rel).read_bytes() == (got / rel).read_bytes(), f"{rel} differs"
        compared.append(str(rel))
    stores = sorted(p.relative_to(expected) for p in expected.rglob("*.ome.zarr"))
    assert stores == sorted(p.relative_to(got) for p in got.rglob("*.ome.zarr")), "different stores"
    for rel in stores:
        a, b = zarr.open_group(str(expected / rel), mode="r"), zarr.open_group(str(got / rel), mode="r")
        names = sorted(name for name, _ in a.arrays()) + sorted(
            f"{g}/{n}" for g, group in a.groups() for n, _ in _all_arrays(group))
        for name in names:
            x, y = a[name][...], b[name][...]
            assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), f"{rel}/{name} differs"
            compared.append(f"{rel}/{name}")
    return compared


def _all_arrays(group, prefix=""):
    for name, array in group.arrays():
        yield f"{prefix}{name}", array
    for name, sub in group.groups():
        yield from _all_arrays(sub, f"{prefix}{name}/")


SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile")]
#: The slide the kill-and-resume, determinism and SLURM tests run the workflow on.
RUN_SAMPLE = "her2_2plus"
