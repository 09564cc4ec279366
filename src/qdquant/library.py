"""Spectral libraries: built from control slides or from published dye spectra.

A library is a :class:`pandas.DataFrame` in the format of ``config/spectra.csv``
(see the contract): first column ``wavelength_nm``, then one column per
endmember, one row per image band, every column normalised to peak 1.

- :func:`build_library` measures it from single-stain control images the way
  commercial multispectral systems do (offset removed, bright unsaturated
  pixels averaged, autofluorescence from an unstained control subtracted and
  kept as its own ``AF`` endmember).
- :func:`mixing_matrix_from_dye_spectra` predicts it for an excitation /
  emission ("lambda") stack from published dye spectra, and
  :func:`parse_leica_channels` reads the channel settings of a Leica SP2
  lambda stack from its ASCII metadata.
- :func:`plot_library` draws the spectra for quality control.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import trim_mean

from qdquant.errors import InputError
from qdquant.unmixing import estimate_offset

__all__ = [
    "build_library",
    "mirror_spectrum",
    "mixing_matrix_from_dye_spectra",
    "parse_leica_channels",
    "plot_library",
    "read_spectrum_table",
]


# --------------------------------------------------------------------------
# library from control slides
# --------------------------------------------------------------------------


def _checked_control(cube, name, n_bands):
    """A control image as a numpy (C, Y, X) array, or a clear error."""
    shape = getattr(cube, "shape", None)
    if shape is None or len(shape) != 3:
        raise InputError(f"control {name!r}: must be a 3-D (C, Y, X) array, got shape {shape}")
    if shape[0] != n_bands:
        raise InputError(
            f"control {name!r}: has {shape[0]} bands but wavelengths_nm has {n_bands}; shape {shape}"
        )
    cube = np.asarray(cube)
    if np.issubdtype(cube.dtype, np.floating) and not np.isfinite(cube).all():
        raise InputError(f"control {name!r}: contains NaN or inf; shape {shape}")
    return cube


def _saturated(raw, saturation):
    """Pixels of ``raw`` (C, n) with a band at ``saturation`` (default: the integer dtype's maximum)."""
    if saturation is None and np.issubdtype(raw.dtype, np.integer):
        saturation = np.iinfo(raw.dtype).max
    return (raw >= saturation).any(axis=0) if saturation is not None else np.zeros(raw.shape[1], bool)


def _control_pixels(cube, name, n_bands, saturation):
    """Offset-removed (C, n) float64 pixels of a control and their saturation mask."""
    cube = _checked_control(cube, name, n_bands)
    raw = cube.reshape(n_bands, -1)
    return raw.astype(np.float64) - estimate_offset(cube)[:, None], _saturated(raw, saturation)


def _bright_mean(pixels, saturated, bright_percentile, name):
    """Mean spectrum of the unsaturated pixels brighter than the percentile."""
    ok = ~saturated
    if not ok.any():
        raise InputError(f"control {name!r}: every pixel has a saturated band")
    brightness = pixels.sum(axis=0)
    cut = np.percentile(brightness[ok], bright_percentile)
    sel = ok & (brightness >= cut)
    return pixels[:, sel].mean(axis=1), int(sel.sum())


def _peak_normalised(spectrum, name):
    spectrum = np.clip(spectrum, 0.0, None)
    peak = spectrum.max()
    if not peak > 0:
        raise InputError(f"control {name!r}: no signal above the offset (and autofluorescence)")
    return spectrum / peak


def build_library(
    controls,
    unstained=None,
    *,
    wavelengths_nm,
    names=None,
    saturation=None,
    bright_percentile=99.0,
):
    """Build a spectral library from single-stain control images.

    Parameters
    ----------
    controls : dict of str to (C, Y, X) array
        One image per endmember, of a slide stained with that endmember only,
        in camera counts.
    unstained : (C, Y, X) array, optional
        An unstained control of the same tissue. Its spectrum becomes the
        ``AF`` (autofluorescence) endmember and its mean level is subtracted
        from the stained controls.
    wavelengths_nm : (C,) array_like
        Band centres in nanometres.
    names : sequence of str, optional
        The controls to use, in column order (default: the dict's order).
    saturation : float, optional
        A pixel with any band at or above this raw value is left out. Default:
        the integer dtype's maximum (none for float images).
    bright_percentile : float, optional
        Only pixels whose total offset-removed signal is at or above this
        percentile (of the unsaturated pixels) are averaged. Default 99.

    Returns
    -------
    pandas.DataFrame
        ``wavelength_nm`` then one column per name (and ``AF`` when
        ``unstained`` is given), each normalised to peak 1; ``attrs`` holds
        ``n_pixels`` (pixels averaged per endmember).

    Notes
    -----
    For every control: the dark offset of each band is removed
    (:func:`qdquant.unmixing.estimate_offset`, the 1st percentile); pixels
    with a saturated band are dropped; the brightest unsaturated pixels
    (``bright_percentile``) are averaged. With an unstained control, the
    mean offset-removed spectrum of all its unsaturated pixels (the
    autofluorescence every pixel of the tissue carries) is subtracted from
    each stained control's average, negative values are clipped to 0; the
    unstained control's own bright-pixel average is the ``AF`` endmember.
    Finally every spectrum is divided by its maximum.

    Raises
    ------
    InputError
        For an empty or malformed ``controls``, a name without a control, a
        band count that differs from ``wavelengths_nm``, NaN/inf values, or
        a control without unsaturated signal.
    """
    wl = np.asarray(wavelengths_nm, dtype=np.float64)
    if wl.ndim != 1 or wl.size == 0 or not np.isfinite(wl).all():
        raise InputError(f"wavelengths_nm must be a 1-D array of finite numbers, got shape {wl.shape}")
    if not isinstance(controls, dict) or not controls:
        raise InputError("controls must be a non-empty dict of name -> (C, Y, X) image")
    names = list(controls) if names is None else [str(n) for n in names]
    missing = [n for n in names if n not in controls]
    if missing:
        raise InputError(f"no control image for endmember(s) {missing}; controls: {list(controls)}")
    if "AF" in names and unstained is not None:
        raise InputError("'AF' is reserved for the unstained control's autofluorescence")
    if not 0 <= bright_percentile < 100:
        raise InputError(f"bright_percentile must be in [0, 100), got {bright_percentile}")

    af_level = None
    columns, n_pixels = {}, {}
    if unstained is not None:
        px, sat = _control_pixels(unstained, "unstained", wl.size, saturation)
        if sat.all():
            raise InputError("control 'unstained': every pixel has a saturated band")
        af_level = px[:, ~sat].mean(axis=1)
        af, n_af = _bright_mean(px, sat, bright_percentile, "unstained")
    for name in names:
        px, sat = _control_pixels(controls[name], name, wl.size, saturation)
        spectrum, n_pixels[name] = _bright_mean(px, sat, bright_percentile, name)
        if af_level is not None:
            spectrum = spectrum - af_level
        columns[name] = _peak_normalised(spectrum, name)
    if unstained is not None:
        columns["AF"] = _peak_normalised(af, "unstained")
        n_pixels["AF"] = n_af
    out = pd.DataFrame({"wavelength_nm": wl, **columns})
    out.attrs["n_pixels"] = n_pixels
    return out


def autofluorescence_spectrum(unstained, *, saturation=None):
    """The tissue autofluorescence spectrum of an unstained control slide.

    Parameters
    ----------
    unstained : (C, Y, X) array
        Camera counts of an unstained section of the same tissue, scanned
        with the same settings (a sample of it is enough: a few windows of a
        whole slide).
    saturation : float, optional
        Counts at which a band saturates; default the dtype's maximum for
        integer images.

    Returns
    -------
    (C,) float64 array
        Peak-normalised spectrum (peak 1), on the image's bands.

    Notes
    -----
    Autofluorescence is faint (a few counts per band), so a dark offset
    estimated to within the noise would still bend its spectrum. The
    spectrum is instead the band-wise mean of the bright pixels (total
    counts between the 70th and 90th percentiles) minus that of the dim ones
    (10th to 30th): the offset cancels exactly. Means trimmed by 10 % at
    each end (not medians, which integer counts quantise) keep the shape of
    the bulk of the tissue, which a few bright objects of another colour
    (red blood cells, lipofuscin granules) do not pull.
    """
    cube = _checked_control(unstained, "unstained", np.shape(unstained)[0] if np.ndim(unstained) == 3 else None)
    raw = cube.reshape(cube.shape[0], -1)
    raw = raw[:, ~_saturated(raw, saturation)].astype(np.float64)
    if raw.shape[1] < 100:
        raise InputError(f"control 'unstained': {raw.shape[1]} unsaturated pixels, need at least 100")
    total = raw.sum(axis=0)
    q = np.percentile(total, [10, 30, 70, 90])
    dim = raw[:, (total >= q[0]) & (total <= q[1])]
    bright = raw[:, (total >= q[2]) & (total <= q[3])]
    spectrum = trim_mean(bright, 0.1, axis=1) - trim_mean(dim, 0.1, axis=1)
    return _peak_normalised(spectrum, "unstained")


def plot_library(library, path, *, title=None):
    """Write a PNG of a library's spectra (one line per endmember), for QC.

    Parameters
    ----------
    library : pandas.DataFrame
        ``wavelength_nm`` then one column per endmember.
    path : str or os.PathLike
        Output PNG file.
    title : str, optional

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if "wavelength_nm" not in library.columns:
        raise InputError(f"library has no 'wavelength_nm' column; columns {list(library.columns)}")
    path = Path(path)
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    wl = library["wavelength_nm"].to_numpy()
    for name in library.columns[1:]:
        ax.plot(wl, library[name].to_numpy(), marker="o", ms=3, label=str(name))
    ax.set_xlabel("wavelength (nm)")
    ax.set_ylabel("normalised intensity")
    ax.set_ylim(bottom=0)
    ax.set_title(title or "spectral library")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    from qdquant.io import atomic_path

    with atomic_path(path) as tmp:  # a killed run leaves no half-written figure
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
    return path


# --------------------------------------------------------------------------
# library from published dye spectra (excitation x emission stacks)
# --------------------------------------------------------------------------


def read_spectrum_table(path):
    """Read a two-column (wavelength nm, intensity) text table (.emn, .exc).

    Rows with a wavelength outside 200-2000 nm (some PubSpectra files start
    with a header-like row such as ``110 553``) and non-numeric rows are
    dropped; rows are sorted by wavelength.

    Returns
    -------
    (N, 2) float64 array
    """
    rows = []
    with open(path, encoding="latin-1") as fh:
        for line in fh:
            parts = line.replace(",", " ").split()
            if len(parts) < 2:
                continue
            try:
                wl, val = float(parts[0]), float(parts[1])
            except ValueError:
                continue
            if 200.0 <= wl <= 2000.0 and np.isfinite(val):
                rows.append((wl, val))
    if len(rows) < 2:
        raise InputError(f"{path}: not a two-column wavelength / intensity table")
    table = np.array(sorted(rows))
    return table


def _as_table(table, what):
    t = np.asarray(table, dtype=np.float64)
    if t.ndim != 2 or t.shape[1] != 2 or t.shape[0] < 2:
        raise InputError(f"{what}: must be an (N, 2) wavelength / intensity table, got shape {t.shape}")
    if not np.isfinite(t).all():
        raise InputError(f"{what}: contains NaN or inf")
    return t[np.argsort(t[:, 0])]


def mirror_spectrum(table, to_peak_nm, from_peak_nm=None):
    """Mirror-image approximation of an excitation (or emission) spectrum.

    The mirror rule: a dye's absorption band is roughly the mirror image of
    its emission band on the wavenumber axis. ``table``'s spectrum, whose
    maximum is at ``from_peak_nm``, is reflected about the wavenumber
    midway between the two peaks, so that the result peaks at ``to_peak_nm``.

    Parameters
    ----------
    table : (N, 2) array
        Wavelength (nm), intensity.
    to_peak_nm : float
        Peak of the mirrored spectrum (e.g. the excitation maximum from the
        dye's data sheet when ``table`` is its emission).
    from_peak_nm : float, optional
        Peak of ``table`` (default: the wavelength of its maximum).

    Returns
    -------
    (N, 2) float64 array sorted by wavelength.
    """
    t = _as_table(table, "mirror_spectrum table")
    if from_peak_nm is None:
        from_peak_nm = t[np.argmax(t[:, 1]), 0]
    nu = 1e7 / t[:, 0]  # wavenumber, cm^-1
    centre = 0.5 * (1e7 / from_peak_nm + 1e7 / to_peak_nm)
    wl = 1e7 / (2 * centre - nu)
    out = np.column_stack([wl, t[:, 1]])
    return out[np.argsort(out[:, 0])]


def mixing_matrix_from_dye_spectra(excitation_nm, emission_bands_nm, dyes, *, channel_gain=None):
    """Predicted signal of each dye in each channel of an excitation/emission stack.

    Parameters
    ----------
    excitation_nm : (C,) array_like
        Laser line of each channel, nm.
    emission_bands_nm : (C, 2) array_like
        Lower and upper edge of each channel's emission band, nm.
    dyes : dict of str to (exc_table, em_table)
        Per dye, its excitation and emission spectra as (N, 2) tables of
        wavelength (nm) and intensity (any scale). Outside a table's range
        the spectrum is taken as 0.
    channel_gain : (C,) array_like, optional
        Relative detection gain of each channel (laser power x detector
        gain), multiplied in before normalisation. Default all 1.

    Returns
    -------
    (C, K) float64 array
        Entry (c, k) = excitation efficiency of dye k at channel c's laser
        line x its emission integrated over channel c's band (trapezoid on a
        0.5 nm grid), times ``channel_gain[c]``; each column normalised to
        peak 1. Columns follow ``dyes``' order.
    """
    ex = np.asarray(excitation_nm, dtype=np.float64).ravel()
    bands = np.asarray(emission_bands_nm, dtype=np.float64)
    if bands.shape != (ex.size, 2):
        raise InputError(
            f"emission_bands_nm must have shape ({ex.size}, 2) for {ex.size} excitation lines, "
            f"got {bands.shape}"
        )
    if not (np.isfinite(ex).all() and np.isfinite(bands).all()) or (bands[:, 1] <= bands[:, 0]).any():
        raise InputError("excitation_nm / emission_bands_nm must be finite with low < high edges")
    gain = np.ones(ex.size) if channel_gain is None else np.asarray(channel_gain, dtype=np.float64)
    if gain.shape != ex.shape or (gain < 0).any() or not np.isfinite(gain).all():
        raise InputError(f"channel_gain must be ({ex.size},) non-negative, got shape {gain.shape}")
    if not isinstance(dyes, dict) or not dyes:
        raise InputError("dyes must be a non-empty dict of name -> (excitation table, emission table)")
    cols = []
    for name, pair in dyes.items():
        if len(pair) != 2:
            raise InputError(f"dye {name!r}: expected (excitation table, emission table)")
        exc = _as_table(pair[0], f"dye {name!r} excitation")
        em = _as_table(pair[1], f"dye {name!r} emission")
        eff = np.interp(ex, exc[:, 0], exc[:, 1], left=0.0, right=0.0)
        col = np.empty(ex.size)
        for c, (lo, hi) in enumerate(bands):
            grid = np.linspace(lo, hi, max(2, int(round((hi - lo) / 0.5)) + 1))
            col[c] = np.trapezoid(np.interp(grid, em[:, 0], em[:, 1], left=0.0, right=0.0), grid)
        col = np.clip(eff * col * gain, 0.0, None)
        if not col.max() > 0:
            raise InputError(f"dye {name!r}: no signal in any channel")
        cols.append(col / col.max())
    return np.stack(cols, axis=1)


_AOTF = re.compile(r"^AOTF \((\d+(?:\.\d+)?)\)\s+([-\d.eE+]+)")
_PMT_ACTIVE = re.compile(r"^PMT (\d+)\s+(Active|Inactive)")
_PMT_HV = re.compile(r"^PMT (\d+) \(HV\)\s+([-\d.eE+]+)")
_MIRROR = re.compile(r"^SP Mirror (\d+) \((left|right)\)\s+([-\d.eE+]+)")


def parse_leica_channels(path):
    """Channel settings of a Leica SP2 (LCS) series from its ASCII metadata.

    Parameters
    ----------
    path : str or os.PathLike
        The ``*_metadata_ascii.txt`` (or ``.txt``) file written by Leica LCS.

    Returns
    -------
    pandas.DataFrame
        One row per image channel, in the order of the ``ch00``, ``ch01``, ...
        files: ``channel``, ``sequence``, ``pmt``, ``excitation_nm`` (laser
        line with a non-zero AOTF setting), ``laser_pct`` (its AOTF
        transmission, %), ``band_low_nm``, ``band_high_nm`` (the SP mirror
        edges of the PMT), ``pmt_hv`` (detector voltage).

    Notes
    -----
    In a sequential scan each ``HARDWARE PARAMETER #0 SEQUENCE n`` block
    holds the settings of scan n; its active PMTs, in PMT order, give
    channels ``4 (n - 1)`` onwards. Without sequence blocks the single
    ``HARDWARE PARAMETER #0`` block is used. A sequence with several lasers
    on takes the strongest as its excitation line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: Leica metadata file not found")
    text = path.read_text(encoding="latin-1")
    blocks = re.split(r"^(HARDWARE PARAMETER #\d+(?: SEQUENCE \d+)?)\s*$", text, flags=re.M)
    sections = {blocks[i].strip(): blocks[i + 1] for i in range(1, len(blocks) - 1, 2)}
    seq = sorted(
        (k for k in sections if "SEQUENCE" in k), key=lambda k: int(k.rsplit(" ", 1)[1])
    ) or [k for k in sections if k.startswith("HARDWARE PARAMETER")][:1]
    if not seq:
        raise InputError(f"{path}: no 'HARDWARE PARAMETER' section; not a Leica LCS metadata file")
    rows = []
    for s_i, key in enumerate(seq, start=1):
        body = sections[key]
        lasers, active, hv, mirror = {}, {}, {}, {}
        for line in body.splitlines():
            line = line.strip()
            if m := _AOTF.match(line):
                wl, pct = float(m.group(1)), float(m.group(2))
                lasers[wl] = max(lasers.get(wl, 0.0), pct)
            elif m := _PMT_ACTIVE.match(line):
                active[int(m.group(1))] = m.group(2) == "Active"
            elif m := _PMT_HV.match(line):
                hv[int(m.group(1))] = float(m.group(2))
            elif m := _MIRROR.match(line):
                mirror[(int(m.group(1)), m.group(2))] = float(m.group(3))
        on = {wl: pct for wl, pct in lasers.items() if pct > 0}
        if not on:
            raise InputError(f"{path}: {key}: no laser line with a non-zero AOTF setting")
        ex_wl = max(on, key=on.get)
        for pmt in sorted(p for p, a in active.items() if a):
            lo, hi = mirror.get((pmt, "left")), mirror.get((pmt, "right"))
            if lo is None or hi is None:
                raise InputError(f"{path}: {key}: no SP Mirror {pmt} band edges for active PMT {pmt}")
            rows.append(
                dict(sequence=s_i, pmt=pmt, excitation_nm=ex_wl, laser_pct=on[ex_wl],
                     band_low_nm=lo, band_high_nm=hi, pmt_hv=hv.get(pmt, np.nan))
            )
    out = pd.DataFrame(rows)
    out.insert(0, "channel", np.arange(len(out)))
    return out
