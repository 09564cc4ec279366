"""A sample's results as the viewer sees them: where they are, the HER2 settings, re-scoring.

No napari or Qt here: these are plain functions, tested without a viewer;
pandas and the scoring code are imported when a table is first read, so
that :func:`locate` (napari's reader asks it about every path) is cheap.
Re-scoring calls the pipeline's own :func:`qdquant.scoring.her2_cell_scores`
and :func:`qdquant.scoring.her2_sample_score` on the per-sector sums of
``measurements.csv``, so a threshold moved in the viewer classifies every
cell exactly as a pipeline run with that threshold in its config would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qdquant.errors import InputError

if TYPE_CHECKING:
    from qdquant.config.model import Her2

__all__ = ["SampleResults", "locate", "her2_settings", "read_scoring_table", "rescore"]

#: The name of the abundance store inside a sample's results folder (contract).
STORE = "unmixed.ome.zarr"
SECTOR_SUM = "her2_sector_sum_{:02d}"
SECTOR_NPX = "her2_sector_npx_{:02d}"


@dataclass(frozen=True)
class SampleResults:
    """Where one sample's results are.

    ``folder`` is ``{results}/{sample_id}/`` when the store sits in one (its
    CSV tables beside it), None for a bare ``unmixed.ome.zarr``.
    """

    store: Path
    folder: Path | None

    @property
    def sample_id(self) -> str:
        return self.folder.name if self.folder is not None else self.store.name.removesuffix(".ome.zarr")

    def table(self, name: str) -> Path | None:
        """``cells.csv``, ``measurements.csv``, ... of the sample, or None when absent."""
        path = None if self.folder is None else self.folder / name
        return path if path is not None and path.is_file() else None

    @property
    def provenance(self) -> Path | None:
        """The run's ``{results}/provenance/params.yml`` (resolved config), when there is one."""
        path = None if self.folder is None else self.folder.parent / "provenance" / "params.yml"
        return path if path is not None and path.is_file() else None


