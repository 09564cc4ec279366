"""Panel, reference spectra and the simulated camera's band grid."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd


#: Endmembers of the simulated library, in the order of ``abundances``.
ENDMEMBERS: tuple[str, ...] = (
    "DAPI", "QD525", "QD565", "QD585", "QD605", "QD655", "QD705", "AF", "Offset",
)
#: Band centres of the simulated camera, nm (31 bands, 10 nm apart).
BAND_WAVELENGTHS_NM: np.ndarray = np.arange(420, 721, 10, dtype=float)
#: Half-width of each band, nm: a band integrates the spectrum over centre ± this.
BAND_HALF_WIDTH_NM: float = 5.0

#: Autofluorescence endmember: NADH + riboflavin, mixed at these weights (each at peak 1).
AF_MIX: dict[str, float] = {"NADH": 0.6, "Riboflavin": 0.4}

_SOURCE_COLUMN = {
    "DAPI": "DAPI",
    "QD525": "Qdot 525",
    "QD565": "Qdot 565",
    "QD585": "Qdot 585",
    "QD605": "Qdot 605",
    "QD655": "Qdot 655",
    "QD705": "Qdot 705",
}
_IDX = {name: i for i, name in enumerate(ENDMEMBERS)}

# ----------------------------------------------------------------------------
# panel and spectra


def default_panel() -> pd.DataFrame:
    """The panel of the simulated slides (``config/panel.tsv`` of the test data).

    Returns
    -------
    pandas.DataFrame
        Columns ``endmember, marker, role, compartment, score, t1, t2, t3``;
        thresholds in abundance units, NaN where not used; ``compartment`` and
        ``score`` are empty strings where not used.
    """
    nan = np.nan
    rows = [
        ("DAPI", "DAPI", "nuclear_stain", "", "none", nan, nan, nan),
        ("QD525", "mTOR", "marker", "cytoplasm", "percent_positive", 30.0, nan, nan),
        ("QD565", "ER", "marker", "nucleus", "hscore", 30.0, 80.0, 160.0),
        ("QD585", "Ki67", "marker", "nucleus", "percent_positive", 30.0, nan, nan),
        ("QD605", "PR", "marker", "nucleus", "allred", 30.0, 80.0, 160.0),
        ("QD655", "HER2", "marker", "membrane", "her2", nan, nan, nan),
        ("QD705", "ECAD", "membrane_stain", "membrane", "none", nan, nan, nan),
        ("AF", "AF", "autofluorescence", "", "none", nan, nan, nan),
        ("Offset", "Offset", "background", "", "none", nan, nan, nan),
    ]
    return pd.DataFrame(
        rows, columns=["endmember", "marker", "role", "compartment", "score", "t1", "t2", "t3"]
    )


def reference_spectra(af_mix: dict[str, float] | None = None) -> pd.DataFrame:
    """The bundled FPbase emission spectra at 1 nm, plus the mixed ``AF`` column.

    ``af_mix``: weights of the tissue fluorophores (``NADH``, ``Riboflavin``)
    in ``AF``; default :data:`AF_MIX`.

    Returns
    -------
    pandas.DataFrame
        ``wavelength_nm`` (nm) then one column per non-flat endmember
        (``DAPI, QD525, ..., QD705, AF``), each at peak 1; 0 outside the
        measured range. See ``qdquant/data/SOURCE.md``.
    """
    src = resources.files("qdquant").joinpath("data/reference_emission_spectra.csv")
    with resources.as_file(src) as path:
        raw = pd.read_csv(path).fillna(0.0)
    out = pd.DataFrame({"wavelength_nm": raw["wavelength_nm"].to_numpy(float)})
    for name, col in _SOURCE_COLUMN.items():
        out[name] = raw[col].to_numpy(float) / raw[col].max()
    af = sum(w * raw[c].to_numpy(float) / raw[c].max() for c, w in (af_mix or AF_MIX).items())
    out["AF"] = af / af.max()
    return out


def _integrate_bands(wl: np.ndarray, values: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Mean of a 1-nm sampled spectrum over each band (centre ± half-width), trapezoid rule."""
    offsets = np.arange(-BAND_HALF_WIDTH_NM, BAND_HALF_WIDTH_NM + 0.5, 0.5)
    weights = np.ones_like(offsets)
    weights[[0, -1]] = 0.5
    samples = np.interp(centres[:, None] + offsets[None, :], wl, values, left=0.0, right=0.0)
    return samples @ weights / weights.sum()


def band_spectra(
    shift_nm: dict[str, float] | None = None,
    width_factor: dict[str, float] | None = None,
    wavelengths_nm: np.ndarray = BAND_WAVELENGTHS_NM,
    af_mix: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Endmember spectra on the camera's band grid, in the library's format.

    Parameters
    ----------
    shift_nm : dict, optional
        Per endmember, shift of the emission spectrum towards longer
        wavelengths, nm.
    width_factor : dict, optional
        Per endmember, stretch of the spectrum about its peak (1.02 = 2 %
        wider).
    wavelengths_nm : (C,) array
        Band centres, nm.
    af_mix : dict, optional
        Composition of ``AF`` (see :func:`reference_spectra`).

    Returns
    -------
    pandas.DataFrame
        ``wavelength_nm`` then the columns of :data:`ENDMEMBERS`; every
        non-flat column has peak 1, ``Offset`` is all ones.
    """
    shift_nm = shift_nm or {}
    width_factor = width_factor or {}
    ref = reference_spectra(af_mix)
    wl = ref["wavelength_nm"].to_numpy(float)
    centres = np.asarray(wavelengths_nm, dtype=float)
    out = pd.DataFrame({"wavelength_nm": centres})
    for name in ENDMEMBERS:
        if name == "Offset":
            out[name] = 1.0
            continue
        values = ref[name].to_numpy(float)
        peak = wl[np.argmax(values)]
        s, w = float(shift_nm.get(name, 0.0)), float(width_factor.get(name, 1.0))
        # the perturbed spectrum at wavelength x is the reference at peak + (x - s - peak) / w
        source_wl = peak + (wl - peak) * w + s
        bands = _integrate_bands(source_wl, values, centres)
        out[name] = bands / bands.max()
    return out


def _off_library_spectra(wavelengths_nm: np.ndarray) -> pd.DataFrame:
    """Broad autofluorescence spectra absent from the library (parametric proxies).

    ``RBC``: red-blood-cell autofluorescence, a broad band peaking near 580 nm
    with a red shoulder; ``lipofuscin``: the very broad 500–700 nm emission of
    lipofuscin granules (peak ~610 nm). Peak 1 on the band grid.
    """
    x = np.asarray(wavelengths_nm, dtype=float)
    rbc = np.exp(-0.5 * ((x - 580) / 38) ** 2) + 0.45 * np.exp(-0.5 * ((x - 660) / 30) ** 2)
    lipo = np.exp(-0.5 * ((x - 610) / 75) ** 2)
    return pd.DataFrame({"wavelength_nm": x, "RBC": rbc / rbc.max(), "lipofuscin": lipo / lipo.max()})
