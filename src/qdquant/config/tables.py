"""The sample sheet, the spectral library and the panel, parsed and checked.

Every bad value is an :class:`~qdquant.errors.InputError` whose one-line
message names the file, the row and what is wrong (row numbers count the
header as row 1).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from qdquant.config.model import (
    BINNED_SCORES,
    COMPARTMENTS,
    CONTROL_SCORES,
    ROLES,
    SCORES,
    Library,
    PanelRow,
    Sample,
)
from qdquant.errors import InputError


_SAMPLE_ID = re.compile(r"^[A-Za-z0-9_-]+$")


def _read_table(path: Path, sep: str, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, comment=None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot parse {what} ({str(exc).splitlines()[0]})") from None
    table.columns = [c.strip() for c in table.columns]
    return table.apply(lambda col: col.str.strip())


def _require_columns(table: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")


def _number(value: str, path: Path, row: int, column: str, *, positive: bool = False) -> float | None:
    if value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        raise InputError(f"{path}, row {row}: {column} '{value}' is not a number") from None
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise InputError(
            f"{path}, row {row}: {column} must be {'> 0' if positive else '>= 0'}, got {value}"
        )
    return number


def read_samples(path: str | Path) -> tuple[Sample, ...]:
    """Parse the sample sheet. Row numbers in errors count the header as row 1."""
    path = Path(path)
    table = _read_table(path, "\t", "sample sheet")
    _require_columns(table, path, ("sample_id", "image"))
    if table.empty:
        raise InputError(f"{path}: the sample sheet lists no sample")
    samples, seen = [], {}
    for i, rec in enumerate(table.to_dict("records"), start=2):
        sid = rec["sample_id"]
        if not _SAMPLE_ID.match(sid):
            raise InputError(f"{path}, row {i}: sample_id '{sid}' must be letters, digits, '-' or '_'")
        if sid in seen:
            raise InputError(f"{path}, row {i}: duplicate sample_id '{sid}' (also row {seen[sid]})")
        seen[sid] = i
        if not rec["image"]:
            raise InputError(f"{path}, row {i}: sample '{sid}' has no image")
        control = rec.get("control_score", "") or None
        if control is not None and control not in CONTROL_SCORES:
            raise InputError(
                f"{path}, row {i}: control_score '{control}' must be one of {', '.join(CONTROL_SCORES)}"
            )
        samples.append(
            Sample(
                sample_id=sid,
                image=Path(rec["image"]),
                pixel_size_um=_number(rec.get("pixel_size_um", ""), path, i, "pixel_size_um", positive=True),
                tissue=rec.get("tissue", "") or None,
                control_score=control,
                unstained=Path(rec["unstained"]) if rec.get("unstained", "") else None,
            )
        )
    return tuple(samples)


def read_library(path: str | Path) -> Library:
    """Parse the spectral library CSV (wavelength_nm, then one column per endmember)."""
    path = Path(path)
    table = _read_table(path, ",", "spectral library")
    if table.columns[0] != "wavelength_nm":
        raise InputError(f"{path}: the first column must be 'wavelength_nm', got '{table.columns[0]}'")
    names = tuple(table.columns[1:])
    if not names:
        raise InputError(f"{path}: no endmember columns after wavelength_nm")
    if len(set(names)) != len(names):
        raise InputError(f"{path}: duplicate endmember columns")
    values = table.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if values.shape[0] == 0:
        raise InputError(f"{path}: no band rows")
    bad = ~np.isfinite(values)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise InputError(
            f"{path}, row {r + 2}: column {table.columns[c]} value '{table.iat[r, c]}'"
            " is not a finite number (empty, NaN, infinite or text)"
        )
    spectra = values[:, 1:]
    for k, name in enumerate(names):
        if (spectra[:, k] < 0).any():
            raise InputError(f"{path}: endmember {name} has negative values")
        if not spectra[:, k].any():
            raise InputError(f"{path}: endmember {name} is all zero")
    if len(names) > len(values):
        raise InputError(
            f"{path}: {len(names)} endmembers but only {len(values)} bands (need at least as many bands)"
        )
    return Library(wavelengths_nm=values[:, 0], names=names, spectra=spectra)


def read_panel(path: str | Path, library: Library) -> tuple[PanelRow, ...]:
    """Parse the panel and check it against the library."""
    path = Path(path)
    table = _read_table(path, "\t", "panel")
    _require_columns(table, path, ("endmember", "marker", "role", "compartment", "score"))
    rows = []
    for i, rec in enumerate(table.to_dict("records"), start=2):
        em, marker, role = rec["endmember"], rec["marker"], rec["role"]
        compartment, score = rec["compartment"] or None, rec["score"] or "none"
        if em not in library.names:
            raise InputError(
                f"{path}, row {i}: endmember '{em}' is not a column of the spectral library"
                f" ({', '.join(library.names)})"
            )
        if not marker:
            raise InputError(f"{path}, row {i}: endmember '{em}' has no marker name")
        if role not in ROLES:
            raise InputError(f"{path}, row {i}: role '{role}' must be one of {', '.join(ROLES)}")
        if compartment is not None and compartment not in COMPARTMENTS:
            raise InputError(
                f"{path}, row {i}: compartment '{compartment}' must be one of {', '.join(COMPARTMENTS)}"
            )
        if score not in SCORES:
            raise InputError(f"{path}, row {i}: score '{score}' must be one of {', '.join(SCORES)}")
        if role == "marker" and compartment is None:
            raise InputError(f"{path}, row {i}: marker '{marker}' needs a compartment")
        if score != "none" and role not in ("marker", "membrane_stain"):
            raise InputError(f"{path}, row {i}: only markers can be scored, '{marker}' has role {role}")
        if score in BINNED_SCORES and compartment is None:
            raise InputError(f"{path}, row {i}: scored marker '{marker}' needs a compartment")
        t = [_number(rec.get(c, ""), path, i, c) for c in ("t1", "t2", "t3")]
        if score in BINNED_SCORES:
            need = 1 if score == "percent_positive" else 3
            if any(x is None for x in t[:need]):
                raise InputError(
                    f"{path}, row {i}: marker '{marker}' scored {score} needs "
                    + ("t1" if need == 1 else "t1, t2 and t3")
                )
            given = [x for x in t if x is not None]
            if given != sorted(given):
                raise InputError(f"{path}, row {i}: thresholds of '{marker}' must rise (t1 <= t2 <= t3)")
        rows.append(PanelRow(em, marker, role, compartment, score, *t))

    def duplicates(values):
        return sorted({v for v in values if values.count(v) > 1})

    if dup := duplicates([r.endmember for r in rows]):
        raise InputError(f"{path}: endmember {dup[0]} is listed more than once")
    if dup := duplicates([r.marker for r in rows]):
        raise InputError(f"{path}: marker {dup[0]} is listed more than once")
    if missing := [n for n in library.names if n not in {r.endmember for r in rows}]:
        raise InputError(f"{path}: library endmember {missing[0]} has no panel row")
    n_nuclear = sum(r.role == "nuclear_stain" for r in rows)
    if n_nuclear != 1:
        raise InputError(f"{path}: needs exactly one nuclear_stain row, found {n_nuclear}")
    if sum(r.role == "membrane_stain" for r in rows) > 1:
        raise InputError(f"{path}: at most one membrane_stain row is allowed")
    return tuple(rows)
