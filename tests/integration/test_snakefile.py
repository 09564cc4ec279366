"""The workflow's rules as Snakemake reads them (no run: the runs are in tests/workflow)."""

import shutil
from pathlib import Path

from snakemake.api import SnakemakeApi
from snakemake.io import is_flagged
from snakemake.settings.types import ResourceSettings

from conftest import REPO


def test_snakemake_report_registers_the_qc_figures_and_the_cohort_page(tmp_path, monkeypatch):
    """``snakemake --report`` takes the outputs flagged report(): the QC PNGs and both pages."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    monkeypatch.chdir(tmp_path)
    with SnakemakeApi() as api:
        workflow = api.workflow(resource_settings=ResourceSettings(), snakefile=REPO / "workflow" / "Snakefile",
                                workdir=tmp_path)._workflow
        flagged = {Path(str(f)).name for rule in workflow.rules for f in rule.output if is_flagged(f, "report")}
    assert {"unmixing.png", "segmentation.png", "her2_thresholds.png", "report.html", "cohort_report.html",
            "her2_class_map.png", "her2_intensity_histogram.png", "her2_completeness_vs_intensity.png"} <= flagged
