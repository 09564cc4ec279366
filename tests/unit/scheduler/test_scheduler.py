"""Whole-slide knobs of qdquant.scheduler: the step's config for its memory, the dask scheduler
context, progress bars (the ``dask`` config section and chunk sizes: tests/unit/config)."""

from __future__ import annotations

import io as _io
import logging
import sys

import dask
import dask.array as da
import numpy as np
import pytest
import yaml

from qdquant.cli import main
from qdquant.config import load_config
from qdquant.errors import InputError
from qdquant.scheduler import (
    PROGRESS_MIN_ENV,
    PROGRESS_MIN_S,
    StepProgress,
    dask_scheduler,
    progress_minimum,
    step_config,
)

# ----------------------------------------------------------------------------
# the step's config


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
