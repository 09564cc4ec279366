"""The workflow layer: every test here runs the workflow, a cluster or a notebook, and is marked
``slow`` (``pytest -m "not slow"`` leaves the whole folder out).

Fixtures: ``reference_run`` (one uninterrupted workflow run, shared by the resume and SLURM
tests) and ``slurm_cluster``. Plain helpers (``SNAKEMAKE``, ``workflow_project``, ...) are in
tests/conftest.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import RUN_SAMPLE, SNAKEMAKE, simulated_slides, workflow_project

WORKFLOW_TESTS = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark every test under tests/workflow ``slow`` (the hook sees the whole session's items)."""
    for item in items:
        if item.path.resolve().is_relative_to(WORKFLOW_TESTS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """The workflow run uninterrupted, locally, on two cores (chunk_size 2048) on one test slide;
    returns its results folder."""
    import subprocess

    slides = simulated_slides(tmp_path_factory.mktemp("slides"), [RUN_SAMPLE])
    work = workflow_project(tmp_path_factory.mktemp("reference"), slides)
    proc = subprocess.run([*SNAKEMAKE, "--directory", str(work), "--cores", "2"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work / "results"


SLURM_SCRIPT = WORKFLOW_TESTS / "cluster" / "slurm_cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node SLURM cluster (tests/workflow/cluster/slurm_cluster.sh) for the session; yields its
    SLURM_CONF. Skipped where the Debian packages, root or the executor plugin are missing."""
    import importlib.util
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("the one-node SLURM cluster needs root (it starts munged, slurmd and MariaDB)")
    lacking = subprocess.run(["bash", str(SLURM_SCRIPT), "missing"], capture_output=True, text=True).stdout.split()
    if lacking:
        pytest.skip(f"SLURM is not installed (missing {', '.join(lacking)}; apt-get install munge slurm-client"
                    " slurmctld slurmd slurmdbd mariadb-server)")
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("snakemake-executor-plugin-slurm is not installed (pip install '.[slurm]')")
    import shutil
    import tempfile

    # not under pytest's private tmp folder: the daemons that drop root must reach their files
    state = Path(tempfile.mkdtemp(prefix="qdquant-slurm-"))
    state.chmod(0o755)
    env = {**os.environ, "QDQUANT_SLURM_DIR": str(state)}
    proc = subprocess.run(["bash", str(SLURM_SCRIPT), "start"], capture_output=True, text=True, env=env, timeout=180)
    try:
        assert proc.returncode == 0, f"the SLURM cluster did not start: {proc.stderr[-2000:]}"
        yield state / "slurm.conf"
    finally:
        stop = subprocess.run(["bash", str(SLURM_SCRIPT), "stop"], capture_output=True, text=True, env=env,
                              timeout=120)
        print(stop.stderr)
        if stop.returncode == 0:
            shutil.rmtree(state, ignore_errors=True)
