"""The report steps: a sample's one-page report, and the cohort's table, page and provenance."""

from __future__ import annotations

import json

import pandas as pd

from qdquant import io
from qdquant.config import Config
from qdquant.pipeline.paths import outputs, provenance_path


def report_sample(cfg: Config, sample_id: str) -> None:
    """QC figures and the one-page ``report.html``."""
    from qdquant import report

    report.write_sample_report(cfg, sample_id, outputs(cfg, sample_id))


def cohort(cfg: Config) -> None:
    """``cohort_summary.csv`` (every sample's summary row), ``cohort_report.html`` and the run's
    ``provenance/params.yml``."""
    from qdquant import report

    rows = [io.read_csv(outputs(cfg, s.sample_id)["summary"], "summary") for s in cfg.samples]
    table = pd.concat(rows, ignore_index=True)
    io.write_csv(table, cfg.results / "cohort_summary.csv")
    warnings = {}
    for sample, row in zip(cfg.samples, rows):
        stats_path = outputs(cfg, sample.sample_id)["unmixing_qc"].with_suffix(".json")
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
        warnings[str(row["sample_id"].iloc[0])] = report.sample_warnings(row.iloc[0].to_dict(), stats, cfg)
    report.write_cohort_report(cfg, table, cfg.results / "cohort_report.html", warnings)
    write_provenance(cfg)


def write_provenance(cfg: Config) -> None:
    """``{results}/provenance/params.yml``: resolved config, thresholds and library used per sample,
    versions and input checksums (:func:`qdquant.provenance.run_record`)."""
    import yaml

    from qdquant import provenance

    record = provenance.run_record(cfg, outputs, started=provenance.run_start(provenance_path(cfg).parent))
    with io.atomic_path(provenance_path(cfg)) as tmp:
        tmp.write_text(yaml.safe_dump(record, sort_keys=False, allow_unicode=True), encoding="utf-8")