def _is_multiscale_image(path: Path) -> bool:
    """An OME-Zarr (v2 layout) multiscale image with named channels: two small JSON reads at most."""
    attrs = path / ".zattrs"
    if not attrs.is_file():
        return False
    try:
        meta = json.loads(attrs.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return "multiscales" in meta and "omero" in meta


def locate(path) -> SampleResults | None:
    """A sample's results from a results folder or a bare ``unmixed.ome.zarr``; None for anything else.

    Cheap (a few ``stat`` calls and one small JSON read) so that napari can
    ask it about every path it opens.
    """
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        path = Path(path)
    except TypeError:
        return None
    if (path / STORE).is_dir() and _is_multiscale_image(path / STORE):
        return SampleResults(store=path / STORE, folder=path)
    if path.name.endswith(".ome.zarr") and _is_multiscale_image(path):
        folder = path.parent if path.name == STORE and (path.parent / "cells.csv").is_file() else None
        return SampleResults(store=path, folder=folder)
    return None


def her2_settings(results: SampleResults) -> Her2:
    """The HER2 settings in force for the sample, as the config's ``her2`` section.

    The thresholds are those ``summary.csv`` records (calibrated or not);
    ``complete_fraction``, ``sectors`` and ``ultralow_min_pct`` come from the
    run's ``provenance/params.yml``, else the config schema's defaults.
    """
    import pandas as pd
    import yaml

    from qdquant import io
    from qdquant.config import schema
    from qdquant.config.model import Her2

    defaults = schema()["properties"]["her2"]["properties"]
    values = {k: defaults[k]["default"] for k in ("marker", "t_faint", "t_weak", "t_strong", "complete_fraction",
                                                  "sectors", "ultralow_min_pct") if "default" in defaults[k]}
    if results.provenance is not None:
        record = yaml.safe_load(results.provenance.read_text(encoding="utf-8")) or {}
        values.update({k: v for k, v in ((record.get("config") or {}).get("her2") or {}).items() if k in values})
    summary_path = results.table("summary.csv")
    if summary_path is not None:
        row = io.read_csv(summary_path, "summary").iloc[0]
        values.update({k: float(row[f"her2_{k}"]) for k in ("t_faint", "t_weak", "t_strong")
                       if f"her2_{k}" in row and pd.notna(row[f"her2_{k}"])})
    return Her2(**{k: v if k == "marker" else int(v) if k == "sectors" else float(v) for k, v in values.items()})


#: Rows of ``measurements.csv`` parsed at a time (the parser's buffers grow with it: 78 MB at 20 000).
READ_ROWS = 5_000

#: Cells classified at a time by :func:`rescore`.
RESCORE_ROWS = 20_000


@dataclass(frozen=True)
class ScoringTable:
    """What re-scoring needs of every cell, in ``cells.csv`` order."""

    cell_id: np.ndarray          # (n,) int
    sector_sum: np.ndarray       # (n, S) float64
    sector_npx: np.ndarray       # (n, S) int32
    population: np.ndarray       # (n,) bool: the cells the sample's score is over (tumour cells)


def read_scoring_table(results: SampleResults, sectors: int) -> ScoringTable:
    """The per-sector HER2 sums of every cell (``measurements.csv``) and who is scored (``cells.csv``).

    Read as the score step reads them (float64 sums, whole pixel counts),
    so that re-scoring reproduces its classes exactly; a slice of rows at a
    time into the arrays, so a whole slide's table is never parsed at once
    (277 390 cells: 0.5 GB less at the peak).
    """
    from qdquant import io

    measurements, cells = results.table("measurements.csv"), results.table("cells.csv")
    if measurements is None or cells is None:
        raise InputError(f"{results.folder or results.store}: no measurements.csv and cells.csv beside the store")
    sum_cols = [SECTOR_SUM.format(s) for s in range(sectors)]
    npx_cols = [SECTOR_NPX.format(s) for s in range(sectors)]
    header = io.read_csv(cells, "cells", nrows=0).columns
    scored = io.read_csv(cells, "cells", usecols=["CellID", *(["is_tumour"] if "is_tumour" in header else [])])
    cell_id = scored["CellID"].to_numpy(np.int64)
    # pixel counts fit int32 (a sector holds far fewer than 2**31 pixels): the same values, half the memory
    sums, npx = np.empty((len(cell_id), sectors)), np.empty((len(cell_id), sectors), np.int32)
    start = stop = 0
    for part in io.read_csv(measurements, "measurements", usecols=["CellID", *sum_cols, *npx_cols],
                            dtype={**dict.fromkeys(sum_cols, np.float64), **dict.fromkeys(npx_cols, np.int64)},
                            chunksize=READ_ROWS):
        stop = start + len(part)
        if stop > len(cell_id) or not np.array_equal(part["CellID"].to_numpy(), cell_id[start:stop]):
            break
        sums[start:stop], npx[start:stop] = part[sum_cols].to_numpy(), part[npx_cols].to_numpy()
        start = stop
    if start != len(cell_id) or stop != start:
        raise InputError(f"{cells}: its cells are not those of {measurements} (rerun the score step)")
    population = (scored["is_tumour"].to_numpy(bool) if "is_tumour" in scored
                  else np.ones(len(scored), dtype=bool))
    return ScoringTable(cell_id=cell_id, sector_sum=sums, sector_npx=npx, population=population)


def rescore(table: ScoringTable, settings: Her2) -> tuple[np.ndarray, dict]:
    """Every cell's HER2 class code (0..3, index into ``HER2_CLASSES``) and the sample's HER2 summary.

    The pipeline's functions with the given settings: the classes equal the
    ``her2_class`` column and the summary the ``her2_*`` columns a score
    step with these thresholds writes.
    """
    import pandas as pd

    from qdquant import scoring

    # a slice of cells at a time: the rule's (cells, sectors) temporaries stay small on a whole slide
    step = RESCORE_ROWS
    klass = np.concatenate([
        scoring.her2_cell_scores(table.sector_sum[i : i + step], table.sector_npx[i : i + step],
                                 **settings.thresholds, complete_fraction=settings.complete_fraction)[2]
        for i in range(0, max(len(table.cell_id), 1), step)
    ])
    summary = scoring.her2_sample_score(klass[table.population], ultralow_min_pct=settings.ultralow_min_pct)
    codes = pd.Categorical(klass, categories=scoring.HER2_CLASSES).codes
    return codes.astype(np.uint8), summary


class CsvRows:
    """One row of a large CSV by ``CellID``, read from its line: the table is never held.

    The first use reads the ``CellID`` column and where each line starts
    (a pass over the file in 16 MiB pieces); a row is then a seek and the
    parse of one line, its values exactly as the file writes them.
    """

    PIECE = 16 << 20

    def __init__(self, path):
        self.path = path
        from qdquant import io

        self.ids = io.read_csv(path, "cells", usecols=["CellID"])["CellID"].to_numpy(np.int64)
        starts = []
        with open(path, "rb") as f:
            self.header = f.readline().decode()
            position = f.tell()
            while piece := f.read(self.PIECE):
                ends = np.flatnonzero(np.frombuffer(piece, np.uint8) == ord("\n"))
                starts.append(position + ends + 1)
                position += len(piece)
        self.starts = np.concatenate([[len(self.header.encode())], *starts])[: len(self.ids)]

    def row(self, cell_id: int) -> dict:
        """The cell's row as a dict (``CellID`` first); KeyError when the file has no such cell."""
        import io as _io

        import pandas as pd

        hits = np.flatnonzero(self.ids == cell_id)
        if not hits.size:
            raise KeyError(cell_id)
        with open(self.path, "rb") as f:
            f.seek(int(self.starts[hits[0]]))
            line = f.readline().decode()
        table = pd.read_csv(_io.StringIO(self.header + line), dtype={"her2_class": str})
        return table.iloc[0].to_dict()
