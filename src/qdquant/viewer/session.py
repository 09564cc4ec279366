"""One sample open in the viewer: its HER2 settings, re-scoring, and the cell under the pointer.

Plain Python (no Qt): the widget only shows what this computes. Tables are
read when first needed, so opening a whole slide does not wait for them.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import cached_property

import numpy as np

from qdquant import io
from qdquant.viewer.layers import class_levels, class_lut, label_levels
from qdquant.viewer.results import (
    CsvRows,
    SampleResults,
    her2_settings,
    read_scoring_table,
    rescore,
)

__all__ = ["Her2Session"]

#: Columns of ``summary.csv`` shown beside the HER2 score: the other markers' scores.
MARKER_SUFFIXES = ("_status", "_pct_positive", "_hscore", "_allred")


class Her2Session:
    """The HER2 scoring of one sample, re-done for thresholds the user moves.

    Parameters
    ----------
    results : SampleResults
        The sample (with its ``measurements.csv`` and ``cells.csv``).
    """

    def __init__(self, results: SampleResults):
        self.results = results
        self.run_settings = her2_settings(results)
        self.settings = self.run_settings
        self.codes: np.ndarray | None = None
        self.summary: dict = {}

    @cached_property
    def table(self):
        return read_scoring_table(self.results, self.run_settings.sectors)

    @cached_property
    def cell_rows(self) -> CsvRows:
        """Where each cell's line of ``cells.csv`` starts (found at the first click)."""
        return CsvRows(self.results.table("cells.csv"))

    @cached_property
    def cell_levels(self):
        return label_levels(self.results, "cells")

    @cached_property
    def pixel_size_um(self) -> float:
        return io.read_pixel_size_um(self.results.store)

    @cached_property
    def membrane_width_px(self) -> float:
        """The segmentation's membrane ring width (the run's config, else the schema's default)."""
        import yaml

        from qdquant.config import schema

        width = schema()["properties"]["segmentation"]["properties"]["membrane_width_px"]["default"]
        if self.results.provenance is not None:
            record = yaml.safe_load(self.results.provenance.read_text(encoding="utf-8")) or {}
            width = ((record.get("config") or {}).get("segmentation") or {}).get("membrane_width_px", width)
        return float(width)

    @cached_property
    def run_summary(self) -> dict:
        path = self.results.table("summary.csv")
        return {} if path is None else io.read_csv(path, "summary").iloc[0].to_dict()

    def rescore(self, **changes) -> dict:
        """Classify every cell again with ``changes`` (``t_faint``, ``t_weak``, ``t_strong``,
        ``complete_fraction``) applied to the current settings; return the HER2 summary.

        Raises :class:`qdquant.errors.InputError` (and keeps the previous
        settings) when the thresholds are not increasing.
        """
        settings = replace(self.settings, **changes)
        codes, summary = rescore(self.table, settings)
        self.settings, self.codes, self.summary = settings, codes, summary
        return summary

    def class_levels(self):
        """The class overlay's pyramid for the current classes (lazy)."""
        lut = class_lut(self.table.cell_id, self.codes)
        return class_levels(self.cell_levels, lut)

    def marker_scores(self) -> dict:
        """The other markers' scores and the subtype, as the pipeline wrote them."""
        return {k: v for k, v in self.run_summary.items()
                if k.endswith(MARKER_SUFFIXES) or k == "surrogate_subtype"}

    def cell_at(self, y_px: float, x_px: float) -> int:
        """The cell id at a level-0 pixel (0 for background or outside the image)."""
        level0 = self.cell_levels[0]
        y, x = int(math.floor(y_px)), int(math.floor(x_px))
        if not (0 <= y < level0.shape[0] and 0 <= x < level0.shape[1]):
            return 0
        return int(level0[y, x].compute())

    def cell_row(self, cell_id: int) -> dict:
        """The cell's row of ``cells.csv``, with its class under the current thresholds."""
        row = self.cell_rows.row(cell_id)
        if self.codes is not None:
            from qdquant.scoring import HER2_CLASSES

            (index,) = np.flatnonzero(self.table.cell_id == cell_id)
            row["her2_class (thresholds now)"] = HER2_CLASSES[self.codes[index]]
        return row

    def membrane(self, cell_id: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The cell's membrane ring (as measured: ``membrane_width_px``) in a crop, and the crop's origin (px).

        Only a window around the cell's centroid is read, sized from its area.
        """
        from qdquant.segmentation import membrane_ring

        row = self.cell_rows.row(cell_id)
        half = int(math.ceil(1.5 * math.sqrt(float(row["Area"])) + self.membrane_width_px + 2))
        level0 = self.cell_levels[0]
        cy, cx = int(round(float(row["Y_centroid"]))), int(round(float(row["X_centroid"])))
        y0, x0 = max(cy - half, 0), max(cx - half, 0)
        y1, x1 = min(cy + half + 1, level0.shape[0]), min(cx + half + 1, level0.shape[1])
        crop = np.asarray(level0[y0:y1, x0:x1])
        ring = membrane_ring(crop, self.membrane_width_px) & (crop == cell_id)
        return ring.astype(np.uint8), (y0, x0)

