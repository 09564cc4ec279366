"""Kill and resume, and determinism: the workflow on one test slide (and the cohort step).

The uninterrupted run is conftest's ``reference_run`` (two cores, chunk_size 2048).

A run whose Snakemake and jobs are killed with SIGKILL while unmixing, while
segmenting and while reporting, and restarted each time (``--unlock``, then
``--rerun-incomplete``), ends with outputs identical to an uninterrupted run's:
every CSV byte for byte and every array of the OME-Zarr store; and so does a run
on one core with another chunk size (which holds the 512² slide in one chunk too:
tests/integration/test_chunking.py cuts a slide into several). The resumed run's
provenance record gives the resumed run's start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from conftest import RUN_SAMPLE, SNAKEMAKE, assert_same_outputs, simulated_slides, workflow_project
from qdquant import provenance

SAMPLE = RUN_SAMPLE


def snakemake_args(work: Path, *args: str) -> list[str]:
    return [*SNAKEMAKE, "--directory", str(work), *args]


def run_to_end(work: Path, *args: str) -> None:
    proc = subprocess.run(snakemake_args(work, "--cores", "2", *args), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def group_alive(pgid: int) -> list[int]:
    """Processes still in a process group (zombies, which PID 1 reaps late, are not alive)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(entry.name))
    return alive


def kill_when(work: Path, ready, what: str, timeout: float = 300) -> None:
    """Start the workflow in its own process group and SIGKILL the whole group once ``ready()``."""
    proc = subprocess.Popen(snakemake_args(work, "--cores", "2", "--rerun-incomplete"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"the workflow ended (rc {proc.returncode}) before {what}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for _ in range(100):
        if not group_alive(proc.pid):
            break
        time.sleep(0.05)
    assert not group_alive(proc.pid), f"processes survived the kill: {group_alive(proc.pid)}"
    print(f"killed snakemake and its jobs {what}")
    subprocess.run(snakemake_args(work, "--unlock"), capture_output=True, timeout=120, check=True)


def started_for(log: Path, seconds: float):
    """True once the step's log has existed for this long (the step is running: its outputs are not there)."""
    first = []

    def ready():
        if log.exists() and not first:
            first.append(time.monotonic())
        return bool(first) and time.monotonic() - first[0] >= seconds
    return ready


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return simulated_slides(tmp_path_factory.mktemp("slides"), [SAMPLE])


def test_killed_runs_resume_to_identical_outputs(reference_run, slides, tmp_path):
    work = workflow_project(tmp_path / "killed", slides)
    out = work / "results" / SAMPLE

    def mid_unmix():  # the store is being written under its temporary name
        return out.is_dir() and any(p.name.startswith(".unmixed.tmp-") for p in out.iterdir())

    def mid_segment():  # the label images are being built beside the store
        return out.is_dir() and any(p.name.startswith(".unmixed.ome.zarr.labels-tmp-") for p in out.iterdir())

    kill_when(work, mid_unmix, "while unmix writes its store")
    # no file of the store: only the folders Snakemake makes for the step's declared outputs
    assert not [p for p in (out / "unmixed.ome.zarr").rglob("*") if p.is_file()]
    kill_when(work, mid_segment, "while segment writes its labels")
    assert not (out / "unmixed.ome.zarr" / "labels" / "cells").exists()
    # half a second into the report job: its interpreter is still starting on an idle machine
    # (at 2 s a fast report had already written report.html)
    kill_when(work, started_for(work / "logs" / "report" / f"{SAMPLE}.log", 0.5), "during the report")
    assert not (out / "report.html").exists()
    resumed = datetime.now(timezone.utc).replace(microsecond=0)
    run_to_end(work, "--rerun-incomplete")
    compared = assert_same_outputs(reference_run, work / "results")
    leftovers = [p for p in (work / "results").rglob("*") if ".tmp-" in p.name or p.name.startswith(".qdquant-")]
    assert not leftovers, leftovers
    # the record's start is the resumed run's, not the first run's (whose unmix outputs are still there)
    folder = work / "results" / "provenance"
    run = yaml.safe_load((folder / "params.yml").read_text())["run"]
    assert resumed <= datetime.fromisoformat(run["started"]) <= datetime.fromisoformat(run["finished"]), run
    assert not (folder / provenance.RUN_START_FILE).exists()  # the note goes when the run ends
    print(f"resumed run equals the uninterrupted one: {len(compared)} CSVs and Zarr arrays identical")


def test_one_core_and_another_chunk_size_give_identical_outputs(reference_run, slides, tmp_path):
    """--cores 1 and chunk_size 1024 (both chunkings hold the 512² slide in one chunk: another
    chunking is tests/integration/test_chunking.py's)."""
    work = workflow_project(tmp_path / "other", slides, chunk_size=1024)
    proc = subprocess.run(snakemake_args(work, "--cores", "1"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    compared = assert_same_outputs(reference_run, work / "results")
    print(f"--cores 1 / chunk_size 1024 equals --cores 2 / chunk_size 2048: {len(compared)} files and arrays")
