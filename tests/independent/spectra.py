"""Band set, true emission spectra and the (possibly imperfect) library of the independent slides.

Written from the user contract and the FPbase spectra only (nothing from qdquant).

Conventions
-----------
- Bands: 26 contiguous bands from 440 to 740 nm whose widths grow from ~9 to ~14 nm
  (uneven on purpose; qdquant's own simulator uses another band set).
- A spectrum on the bands is the 1-nm emission curve integrated over each band.
- The LIBRARY (written to spectra.csv) has every column peak-normalised to 1.
  Abundances are in library units: a pixel of counts ``dark + a * library[:, k]``
  has abundance ``a`` of endmember ``k``.
- The TRUE rendering spectra: on a clean slide they are the library columns. On a
  messy slide each QD is the FPbase curve shifted by a few nm and the tissue AF
  differs from the library's AF (two tissue AF shapes, stroma and epithelium);
  true spectra are scaled to the same band SUM as their library column (a drifted
  dot gives as many photons as the library one), so one abundance unit is the
  same amount of dye in both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

#: The FPbase spectra in the shared data folder beside the repository (not redistributed here).
FPBASE = Path(__file__).resolve().parents[3] / "shared" / "data" / "fpbase_spectra_multispectral_shiny"
QDOTS = ["QD525", "QD565", "QD605", "QD655", "QD705"]
ENDMEMBERS = ["DAPI", *QDOTS, "AF"]
_GRID = np.arange(380.0, 900.0, 0.25)  # fine wavelength grid, nm


def band_edges() -> np.ndarray:
    """27 edges, 440 .. 740 nm, widths growing linearly (~9.4 -> ~13.7 nm)."""
    widths = np.linspace(1.0, 1.45, 26)
    widths *= 300.0 / widths.sum()
    return 440.0 + np.concatenate([[0.0], np.cumsum(widths)])


def band_centres(edges: np.ndarray | None = None) -> np.ndarray:
    e = band_edges() if edges is None else edges
    return 0.5 * (e[1:] + e[:-1])


def _fpbase_curves() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    qd = pd.read_csv(FPBASE / "qdot_emission_spectra_fpbase_wide.csv", index_col=0)
    nuc = pd.read_csv(FPBASE / "nuclear_and_autofluorescence_proxy_emission_fpbase_wide.csv", index_col=0)
    curves = {"DAPI": (nuc.index.to_numpy(float), nuc["DAPI"].fillna(0).to_numpy(float))}
    for name in QDOTS:
        col = qd[f"Qdot {name[2:]}"].fillna(0)
        curves[name] = (qd.index.to_numpy(float), col.to_numpy(float))
    return curves


def _on_grid(wl: np.ndarray, values: np.ndarray, shift_nm: float = 0.0) -> np.ndarray:
    """The curve on the fine grid, moved ``shift_nm`` to the red; zero outside its data."""
    return np.interp(_GRID - shift_nm, wl, values, left=0.0, right=0.0)


def integrate(fine: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Integrate a curve sampled on the fine grid over each band."""
    idx = np.searchsorted(_GRID, edges)
    csum = np.concatenate([[0.0], np.cumsum(fine)])
    return (csum[idx[1:]] - csum[idx[:-1]]) * (_GRID[1] - _GRID[0])


def af_curve(peak_nm: float, width: float, shoulder_nm: float, shoulder: float) -> np.ndarray:
    """Tissue autofluorescence on the fine grid: two log-normal bumps in wavelength.

    ``width`` is the log-sigma of the main bump (0.12 ~ 65 nm FWHM-ish at 540 nm).
    """
    lg = np.log(_GRID)
    main = np.exp(-0.5 * ((lg - np.log(peak_nm)) / width) ** 2)
    second = shoulder * np.exp(-0.5 * ((lg - np.log(shoulder_nm)) / (0.8 * width)) ** 2)
    return main + second


# the tissue AF the library assumes (and that clean slides have)
AF_LIBRARY = dict(peak_nm=535.0, width=0.11, shoulder_nm=600.0, shoulder=0.35)


def rbc_curve() -> np.ndarray:
    """Red blood cells: off-library; porphyrin-like narrow peak ~ 640 nm on a broad base."""
    lg = np.log(_GRID)
    return (np.exp(-0.5 * ((_GRID - 640.0) / 9.0) ** 2)
            + 0.45 * np.exp(-0.5 * ((lg - np.log(585.0)) / 0.13) ** 2))


def _peak1(v: np.ndarray) -> np.ndarray:
    return v / v.max()


def library(edges: np.ndarray, *, af: dict | None = None, offset_column: bool = False) -> pd.DataFrame:
    """The library as written to spectra.csv (columns peak-normalised to 1)."""
    curves = _fpbase_curves()
    cols = {"wavelength_nm": np.round(band_centres(edges), 2)}
    for name in ["DAPI", *QDOTS]:
        cols[name] = _peak1(integrate(_on_grid(*curves[name]), edges))
    cols["AF"] = _peak1(integrate(af_curve(**(af or AF_LIBRARY)), edges))
    if offset_column:
        cols["Offset"] = np.ones(len(edges) - 1)
    return pd.DataFrame(cols)


def true_spectra(edges: np.ndarray, lib: pd.DataFrame, *, qd_shift_nm: dict | None = None,
                 af_stroma: dict | None = None, af_epithelium: dict | None = None) -> dict[str, np.ndarray]:
    """Rendering spectra (band values) per component, in library abundance units.

    Components: DAPI, QD*, AF_stroma, AF_epithelium, RBC. Without shifts / AF shapes the
    spectra equal the library columns exactly. Changed spectra keep their library
    column's band sum. RBC is scaled to peak 1 (its abundance is in its own units).
    """
    curves = _fpbase_curves()
    shifts = qd_shift_nm or {}
    out: dict[str, np.ndarray] = {}
    for name in ["DAPI", *QDOTS]:
        ref = lib[name].to_numpy(float)
        if shifts.get(name, 0.0) == 0.0:
            out[name] = ref.copy()
        else:
            v = integrate(_on_grid(*curves[name], shift_nm=shifts[name]), edges)
            out[name] = v * ref.sum() / v.sum()
    ref = lib["AF"].to_numpy(float)
    for key, shape in (("AF_stroma", af_stroma), ("AF_epithelium", af_epithelium)):
        if shape is None:
            out[key] = ref.copy()
        else:
            v = integrate(af_curve(**shape), edges)
            out[key] = v * ref.sum() / v.sum()
    out["RBC"] = _peak1(integrate(rbc_curve(), edges))
    return out
