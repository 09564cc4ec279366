"""What the steps share: errors that name the file, channels found by endmember, and the
layout of ``measurements.csv`` (its sector columns, the rows handled at a time)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd

from qdquant import io
from qdquant.config import Config
from qdquant.errors import InputError


#: Rows of a per-cell table written or scored at a time (measurements, cells.csv):
#: the peak memory then hardly grows with the number of cells.
TABLE_ROWS = 20_000

#: ``measurements.csv``'s columns of each cell's HER2 membrane sectors, sector by sector:
#: the sum of the HER2 abundance over the sector's ring pixels, and their number.
SECTOR_SUM = "her2_sector_sum_{:02d}"
SECTOR_NPX = "her2_sector_npx_{:02d}"


def sector_arrays(table: pd.DataFrame, sectors: int) -> tuple[np.ndarray, np.ndarray]:
    """The (cells, sectors) sums and pixel counts of the sector columns of some measurements."""
    sums = table[[SECTOR_SUM.format(s) for s in range(sectors)]].to_numpy(np.float64)
    npx = table[[SECTOR_NPX.format(s) for s in range(sectors)]].to_numpy(np.int64)
    return sums, npx


@contextlib.contextmanager
def naming(path: Path):
    """Name ``path`` in any InputError a stage function raises while working on it."""
    try:
        yield
    except InputError as exc:
        if str(path) in str(exc):
            raise
        raise InputError(f"{path}: {exc}") from None


def channel_index(names: list[str], endmember: str, zarr_path: Path) -> int:
    """Index of an endmember's channel in the unmixed image, or a clear error."""
    if endmember not in names:
        raise InputError(
            f"{zarr_path}: no channel '{endmember}' (has {', '.join(names)}); the panel names an endmember"
            " the image was not unmixed with: rerun the unmix step"
        )
    return names.index(endmember)


def panel_channel(cfg: Config, names: list[str], role: str, zarr_path: Path) -> int | None:
    row = cfg.panel_row(role=role)
    return None if row is None else channel_index(names, row.endmember, zarr_path)


def flagged_mask(zarr_path: Path, chunk_size: int):
    path = Path(zarr_path) / "labels" / "flagged"
    return io.read_labels(zarr_path, "flagged", chunk_size).astype(bool) if path.is_dir() else None
