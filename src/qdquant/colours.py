"""Display colours of channels, from their emission spectra."""

from __future__ import annotations

import numpy as np

__all__ = ["HER2_CLASS_COLOURS", "emission_colour", "channel_colours"]

#: One colour per HER2 class (0 blue to 3+ red), in the report's figures and the viewer.
HER2_CLASS_COLOURS = {"0": "#4575b4", "1+": "#fee090", "2+": "#fc8d59", "3+": "#d73027"}


def emission_colour(wavelength_nm: float) -> str:
    """The colour of light of one wavelength, as ``RRGGBB`` hex (no ``#``).

    Dan Bruton's piecewise-linear approximation of the visible spectrum
    (380-780 nm), dimmed towards both ends; outside it, the colour of the
    nearest end (deep violet, deep red), so that a far-red emitter still shows.

    Parameters
    ----------
    wavelength_nm : float
        Wavelength, nm.

    Returns
    -------
    str
        Six hex digits, e.g. ``"00FF00"`` near 510 nm.
    """
    w = float(np.clip(wavelength_nm, 400.0, 740.0))
    if w < 440:
        r, g, b = (440 - w) / 60, 0.0, 1.0
    elif w < 490:
        r, g, b = 0.0, (w - 440) / 50, 1.0
    elif w < 510:
        r, g, b = 0.0, 1.0, (510 - w) / 20
    elif w < 580:
        r, g, b = (w - 510) / 70, 1.0, 0.0
    elif w < 645:
        r, g, b = 1.0, (645 - w) / 65, 0.0
    else:
        r, g, b = 1.0, 0.0, 0.0
    # the eye's sensitivity falls off at both ends; keep them visible on a dark screen
    fade = 0.4 + 0.6 * (w - 400) / 20 if w < 420 else 0.4 + 0.6 * (740 - w) / 60 if w > 680 else 1.0
    return "".join(f"{round(255 * (c * fade) ** 0.8):02X}" for c in (r, g, b))


def channel_colours(spectra, wavelengths_nm) -> list[str]:
    """Each endmember's colour from its emission peak; a flat column (a dark offset) is grey.

    Parameters
    ----------
    spectra : (C, K) array_like
        The library.
    wavelengths_nm : (C,) array_like
        Band centres, nm.

    Returns
    -------
    list of K str
        ``RRGGBB`` hex colours.
    """
    from qdquant.unmixing import flat_columns

    a = np.asarray(spectra, dtype=np.float64)
    wl = np.asarray(wavelengths_nm, dtype=np.float64)
    flat = flat_columns(a)
    return ["808080" if f else emission_colour(wl[np.argmax(a[:, k])]) for k, f in enumerate(flat)]
