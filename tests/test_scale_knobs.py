"""Whole-slide knobs: the ``dask`` config section, chunk size from --mem-mb, progress bars."""

from __future__ import annotations

import io as _io
import logging
import sys

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import yaml

from qdquant.cli import main
from qdquant.config import (
    CHUNK_MEMORY_FRACTION,
    UNMIX_BYTES_PER_PX_PER_BAND,
    Dask,
    chunk_mem_mb,
    chunk_size_for,
    load_config,
    validate_config_dict,
)
from qdquant.errors import InputError
from qdquant.io import read_ome_zarr
from qdquant.scheduler import (
    PROGRESS_MIN_ENV,
    PROGRESS_MIN_S,
    StepProgress,
    dask_scheduler,
    progress_minimum,
    step_config,
)

MINIMAL = {"samples": "s.tsv", "spectra": "x.csv", "panel": "p.tsv"}


# ----------------------------------------------------------------------------
# schema and parsing


@pytest.mark.parametrize(
    "section",
    [
        {},
        {"scheduler": "threads"},
        {"scheduler": "processes", "num_workers": 4},
        {"scheduler": "synchronous", "num_workers": None},
        {"scheduler": "tcp://10.0.0.5:8786"},
        {"scheduler": "tls://scheduler.example.org:8786", "num_workers": 1},
    ],
)
def test_schema_accepts_dask_section(section):
    cfg = validate_config_dict({**MINIMAL, "dask": section})
    assert cfg["dask"]["scheduler"] == section.get("scheduler", "threads")
    assert cfg["dask"]["num_workers"] == section.get("num_workers")


def test_schema_fills_dask_defaults():
    dask = validate_config_dict(MINIMAL)["dask"]
    assert dask["scheduler"] == "threads" and dask["num_workers"] is None and dask["cluster"] is None
    assert dask["slurm"]["jobs"] == 2 and dask["slurm"]["memory"] == "16GB"


@pytest.mark.parametrize(
    "section, fragments",
    [
        ({"scheduler": "threads", "workers": 2}, ("unknown key", "'workers'", "'dask'")),
        ({"scheduler": "gpu"}, ("key 'dask.scheduler'", "'gpu'", "tcp://host:8786")),
        ({"scheduler": "tcp://"}, ("key 'dask.scheduler'",)),
        ({"scheduler": 3}, ("key 'dask.scheduler'",)),
        ({"num_workers": 0}, ("key 'dask.num_workers'",)),
        ({"num_workers": "two"}, ("key 'dask.num_workers'",)),
    ],
)
def test_schema_rejects_bad_dask_section(section, fragments):
    with pytest.raises(InputError) as e:
        validate_config_dict({**MINIMAL, "dask": section}, source="c.yaml")
    message = str(e.value)
    assert "\n" not in message and message.startswith("c.yaml: ")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_dask_section_is_parsed_into_the_config(tiny_project):
    assert load_config(tiny_project).dask == Dask(scheduler="threads", num_workers=None)
    raw = yaml.safe_load(tiny_project.read_text())
    raw["dask"] = {"scheduler": "synchronous", "num_workers": 3}
    tiny_project.write_text(yaml.safe_dump(raw))
    assert load_config(tiny_project).dask == Dask(scheduler="synchronous", num_workers=3)


# ----------------------------------------------------------------------------
# chunk size from memory


def _fits(edge, bands, workers, mem_mb):
    return workers * edge**2 * bands * UNMIX_BYTES_PER_PX_PER_BAND <= CHUNK_MEMORY_FRACTION * mem_mb * 1e6


def test_chunk_size_unchanged_without_mem_mb():
    assert chunk_size_for(2048, 31, 16, None) == 2048
    assert chunk_size_for(100, 31, 16, None) == 100


