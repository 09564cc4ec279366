"""The segment step: nuclei and cells, written as label images into the sample's OME-Zarr."""

from __future__ import annotations

import functools
import logging

import pandas as pd

from qdquant import io, nucleus_size, segmentation
from qdquant.config import Config
from qdquant.pipeline.common import panel_channel
from qdquant.pipeline.paths import outputs

log = logging.getLogger("qdquant")


#: With a membrane stain, a cell may grow at least this many nucleus diameters beyond its nucleus:
#: carcinoma cells are 1.4-2.2 nucleus diameters across (nuclear:cytoplasmic area 0.5-0.2), and
#: a polygonal cell's corners lie further out than its mean radius.
CELL_EXPANSION_PER_NUCLEUS = 0.6


def segment_sample(cfg: Config, sample_id: str) -> None:
    """Segment nuclei and cells; write ``labels/nuclei`` and ``labels/cells`` into the OME-Zarr.

    Also writes ``qc/nucleus_size.csv`` (the nucleus diameter used) and
    ``qc/segmentation.png``.
    """
    from qdquant import report

    out = outputs(cfg, sample_id)
    abundances, names = io.read_ome_zarr(out["zarr"], cfg.chunk_size)
    pixel_size = io.read_pixel_size_um(out["zarr"])
    nuclear_idx = panel_channel(cfg, names, "nuclear_stain", out["zarr"])
    nuclear = abundances[nuclear_idx]
    membrane_idx = panel_channel(cfg, names, "membrane_stain", out["zarr"])
    membrane = None if membrane_idx is None else abundances[membrane_idx]
    diameter = _nucleus_diameter(cfg, sample_id, nuclear, pixel_size)
    expansion = _cell_expansion(cfg, sample_id, diameter, has_membrane=membrane is not None)
    # Tiles wait for their neighbours on disk, not in memory: local disk ($TMPDIR), or beside
    # the outputs where the tasks run on a dask.distributed cluster (io.scratch_dir).
    with io.scratch_dir(out["zarr"].parent, prefix="qdquant-segment-") as scratch:
        nuclei, cells = segmentation.segment_chunked(
            nuclear,
            membrane,
            pixel_size_um=pixel_size,
            nucleus_diameter_um=diameter,
            cell_expansion_um=expansion,
            chunk_size=cfg.chunk_size,
            scratch=scratch,
            # Each tile reads its padded window straight from the store: only the stored chunks
            # under it, not the nine whole dask chunks it touches.
            read_window=functools.partial(
                _read_stain, str(out["zarr"].absolute()), {"nuclear": nuclear_idx, "membrane": membrane_idx}
            ),
        )
        io.write_labels(out["zarr"], {"nuclei": nuclei, "cells": cells}, chunk_size=cfg.chunk_size)
    report.plot_segmentation_qc(
        nuclear, io.read_labels(out["zarr"], "nuclei", cfg.chunk_size),
        io.read_labels(out["zarr"], "cells", cfg.chunk_size),
        out["segmentation_qc"],
    )


def _read_stain(path: str, channels: dict, which: str, ys, xs):
    """Window ``ys`` x ``xs`` of the ``"nuclear"`` or ``"membrane"`` stain's channel (``channels``)
    of the OME-Zarr at ``path`` (the ``read_window`` of :func:`qdquant.segmentation.segment_chunked`)."""
    return io.read_window(path, channels[which], ys, xs)


def _nucleus_diameter(cfg: Config, sample_id: str, nuclear, pixel_size: float) -> float:
    """The nucleus diameter (µm) every tile segments with, from the setting and the slide;
    recorded in ``qc/nucleus_size.csv``.

    Resolved once per slide (on a few windows of it), so that every tile uses the same size.
    """
    out = outputs(cfg, sample_id)
    hint = cfg.segmentation.nucleus_diameter_um
    used, estimate = nucleus_size.resolve_nucleus_diameter(nuclear, pixel_size, hint, hint=hint != "auto")
    log.info("%s: nucleus diameter %.2f um (setting %s, estimate %.2f um)", sample_id, used, hint, estimate)
    out["nucleus_size"].parent.mkdir(parents=True, exist_ok=True)
    io.write_csv(
        pd.DataFrame([{"hint_um": hint, "estimate_um": estimate, "used_um": used, "pixel_size_um": pixel_size}]),
        out["nucleus_size"],
    )
    return used


def _cell_expansion(cfg: Config, sample_id: str, nucleus_diameter_um: float, *, has_membrane: bool) -> float:
    """How far (µm) a cell may grow beyond its nucleus: ``segmentation.cell_expansion_um``, raised
    to :data:`CELL_EXPANSION_PER_NUCLEUS` nucleus diameters where a membrane stain stops the growth."""
    expansion = cfg.segmentation.cell_expansion_um
    if has_membrane and CELL_EXPANSION_PER_NUCLEUS * nucleus_diameter_um > expansion:
        # the membrane stain stops the growth; the cap must not stop it short of a large cell's membrane
        expansion = CELL_EXPANSION_PER_NUCLEUS * nucleus_diameter_um
        log.info("%s: cells may grow %.1f um (%.1f x the nucleus diameter; cell_expansion_um %s)", sample_id,
                 expansion, CELL_EXPANSION_PER_NUCLEUS, cfg.segmentation.cell_expansion_um)
    return expansion
