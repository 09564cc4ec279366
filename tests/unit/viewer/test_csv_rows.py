"""A clicked cell's row, read from its line of cells.csv, equals the table's row."""

import numpy as np
import pandas as pd
import pytest

from qdquant.viewer.results import CsvRows


def test_a_row_read_from_its_line_equals_the_tables_row(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    n = 3000
    table = pd.DataFrame({"CellID": np.sort(rng.choice(10**7, n, replace=False)), "HER2": rng.gamma(2, 30, n),
                          "Area": rng.integers(20, 900, n), "her2_class": rng.choice(["0", "1+", "2+", "3+"], n)})
    path = tmp_path / "cells.csv"
    table.to_csv(path, index=False)
    monkeypatch.setattr(CsvRows, "PIECE", 4096)  # many pieces: lines cut at the pieces' edges
    rows = CsvRows(path)
    written = pd.read_csv(path, dtype={"her2_class": str})
    for i in (0, 1, 777, n - 1):
        assert rows.row(int(table["CellID"][i])) == written.iloc[i].to_dict()
    with pytest.raises(KeyError):
        rows.row(-1)