def test_chunk_size_unchanged_when_it_fits():
    # 2 workers x 2048² x 31 bands x 10 B = 2.6 GB <= 0.8 x 3500 MB
    assert chunk_size_for(2048, 31, 2, 3500) == 2048
    assert chunk_size_for(2000, 31, 2, 3500) == 2000  # fits: kept, not rounded


def test_chunk_size_shrinks_to_a_multiple_of_256():
    # budget 1.6e9 B / (2 x 31 x 10 B) = 2.58e6 px -> edge 1606 -> 1536
    assert chunk_size_for(2048, 31, 2, 2000) == 1536
    assert _fits(1536, 31, 2, 2000) and not _fits(1792, 31, 2, 2000)
    # twice the workers: half the pixels per chunk
    assert chunk_size_for(2048, 31, 4, 2000) == 1024
    # the per-pixel factor is a parameter
    assert chunk_size_for(2048, 31, 1, 2000, bytes_per_px_per_band=2 * UNMIX_BYTES_PER_PX_PER_BAND) == 1536
    for mem in (300, 700, 1234, 2999, 5000):
        for workers in (1, 2, 3, 8):
            edge = chunk_size_for(4096, 31, workers, mem)
            assert edge % 256 == 0 and 256 <= edge <= 4096
            assert edge == 256 or _fits(edge, 31, workers, mem)
            assert edge == 4096 or not _fits(edge + 256, 31, workers, mem)


def test_chunk_size_never_below_256_nor_grown():
    assert chunk_size_for(2048, 31, 16, 1) == 256
    assert chunk_size_for(300, 31, 16, 1) == 256
    assert chunk_size_for(200, 31, 16, 1) == 200  # below 256 already: never grown
    assert chunk_size_for(128, 31, 2, 10**6) == 128
    assert chunk_size_for(1000, 8, 1, 10**6) == 1000


@pytest.mark.parametrize("chunk, bands, workers", [(2048, 31, 2), (1024, 8, 1), (4096, 12, 16), (768, 31, 3)])
def test_chunk_mem_mb_is_the_smallest_memory_that_keeps_the_chunk(chunk, bands, workers):
    need = chunk_mem_mb(chunk, bands, workers)
    assert chunk_size_for(chunk, bands, workers, need) == chunk
    assert chunk_size_for(chunk, bands, workers, need - 1) < chunk


def test_step_config_applies_and_keeps_the_chunk_size(tiny_project, caplog):
    cfg = load_config(tiny_project)  # 8 bands, chunk_size 2048
    caplog.set_level(logging.INFO, logger="qdquant")
    assert step_config(cfg, 2, None) is cfg
    assert step_config(cfg, None, 1) is cfg  # distributed: the workers' memory is not the step's
    small = step_config(cfg, 2, 10)
    assert small.chunk_size == 256 and small.library is cfg.library
    assert "chunk size 256 px" in caplog.text and "mem_mb 10" in caplog.text


# ----------------------------------------------------------------------------
# the scheduler context


def _with_dask(tiny_project, **section):
    raw = yaml.safe_load(tiny_project.read_text())
    raw["dask"] = section
    tiny_project.write_text(yaml.safe_dump(raw))
    return load_config(tiny_project)


def test_scheduler_context_sets_and_restores_threads(tiny_project):
    cfg = load_config(tiny_project)
    before = (dask.config.get("scheduler", None), dask.config.get("num_workers", None))
    with dask_scheduler(cfg, threads=3) as workers:
        assert workers == 3
        assert dask.config.get("scheduler") == "threads" and dask.config.get("num_workers") == 3
        assert int(da.ones(10, chunks=2).sum().compute()) == 10
    assert (dask.config.get("scheduler", None), dask.config.get("num_workers", None)) == before


def test_config_num_workers_beats_threads(tiny_project):
    cfg = _with_dask(tiny_project, scheduler="threads", num_workers=5)
    with dask_scheduler(cfg, threads=2) as workers:
        assert workers == 5 and dask.config.get("num_workers") == 5


