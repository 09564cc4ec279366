"""The workflow on a real one-node SLURM cluster with ``--profile profiles/slurm``.

conftest's ``slurm_cluster`` starts munged, MariaDB, slurmdbd, slurmctld and
slurmd (tests/workflow/cluster/slurm_cluster.sh) and stops exactly those at the end of
the session; the test is skipped where the Debian packages are not installed.
The jobs must show in SLURM's accounting (``sacct``) as completed (the
profile runs a sample's five steps as one job, then the cohort step), and
the outputs must equal a local run's: every CSV byte for byte, every Zarr
array.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import REPO, RUN_SAMPLE, SNAKEMAKE, assert_same_outputs, simulated_slides, workflow_project

#: SLURM jobs of a one-sample run: the sample's group job (its five steps) and the cohort step.
EXPECTED_JOBS = 2


def sacct(conf: Path, since: str) -> list[dict]:
    fields = ["JobID", "JobName", "State", "Elapsed", "AllocCPUS", "ReqMem", "Timelimit", "Comment"]
    out = subprocess.run(["sacct", "-a", "-X", "-n", "-P", "-S", since, "-o", ",".join(fields)],
                         capture_output=True, text=True, env={**os.environ, "SLURM_CONF": str(conf)}, check=True)
    return [dict(zip(fields, line.split("|"))) for line in out.stdout.splitlines() if line.strip()]


def test_workflow_on_slurm_equals_a_local_run(slurm_cluster, reference_run, tmp_path, capsys):
    slides = simulated_slides(tmp_path, [RUN_SAMPLE])
    work = workflow_project(tmp_path / "slurm", slides)
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1))
    started = time.monotonic()
    proc = subprocess.run(
        [*SNAKEMAKE, "--directory", str(work), "--profile", str(REPO / "profiles" / "slurm"),
         # poll SLURM every few seconds instead of the profile's 30 (a cohort's jobs take minutes)
         "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "3"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "SLURM_CONF": str(slurm_cluster)},
    )
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    jobs = sacct(slurm_cluster, since)
    compared = assert_same_outputs(reference_run, work / "results")
    with capsys.disabled():
        print(f"\nSLURM: {len(jobs)} jobs seen by sacct, workflow wall time {wall:.0f} s:")
        for job in jobs:
            print("  " + "  ".join(f"{k}={v}" for k, v in job.items()))
        print(f"SLURM run equals the local run: {len(compared)} CSVs and Zarr arrays identical")
    assert len(jobs) == EXPECTED_JOBS, jobs
    assert all(job["State"] == "COMPLETED" for job in jobs), jobs
    comments = " ".join(job["Comment"] for job in jobs)
    assert "rule_sample_" in comments and "rule_cohort" in comments, jobs  # the group job, the cohort job
    for rule in ("unmix", "segment", "quantify", "score", "report", "cohort"):  # ran inside those jobs
        assert f"rule {rule}:" in proc.stdout + proc.stderr, rule
