"""Rendering: per-cell stains calibrated to their targets, shading and the camera cube."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from qdquant.simulate.spectra import BAND_WAVELENGTHS_NM, ENDMEMBERS, _off_library_spectra, band_spectra
from qdquant.simulate.tissue import _check, _shading_map


# ----------------------------------------------------------------------------
# rendering helpers


def _render_cells(
    target: np.ndarray,
    draw_labels: np.ndarray,
    pattern: np.ndarray,
    measure,
    sigma: float,
    *,
    iterations: int = 3,
    min_target: float = 1e-9,
    amp_min: np.ndarray | float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Blurred per-cell stain whose per-cell measurement matches ``target``.

    The stain is ``amp[label] * pattern`` on the pixels of ``draw_labels``,
    blurred by a Gaussian of ``sigma`` pixels; ``amp`` starts at ``target``
    and is rescaled by target / measured a few times (the map is linear in
    ``amp``, and a cell's measurement depends mostly on its own amplitude).

    Returns
    -------
    image : (Y, X) float32
    amp : (n + 1,) float
    """
    amp = np.asarray(target, dtype=float).copy()
    calibrate = amp > min_target
    image = None
    for it in range(iterations + 1):
        image = ndi.gaussian_filter((amp[draw_labels] * pattern).astype(np.float32), sigma)
        if it == iterations:
            break
        measured = measure(image)
        ok = calibrate & np.isfinite(measured) & (measured > 0)
        amp[ok] *= np.clip(target[ok] / measured[ok], 0.5, 2.0)
        amp = np.where(calibrate, np.maximum(amp, amp_min), amp)
    return image, amp


def _render_cube(
    rng: np.random.Generator,
    abundances: np.ndarray,
    spectra: np.ndarray,
    *,
    shading: np.ndarray,
    extra: np.ndarray | None,
    extra_spectra: np.ndarray | None,
    photons_per_count: float,
    read_noise: float,
    offset_counts: float,
) -> np.ndarray:
    """Camera counts, band by band: offset + shot noise(shading · signal) + read noise.

    ``abundances`` (K, Y, X) without the offset endmember; ``spectra`` (C, K).
    Shot noise: electrons are drawn exactly from a Poisson law where the
    expected count λ is below :data:`_POISSON_EXACT_BELOW` electrons, and from
    its normal approximation N(λ, λ) above (indistinguishable there once the
    read noise is added, and several times faster). Counts = electrons /
    photons_per_count + offset + N(0, read_noise²), rounded and clipped to
    uint16.
    """
    n_bands = spectra.shape[0]
    shape = abundances.shape[1:]
    cube = np.empty((n_bands,) + shape, dtype=np.uint16)
    signal_all = np.asarray(spectra, dtype=np.float32) @ abundances.reshape(abundances.shape[0], -1)
    if extra is not None:
        signal_all += np.asarray(extra_spectra, dtype=np.float32) @ extra.reshape(extra.shape[0], -1)
    shading = np.asarray(shading, dtype=np.float32).ravel()
    ppc = np.float32(photons_per_count)
    read_e = np.float32(read_noise * photons_per_count)  # read noise in electrons
    read_e2 = read_e * read_e
    for c in range(n_bands):
        lam = np.maximum(signal_all[c] * shading, 0.0) * ppc
        z = rng.standard_normal(lam.shape, dtype=np.float32)
        # bright pixels: shot and read noise together, one normal draw (variances add)
        counts = (lam + np.sqrt(lam + read_e2) * z) / ppc
        low = np.nonzero(lam < _POISSON_EXACT_BELOW)[0]
        counts[low] = (rng.poisson(lam[low].astype(np.float64)) + read_e * z[low]) / ppc
        counts += np.float32(offset_counts)
        cube[c] = np.clip(np.rint(counts), 0, 65535).astype(np.uint16).reshape(shape)
    return cube


#: Expected photo-electrons below which shot noise is drawn exactly (Poisson).
_POISSON_EXACT_BELOW = 12.0


def _spectral_perturbation(rng: np.random.Generator, drift_nm: float):
    """Per-endmember shift (nm) and width factor of the generating spectra vs the library."""
    shifts, widths = {}, {}
    for name in ENDMEMBERS:
        if name == "Offset":
            continue
        base = rng.uniform(0.5, 1.0)
        drift = drift_nm * rng.uniform(0.5, 1.0)
        shifts[name] = float(rng.choice([-1.0, 1.0]) * max(base, drift))
        widths[name] = float(rng.uniform(0.97, 1.03))
    return shifts, widths


def _check_camera_args(args: dict) -> None:
    """InputError for camera settings (``photons_per_count``, ``read_noise``, ``drift_nm``, ``shading``)
    out of range."""
    _check(args["photons_per_count"] > 0, "photons_per_count: must be > 0")
    _check(args.get("read_noise", 0) >= 0, "read_noise: must be >= 0")
    _check(0 <= args["drift_nm"] <= 10, "drift_nm: must be in [0, 10]")
    _check(0 <= args["shading"] < 0.9, "shading: must be in [0, 0.9)")


def _camera(rng, abund, *, drift_nm, shading, fov_px, photons_per_count, read_noise, offset_counts, af_mix=None,
            exact=False, extra=None) -> dict:
    """The library, the generating spectra (perturbed from it), the shading and the camera cube.

    ``abund`` (endmembers, Y, X) in :data:`ENDMEMBERS` order; ``extra``
    (2, Y, X), optional: off-library RBC and lipofuscin abundance. With
    ``exact``, the cube is generated with the library's spectra.

    Returns
    -------
    dict
        ``library``, ``true_spectra`` (DataFrames), ``shifts``, ``widths``
        (per endmember), ``shade`` (Y, X) and ``cube`` (31, Y, X) uint16.
    """
    shape = abund.shape[1:]
    library = band_spectra()
    shifts, widths = _spectral_perturbation(rng, drift_nm)
    if exact:
        shifts, widths = {k: 0.0 for k in shifts}, {k: 1.0 for k in widths}
    true_spectra = band_spectra(shifts, widths, af_mix=af_mix)
    shade = _shading_map(shape, shading, fov_px) if shading > 0 else np.ones(shape, np.float32)
    non_offset = [i for i, e in enumerate(ENDMEMBERS) if e != "Offset"]
    cube = _render_cube(
        rng,
        abund[non_offset],
        true_spectra[[ENDMEMBERS[i] for i in non_offset]].to_numpy(float),
        shading=shade,
        extra=extra,
        extra_spectra=None if extra is None else _off_library_spectra(BAND_WAVELENGTHS_NM)[["RBC", "lipofuscin"]]
        .to_numpy(float),
        photons_per_count=photons_per_count,
        read_noise=read_noise,
        offset_counts=offset_counts,
    )
    return {"library": library, "true_spectra": true_spectra, "shifts": shifts, "widths": widths,
            "shade": shade, "cube": cube}