def test_scheduler_context_synchronous(tiny_project):
    cfg = _with_dask(tiny_project, scheduler="synchronous")
    with dask_scheduler(cfg, threads=4) as workers:
        assert workers == 1 and dask.config.get("scheduler") == "synchronous"
        assert int(da.ones(10, chunks=2).sum().compute()) == 10


def test_scheduler_context_processes(tiny_project):
    cfg = _with_dask(tiny_project, scheduler="processes", num_workers=1)
    with dask_scheduler(cfg, threads=4) as workers:
        assert workers == 1
        scheduler = dask.config.get("scheduler")
        assert callable(scheduler) and scheduler.func is dask.multiprocessing.get
        assert int(da.arange(10, chunks=5).sum().compute()) == 45


def test_address_without_distributed_is_a_one_line_error(tiny_project, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    cfg = _with_dask(tiny_project, scheduler="tcp://127.0.0.1:8786")
    with pytest.raises(InputError) as e:
        with dask_scheduler(cfg):
            pass
    message = str(e.value)
    assert "\n" not in message and "dask.scheduler" in message and "tcp://127.0.0.1:8786" in message
    assert "distributed" in message
    # and through the command line: exit 2, one line
    assert main(["unmix", "--config", str(tiny_project), "--sample", "s1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qdquant: error:") and "dask.scheduler" in err[0]


def test_lazily_read_cube_can_be_sent_to_other_processes(tiny_project):
    """The processes scheduler and distributed workers get the cube by pickling its graph."""
    import pickle

    from qdquant.io import open_cube

    image = tiny_project.parent / "s1.ome.tif"
    with open_cube(image, chunk_size=32) as cube:
        expected = cube.data.compute()
        copy = pickle.loads(pickle.dumps(cube.data))
        np.testing.assert_array_equal(copy.compute(scheduler="synchronous"), expected)
        assert expected.shape == (8, 64, 64) and expected.any()


# ----------------------------------------------------------------------------
# progress bars


def test_progress_bar_shows_outer_computations_only():
    out = _io.StringIO()

    def inner(block):  # a computation started inside a task (a worker thread)
        return block + da.from_array(np.ones(4), chunks=2).sum().compute()

    with dask.config.set(scheduler="threads"), StepProgress(minimum=0, out=out):
        x = da.ones(8, chunks=2).map_blocks(inner, dtype=float, meta=np.empty(0))
        assert float(x.sum().compute()) == 8 * 5
    assert out.getvalue().count("100% Completed") == 1


def test_progress_bar_redraws_only_when_the_percentage_moves():
    out = _io.StringIO()
    bar = StepProgress(minimum=0, out=out)
    for frac, elapsed in ((0.5, 1.0), (0.501, 2.0), (0.5, 3.0), (0.6, 4.0), (1.0, 5.0)):
        bar._draw_bar(frac, elapsed)
    assert [line.split("|")[1].strip() for line in out.getvalue().split("\r")[1:]] == [
        "50% Completed", "60% Completed", "100% Completed"]


def test_progress_minimum_from_the_environment(monkeypatch):
    monkeypatch.delenv(PROGRESS_MIN_ENV, raising=False)
    assert progress_minimum() == PROGRESS_MIN_S > 0
    monkeypatch.setenv(PROGRESS_MIN_ENV, "0")
    assert progress_minimum() == 0
    monkeypatch.setenv(PROGRESS_MIN_ENV, "soon")
    assert progress_minimum() == PROGRESS_MIN_S


def test_progress_bar_waits_for_its_minimum():
    out = _io.StringIO()
    with StepProgress(minimum=60, out=out):
        da.ones(8, chunks=2).sum().compute()
    assert out.getvalue() == ""


# ----------------------------------------------------------------------------
# a step run by the command line with little memory


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    from qdquant import simulate

    root = tmp_path_factory.mktemp("scale")
    slide = simulate.simulate_slide(her2_score="2+", shape=(320, 320), seed=11)
    image = simulate.write_slide(slide, root / "slides", "small")["image"]
    (root / "samples.tsv").write_text(f"sample_id\timage\nsmall\t{image}\n")
    return root


def _repo_config(root, name):
    from conftest import repo_config

    return repo_config(root / f"{name}.yaml", root / "samples.tsv", root / name, unmixing={"refine_library": False})


def test_step_with_little_memory_uses_smaller_chunks_and_same_outputs(small_slide, monkeypatch, capsys, caplog):
    """--mem-mb forces 256-px chunks in unmix; later steps (default chunks) read that zarr; same cells."""
    monkeypatch.setenv("QDQUANT_PROGRESS_MIN_S", "0")
    caplog.set_level(logging.INFO, logger="qdquant")
    plain, tight = _repo_config(small_slide, "plain"), _repo_config(small_slide, "tight")

    assert main(["unmix", "--config", str(tight), "--sample", "small", "--threads", "1", "--mem-mb", "5"]) == 0
    err = capsys.readouterr().err
    assert "% Completed" in err  # a progress bar (minimum 0)
    assert "chunk size 256 px" in caplog.text
    caplog.clear()
    assert main(["unmix", "--config", str(plain), "--sample", "small", "--threads", "1"]) == 0
    assert "chunk size 2048 px" in caplog.text

    def level0(name):  # as stored: dask chunks are the zarr's
        return read_ome_zarr(small_slide / name / "small" / "unmixed.ome.zarr")[0]

    assert level0("tight").chunksize[1:] == (256, 256)
    assert level0("plain").chunksize[1:] == (320, 320)
    np.testing.assert_array_equal(level0("tight").compute(), level0("plain").compute())

    for step in ("segment", "quantify"):  # default chunk size over a zarr stored in 256-px chunks
        for config in (tight, plain):
            assert main([step, "--config", str(config), "--sample", "small", "--threads", "1"]) == 0
    tables = {n: pd.read_csv(small_slide / n / "small" / "measurements.csv") for n in ("tight", "plain")}
    assert len(tables["plain"]) > 50
    geometry = ["CellID", "X_centroid", "Y_centroid", "Area", "NucleusArea"]
    pd.testing.assert_frame_equal(tables["tight"][geometry], tables["plain"][geometry])
    clean = (tables["tight"]["n_flagged_px"] == 0) & (tables["plain"]["n_flagged_px"] == 0)
    assert clean.mean() > 0.9
    np.testing.assert_allclose(tables["tight"].loc[clean, "HER2"], tables["plain"].loc[clean, "HER2"], rtol=1e-6)


def test_slurm_cluster_settings_are_validated(tiny_project):
    cfg = _with_dask(tiny_project, cluster="slurm", slurm={"jobs": 3, "queue": "gpu"})
    assert cfg.dask.cluster == "slurm"
    assert cfg.dask.slurm["jobs"] == 3 and cfg.dask.slurm["queue"] == "gpu" and cfg.dask.slurm["cores"] == 4
    for section, words in [({"cluster": "pbs"}, ["dask.cluster", "pbs"]),
                           ({"cluster": "slurm", "scheduler": "tcp://h:8786"}, ["dask.cluster", "dask.scheduler"]),
                           ({"cluster": "slurm", "slurm": {"memory": "lots"}}, ["dask.slurm.memory"]),
                           ({"slurm": {"jobs": 2}}, ["dask.slurm", "dask.cluster: slurm"])]:
        with pytest.raises(InputError) as e:
            _with_dask(tiny_project, **section)
        assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), (section, str(e.value))


def test_slurm_cluster_without_dask_jobqueue_is_a_one_line_error(tiny_project, monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import dask_jobqueue -> ImportError
    cfg = _with_dask(tiny_project, cluster="slurm")
    with pytest.raises(InputError) as e:
        with dask_scheduler(cfg):
            pass
    assert "\n" not in str(e.value) and "dask.cluster" in str(e.value) and "qdquant[distributed]" in str(e.value)
