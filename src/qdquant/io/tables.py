"""Tables: CSV written atomically (whole or in slices of rows), read back with clear
errors, and the per-cell table as AnnData (``cells.h5ad``)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from qdquant.errors import InputError
from qdquant.io.atomic import atomic_path


def write_csv(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a table as CSV atomically (no index column)."""
    write_csv_slices([table], path)


#: A text field that :mod:`csv` would quote (``QUOTE_MINIMAL``, as pandas writes): such
#: tables are left to pandas.
_QUOTED = re.compile(r'[,"\r\n]')

#: Fields formatted at a time by :func:`_csv_text`: a slice's millions of small strings
#: (some 60 bytes each) are never all alive at once, only its text.
_CSV_BLOCK_FIELDS = 200_000


def _csv_fields(values: np.ndarray) -> list[str] | None:
    """One column's fields as ``DataFrame.to_csv`` writes them (``na_rep=""``), or None.

    ``float64`` through Python's ``repr`` (the shortest string that reads
    back as the same number, the same string as NumPy's ``astype(str)``
    that pandas uses, in 1.5-2x less time), NaN as an empty field; integers and
    booleans through ``str``, as :mod:`csv` does; strings as they are.
    None for any other kind of column, or strings that :mod:`csv` would
    quote, which pandas then writes.
    """
    if values.dtype == np.float64:
        fields = list(map(repr, values.tolist()))
        for i in np.flatnonzero(np.isnan(values)).tolist():
            fields[i] = ""
        return fields
    if values.dtype.kind in "iub":
        return list(map(str, values.tolist()))
    if values.dtype == object:
        fields = values.tolist()
        if all(type(f) is str for f in fields) and not any(map(_QUOTED.search, fields)):
            return fields
    return None


def _csv_text(table: pd.DataFrame, header: bool) -> str | None:
    """``table.to_csv(index=False, header=header)``'s text, built column by column; None where
    :func:`_csv_fields` leaves a column to pandas.

    pandas formats every float with NumPy's slower ``astype(str)`` and hands
    the rows to :mod:`csv` field by field; here each column is formatted in
    one call and the rows joined as text, the same bytes in about half the
    time. A table of fewer than two columns is left to pandas (:mod:`csv`
    quotes a row that is a single empty field).
    """
    names = [str(c) for c in table.columns]
    if len(names) < 2 or any(type(c) is not str or _QUOTED.search(c) for c in table.columns):
        return None
    columns = [table.iloc[:, j] for j in range(len(names))]
    if not all(isinstance(c.dtype, np.dtype) for c in columns):  # pandas' own dtypes: categorical, string, ...
        return None
    parts = [",".join(names) + "\n"] if header else []
    step = max(1, _CSV_BLOCK_FIELDS // len(names))
    for start in range(0, len(table), step):
        fields = [_csv_fields(c.to_numpy()[start:start + step]) for c in columns]
        if any(f is None for f in fields):
            return None
        parts += ["\n".join(map(",".join, zip(*fields))), "\n"]
    return "".join(parts)


def write_csv_slices(tables, path: str | os.PathLike) -> None:
    """Write an iterable of tables (slices of the rows of one table) as one CSV, atomically.

    The header comes from the first; only one slice is in memory at a time
    when ``tables`` is a generator. At least one table is needed (a table
    without rows gives the header alone). The bytes are pandas'
    ``to_csv(index=False)``'s; :func:`_csv_text` writes the usual tables
    faster.
    """
    with atomic_path(path) as tmp:
        for i, table in enumerate(tables):
            text = _csv_text(table, header=not i)
            if text is None:
                table.to_csv(tmp, mode="a" if i else "w", header=not i, index=False)
                continue
            with open(tmp, "a" if i else "w", encoding="utf-8", newline="") as f:
                f.write(text)


def read_csv(path: str | os.PathLike, what: str = "table", **kwargs):
    """Read a CSV written by an earlier step, with a clear error when it is missing.

    ``kwargs`` go to :func:`pandas.read_csv` (e.g. ``usecols``, or
    ``chunksize`` for an iterator of tables).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found (run the earlier steps first)")
    try:
        return pd.read_csv(path, **kwargs)
    except ValueError as exc:  # e.g. a column of usecols missing
        raise InputError(f"{path}: {what}: {exc}") from None


def _anndata(cells: pd.DataFrame, markers: list[str], sample_id: str):
    import anndata

    obs_columns = [c for c in cells.columns if c not in markers and not c.endswith("_mean") and c != "CellID"]
    obs = cells[obs_columns].copy()
    for column in obs.columns:
        if obs[column].dtype == object or pd.api.types.is_string_dtype(obs[column]):
            obs[column] = obs[column].astype(str).astype("category")
    obs["imageid"] = pd.Categorical([sample_id] * len(obs))
    obs.index = [f"{sample_id}_{i}" for i in cells["CellID"]]
    return anndata.AnnData(
        X=cells[markers].to_numpy(np.float32),
        obs=obs,
        var=pd.DataFrame(index=markers),
        obsm={"spatial": cells[["X_um", "Y_um"]].to_numpy()},
        layers={
            compartment: cells[[f"{m}_{compartment}_mean" for m in markers]].to_numpy(np.float32)
            for compartment in ("nucleus", "cytoplasm", "membrane")
        },
    )


class H5adWriter:
    """Write ``cells.csv``'s content as AnnData (``.h5ad``), from tables of cells appended one at a time.

    For scanpy / squidpy / scimap users: ``X`` holds the whole-cell marker
    means (cells x markers), ``layers`` the compartment means, ``obs`` every
    other column (plus ``imageid``) and ``obsm["spatial"]`` the centroids in
    micrometres. Each table is written to a temporary file as it comes; on
    leaving the ``with`` block they are concatenated on disk (``anndata``'s
    ``concat_on_disk``, in bounded memory) and the result renamed into
    place. On an exception nothing is written.
    """

    def __init__(self, path: str | os.PathLike, *, sample_id: str):
        self.path, self.sample_id = Path(path), sample_id
        self._parts: list[Path] = []

    def __enter__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="qdquant-h5ad-")
        return self

    def append(self, cells: pd.DataFrame, markers: list[str]) -> None:
        part = Path(self._dir.name) / f"{len(self._parts)}.h5ad"
        _anndata(cells, markers, self.sample_id).write_h5ad(part)
        self._parts.append(part)

    def __exit__(self, exc_type, *_):
        try:
            if exc_type is None:
                from anndata.experimental import concat_on_disk

                with atomic_path(self.path) as tmp:
                    if len(self._parts) == 1:
                        shutil.copyfile(self._parts[0], tmp)
                    else:
                        concat_on_disk(self._parts, tmp, max_loaded_elems=10_000_000, merge="same")
        finally:
            self._dir.cleanup()
        return False
