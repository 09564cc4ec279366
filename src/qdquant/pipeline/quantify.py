"""The quantify step: every cell measured (``measurements.csv``), HER2 membrane sectors included."""

from __future__ import annotations

import logging

from qdquant import io, quantification
from qdquant.config import Config
from qdquant.pipeline import common
from qdquant.pipeline.common import SECTOR_NPX, SECTOR_SUM, channel_index, flagged_mask
from qdquant.pipeline.paths import outputs

log = logging.getLogger("qdquant")


def quantify_sample(cfg: Config, sample_id: str) -> None:
    """Measure every cell (contract columns) and the HER2 membrane sectors."""
    out = outputs(cfg, sample_id)
    abundances, names = io.read_ome_zarr(out["zarr"], cfg.chunk_size)
    pixel_size = io.read_pixel_size_um(out["zarr"])
    cells = io.read_labels(out["zarr"], "cells", cfg.chunk_size)
    nuclei = io.read_labels(out["zarr"], "nuclei", cfg.chunk_size)
    flagged = flagged_mask(out["zarr"], cfg.chunk_size)
    measured = cfg.measured
    channels = abundances[[channel_index(names, r.endmember, out["zarr"]) for r in measured]]
    width = cfg.segmentation.membrane_width_px
    table = quantification.measure_cells(
        cells, nuclei, channels, [r.marker for r in measured], width,
        pixel_size_um=pixel_size, flagged=flagged, block_size=cfg.chunk_size,
    )
    if cfg.her2 is not None:
        her2_row = cfg.panel_row(marker=cfg.her2.marker)
        sums, npx = quantification.membrane_sectors(
            cells,
            abundances[channel_index(names, her2_row.endmember, out["zarr"])],
            table["CellID"].to_numpy(),
            table[["Y_centroid", "X_centroid"]].to_numpy(),
            width,
            sectors=cfg.her2.sectors,
            flagged=flagged,
            block_size=cfg.chunk_size,
        )
    log.info("measured %d cells in %s", len(table), sample_id)

    def slices():
        # A slice of rows at a time, the sector columns joined per slice: the
        # whole table with its 2 x sectors extra columns is never built.
        for start in range(0, max(len(table), 1), common.TABLE_ROWS):
            part = table.iloc[start : start + common.TABLE_ROWS]
            if cfg.her2 is not None:
                rows = slice(start, start + len(part))
                part = part.assign(
                    **{SECTOR_SUM.format(s): sums[rows, s] for s in range(cfg.her2.sectors)},
                    **{SECTOR_NPX.format(s): npx[rows, s] for s in range(cfg.her2.sectors)},
                )
            yield part

    io.write_csv_slices(slices(), out["measurements"])
