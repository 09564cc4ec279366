"""The score step: ``cells.csv`` (and ``cells.h5ad``) and ``summary.csv`` from the measurements."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from qdquant import io, quantification, scoring
from qdquant.config import Config
from qdquant.pipeline import common
from qdquant.pipeline.calibrate import her2_thresholds
from qdquant.pipeline.common import sector_arrays
from qdquant.pipeline.paths import outputs


def _gate_column(cfg: Config) -> str:
    return f"{cfg.tumour.marker}_membrane_mean"


def _scored_column(row) -> str:
    return row.marker if row.compartment == "cell" else f"{row.marker}_{row.compartment}_mean"


def tumour_threshold(cfg: Config, gate: np.ndarray) -> float:
    """The tumour gate's threshold: from the config, or fitted on ``gate`` (every cell's gate value)."""
    return scoring.tumour_threshold_auto(gate) if cfg.tumour.threshold == "auto" else float(cfg.tumour.threshold)


def score_cell_rows(cfg: Config, table: pd.DataFrame, threshold: float | None, her2: dict | None,
                    sample_id: str | None = None) -> pd.DataFrame:
    """The contract's ``cells.csv`` columns for some rows of the measurements.

    Per cell only, so any slice of the rows gives the same result for its
    cells: ``threshold`` is the tumour gate's (:func:`tumour_threshold`),
    ``her2`` the HER2 thresholds in force (:func:`her2_thresholds`).

    Laid out for scimap's ``mcmicro_to_scimap``: ``CellID`` and the
    whole-cell marker means come before ``X_centroid`` (its markers), the
    compartment means after it (its metadata); with ``sample_id``, a last
    column ``imageid`` names the sample, which scimap then uses instead of
    the file name's stem ("cells" for every sample) to name the cells.
    """
    markers = [r.marker for r in cfg.measured]
    geometry = ["X_centroid", "Y_centroid", "X_um", "Y_um", "Area", "NucleusArea", "n_flagged_px"]
    compartments = [f"{m}_{c}_mean" for m in markers for c in quantification.COMPARTMENTS]
    cells = table[["CellID", *markers, *geometry, *compartments]].copy()
    if cfg.tumour is not None:
        cells["is_tumour"] = scoring.is_tumour(table[_gate_column(cfg)].to_numpy(np.float64), threshold)
    if cfg.her2 is not None:
        sums, npx = sector_arrays(table, cfg.her2.sectors)
        intensity, completeness, klass = scoring.her2_cell_scores(
            sums, npx, **her2, complete_fraction=cfg.her2.complete_fraction
        )
        cells["her2_membrane_intensity"] = intensity
        cells["her2_completeness"] = completeness
        cells["her2_class"] = klass
    if sample_id is not None:
        cells["imageid"] = sample_id
    return cells


def _summary_columns(cfg: Config) -> list[str]:
    """The columns of the scored cells that :func:`summarise_cells` reads."""
    columns = ["is_tumour"] if cfg.tumour is not None else []
    columns += ["her2_class"] if cfg.her2 is not None else []
    return columns + [_scored_column(row) for row in cfg.scored]


def summarise_cells(cfg: Config, cells: pd.DataFrame, threshold: float | None, her2: dict | None,
                    her2_source: str | None) -> dict:
    """The ``summary.csv`` row from every cell's :func:`_summary_columns` (the scored cells)."""
    summary: dict = {"n_cells": len(cells)}
    population = np.ones(len(cells), dtype=bool)
    if cfg.tumour is not None:
        population = cells["is_tumour"].to_numpy(bool)
        summary["n_tumour_cells"] = int(population.sum())
        summary["tumour_threshold"] = threshold
    if cfg.her2 is not None:
        klass = cells["her2_class"].to_numpy()
        summary.update(scoring.her2_sample_score(klass[population], ultralow_min_pct=cfg.her2.ultralow_min_pct))
        summary.update({f"her2_{k}": v for k, v in her2.items()})
        summary["her2_thresholds_source"] = her2_source
    for row in cfg.scored:
        scores = scoring.marker_sample_scores(
            cells[_scored_column(row)].to_numpy(np.float64)[population],
            score=row.score, t1=row.t1, t2=row.t2, t3=row.t3, marker=row.marker,
        )
        summary.update(scores)
        summary[f"{row.marker}_status"] = scoring.receptor_status(scores[f"{row.marker}_pct_positive"])
    if cfg.subtype is not None:
        st = cfg.subtype
        summary["surrogate_subtype"] = scoring.surrogate_subtype(
            summary.get("her2_score"),
            summary[f"{st.er}_pct_positive"],
            summary[f"{st.pr}_pct_positive"],
            None if st.ki67 is None else summary[f"{st.ki67}_pct_positive"],
            pr_cutoff_pct=st.pr_cutoff_pct,
            ki67_cutoff_pct=st.ki67_cutoff_pct,
        )
    return summary


def score_cells(cfg: Config, table: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """From measurements to the contract's ``cells.csv`` columns and ``summary.csv`` row.

    Pure: a table in, a table and a dict out. :func:`score_sample` does the
    same in slices of rows, for tables larger than memory.
    """
    threshold = tumour_threshold(cfg, table[_gate_column(cfg)].to_numpy(np.float64)) if cfg.tumour else None
    her2, source = her2_thresholds(cfg) if cfg.her2 is not None else (None, None)
    cells = score_cell_rows(cfg, table, threshold, her2)
    return cells, summarise_cells(cfg, cells, threshold, her2, source)


def score_sample(cfg: Config, sample_id: str) -> None:
    """Write ``cells.csv``, ``cells.h5ad`` and ``summary.csv`` from the sample's measurements.

    The measurements are read :data:`~qdquant.pipeline.common.TABLE_ROWS` rows at a time and the scored
    rows appended to the outputs as they come; only the few columns the
    summary needs (:func:`_summary_columns`) are kept for every cell, so
    the memory hardly grows with the number of cells.
    """
    out = outputs(cfg, sample_id)
    threshold = None
    if cfg.tumour is not None:
        gate = io.read_csv(out["measurements"], "measurements", usecols=[_gate_column(cfg)])
        threshold = tumour_threshold(cfg, gate[_gate_column(cfg)].to_numpy(np.float64))
        del gate
    her2, source = her2_thresholds(cfg) if cfg.her2 is not None else (None, None)
    kept = []
    with io.H5adWriter(out["h5ad"], sample_id=sample_id) as h5ad:

        def scored():
            # (a table without rows still comes as one empty slice: its header is written)
            for table in io.read_csv(out["measurements"], "measurements", chunksize=common.TABLE_ROWS):
                cells = score_cell_rows(cfg, table, threshold, her2, sample_id)
                h5ad.append(cells, [r.marker for r in cfg.measured])
                kept.append(cells[_summary_columns(cfg)])
                yield cells

        io.write_csv_slices(scored(), out["cells"])
    summary = summarise_cells(cfg, pd.concat(kept, ignore_index=True), threshold, her2, source)
    if summary["n_cells"] == 0:
        warnings.warn(f"{sample_id}: no cells were found; the scores are not assessable", stacklevel=1)
    from qdquant import __version__

    io.write_csv(pd.DataFrame([{"sample_id": sample_id, **summary, "qdquant_version": __version__}]), out["summary"])
