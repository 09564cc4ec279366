"""One slide over dask.distributed workers that run in another directory, as on a cluster.

The config's ``dask.scheduler`` points at a ``distributed.LocalCluster`` of two
worker processes started in a different working directory from the step's; the
sample sheet and the results folder are relative paths. The unmix, segment and
quantify steps of a 4096² slide cut into 16 chunks must give what the threaded
scheduler gives: the same labels, per-cell means to 1e-6. With the one-node
SLURM cluster of tests/workflow/cluster up (conftest's ``slurm_cluster``), the same
holds for ``dask.cluster: slurm``: two dask-jobqueue worker jobs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import TINY_PANEL, tiny_library

distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed (pip install '.[distributed]')")

SIZE, TILE, CHUNK, N_BANDS = 4096, 1024, 1024, 6
STEPS = ("unmix", "segment", "quantify")


def write_slide_project(root: Path, results: str) -> Path:
    """A 4096² x 6-band slide (a 1024² field of sparse cells repeated 4 x 4) and a config with relative paths."""
    from qdquant.io import write_ome_tiff

    root.mkdir(parents=True, exist_ok=True)
    library = tiny_library(N_BANDS)
    library.to_csv(root / "spectra.csv", index=False)
    (root / "panel.tsv").write_text(TINY_PANEL)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[-20:20, -20:20]
    d2 = yy**2 + xx**2
    dapi, er, her2 = (np.zeros((TILE, TILE), np.float32) for _ in range(3))
    for cy in range(32, TILE - 32, 64):
        for cx in range(32, TILE - 32, 64):
            if rng.random() < 0.5:
                continue
            y, x = cy + rng.integers(-8, 9), cx + rng.integers(-8, 9)
            window = np.s_[y - 20 : y + 20, x - 20 : x + 20]
            dapi[window] += 200 * (d2 < 49)
            er[window] += rng.uniform(0, 150) * (d2 < 49)
            her2[window] += rng.uniform(0, 150) * ((d2 >= 100) & (d2 < 169))
    spectra = library[["DAPI", "QD565", "QD655"]].to_numpy().T
    field = rng.poisson(np.einsum("kb,kyx->byx", spectra, np.stack([dapi, er, her2])) + 100).astype(np.uint16)
    reps = SIZE // TILE
    write_ome_tiff(root / "slide.ome.tif", np.tile(field, (1, reps, reps)), pixel_size_um=0.5, tile=1024,
                   compression=None)
    (root / "samples.tsv").write_text("sample_id\timage\ns1\tslide.ome.tif\n")
    config = {"samples": "samples.tsv", "spectra": "spectra.csv", "panel": "panel.tsv", "results": results,
              "chunk_size": CHUNK, "her2": {"marker": "HER2"}, "segmentation": {"nucleus_diameter_um": 7},
              "unmixing": {"refine_library": False}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root / "config.yaml"


def run_steps(config: Path, **dask_section) -> None:
    from qdquant import pipeline
    from qdquant.config import load_config
    from qdquant.scheduler import dask_scheduler, step_config

    raw = yaml.safe_load(config.read_text())
    raw["dask"] = dask_section
    cfg = load_config(raw, source=str(config))
    for step in STEPS:
        with dask_scheduler(cfg, threads=2) as workers:
            pipeline.STEPS[step](step_config(cfg, workers, None), "s1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same slide through the threaded scheduler and through two worker processes elsewhere."""
    root = tmp_path_factory.mktemp("distributed")
    project = root / "project"
    config = write_slide_project(project, results="results")
    elsewhere = root / "workers"
    elsewhere.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QDQUANT_PROGRESS_MIN_S", "1000")
        mp.chdir(elsewhere)  # the workers start here, and never see the project's relative paths
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                      local_directory=str(elsewhere)) as cluster:
            mp.chdir(project)
            run_steps(config, scheduler="threads")
            threaded = project / "results"
            threaded.rename(project / "results_threads")
            run_steps(config, scheduler=cluster.scheduler_address)
    return project / "results_threads" / "s1", project / "results" / "s1"


def test_labels_are_identical(runs):
    from qdquant import io

    threaded, spread = runs
    for name in ("nuclei", "cells"):
        a = io.read_labels(threaded / "unmixed.ome.zarr", name).compute()
        b = io.read_labels(spread / "unmixed.ome.zarr", name).compute()
        assert a.shape == (SIZE, SIZE)
        assert np.array_equal(a, b), name
    assert len(np.unique(a)) > 1000  # cells over every chunk


def test_abundances_and_cell_means_match(runs):
    from qdquant import io

    threaded, spread = runs
    a, names = io.read_ome_zarr(threaded / "unmixed.ome.zarr")
    b, names_b = io.read_ome_zarr(spread / "unmixed.ome.zarr")
    assert names == names_b and a.numblocks[1:] == (SIZE // CHUNK, SIZE // CHUNK)
    np.testing.assert_allclose(a.compute(), b.compute(), rtol=1e-6, atol=1e-6)
    ta = pd.read_csv(threaded / "measurements.csv")
    tb = pd.read_csv(spread / "measurements.csv")
    assert list(ta.columns) == list(tb.columns) and len(ta) == len(tb) > 1000
    assert np.array_equal(ta["CellID"], tb["CellID"])
    means = [c for c in ta.columns if c in ("DAPI", "ER", "HER2") or c.endswith("_mean")]
    np.testing.assert_allclose(ta[means].to_numpy(), tb[means].to_numpy(), rtol=1e-6, atol=1e-6)


def test_slurm_cluster_workers_give_the_threaded_results(runs, slurm_cluster, monkeypatch, capsys):
    """dask.cluster: slurm on the one-node SLURM cluster: two worker jobs of one core each."""
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed (pip install '.[distributed]')")
    from qdquant import io

    threaded, _ = runs
    project = threaded.parents[1]
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster))
    monkeypatch.setenv("QDQUANT_PROGRESS_MIN_S", "1000")
    monkeypatch.chdir(project)
    config = project / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["results"] = "results_slurm"
    config_slurm = project / "config_slurm.yaml"
    config_slurm.write_text(yaml.safe_dump(raw))
    run_steps(config_slurm, cluster="slurm",
              slurm={"jobs": 2, "cores": 1, "memory": "4GB", "walltime": "00:20:00", "start_timeout_s": 120})
    spread = project / "results_slurm" / "s1"
    for name in ("nuclei", "cells"):
        assert np.array_equal(io.read_labels(threaded / "unmixed.ome.zarr", name).compute(),
                              io.read_labels(spread / "unmixed.ome.zarr", name).compute()), name
    ta, tb = pd.read_csv(threaded / "measurements.csv"), pd.read_csv(spread / "measurements.csv")
    means = [c for c in ta.columns if c in ("DAPI", "ER", "HER2") or c.endswith("_mean")]
    assert np.array_equal(ta["CellID"], tb["CellID"])
    np.testing.assert_allclose(ta[means].to_numpy(), tb[means].to_numpy(), rtol=1e-6, atol=1e-6)
    worker_logs = list((project / "logs" / "dask-slurm").glob("*.err"))
    assert worker_logs, "no dask worker job wrote a SLURM log"
    with capsys.disabled():
        print(f"\nSLURMCluster: {len(worker_logs)} worker job logs; labels identical, {len(ta)} cells' means "
              "equal the threaded run's to 1e-6")
