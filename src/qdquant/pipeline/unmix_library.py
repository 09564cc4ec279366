"""The library the unmix step fits with: the configured spectra, adapted to the slide.

In the order :func:`qdquant.pipeline.unmix.unmix_sample` applies them: the
autofluorescence spectrum from an unstained control, a flat endmember when
the library has none, the slide's own autofluorescence spectra, and library
refinement (spectral shifts measured on the slide).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from qdquant import io, unmixing
from qdquant.config import Config
from qdquant.pipeline.common import naming
from qdquant.pipeline.sampling import cube_sample

log = logging.getLogger("qdquant")


def with_control_autofluorescence(cfg: Config, sample, library):
    """The library with its autofluorescence endmember measured on the sample's unstained control."""
    if sample.unstained is None:
        return library
    from qdquant.library import autofluorescence_spectrum

    row = cfg.panel_row(role="autofluorescence")  # exactly one: checked by load_config
    with io.open_cube(sample.unstained, chunk_size=cfg.chunk_size) as control, naming(sample.unstained):
        af = autofluorescence_spectrum(cube_sample(control))
    spectra = library.spectra.copy()
    spectra[:, library.names.index(row.endmember)] = af
    log.info("autofluorescence '%s' from the unstained control %s (peak %.0f nm)", row.endmember,
             sample.unstained, library.wavelengths_nm[np.argmax(af)])
    return replace(library, spectra=spectra)


def with_flat_endmember(library):
    """The library with a flat endmember ``Offset`` appended when it has none.

    The dark offset is subtracted before the fit, but what is left of it (an
    estimate a count off, faint flat light) would otherwise be read as the
    broad endmembers and the QDs beside them; with a flat column the fit is
    the same whether or not the user's library has one.
    """
    spectra = library.spectra
    if unmixing.flat_columns(spectra).any():
        return library
    name = "Offset" if "Offset" not in library.names else "Offset_flat"
    log.info("the library has no flat endmember: '%s' (all ones) is added to the fit", name)
    return replace(library, spectra=np.column_stack([spectra, np.ones(len(spectra))]),
                   names=(*library.names, name))


#: Pixels of the slide the library is fitted to, its autofluorescence and its refinement (up to
#: 16 windows of 1024², strided): enough of the tissue's variety, a small part of a whole slide.
#: A few small windows can miss a stain's tissue (on a slide whose centre is stroma, its HER2
#: membranes), and the stain's refinement then fits noise.
LIBRARY_SAMPLING = dict(n_blocks=16, window=1024, max_pixels=200_000)


def library_pixels(cube: io.Cube, shading):
    """A function that returns the (C, Y, X) :data:`LIBRARY_SAMPLING` windows of the cube, shading
    divided out, read at its first call only (the steps that fit the library may all be off)."""
    import functools

    return functools.cache(functools.partial(cube_sample, cube, shading, **LIBRARY_SAMPLING))


def _slide_autofluorescence_row(cfg: Config, sample):
    """The panel's autofluorescence row when the slide's own autofluorescence is to be taken
    (``unmixing.autofluorescence: slide`` and no unstained control for the sample), else None."""
    if cfg.unmixing.autofluorescence != "slide" or sample.unstained is not None:
        return None
    return cfg.panel_row(role="autofluorescence")


def with_slide_autofluorescence(cfg: Config, sample, library, pixels, offset: np.ndarray, qc_dir: Path):
    """The library with its autofluorescence replaced by the slide's own (``unmixing.autofluorescence: slide``).

    The panel's autofluorescence endmember takes the spectrum of the most
    common stain-free tissue; other kinds of tissue autofluorescence found
    (stroma against epithelium) are added as endmembers ``{AF}_2``, ...
    Skipped when an unstained control gave the spectrum, or when the slide
    has too few stain-free pixels (logged). ``pixels``: :func:`library_pixels`.
    """
    row = _slide_autofluorescence_row(cfg, sample)
    if row is None:
        return library
    from qdquant.slide_autofluorescence import autofluorescence_from_slide

    names = list(library.names)
    pixels = pixels()
    pixels = pixels.reshape(pixels.shape[0], -1) - offset[:, None]
    # stain-free: no nuclear or membrane stain, and no marker spread over the cell or its cytoplasm
    stains = [names.index(r.endmember) for r in cfg.panel
              if r.role in ("nuclear_stain", "membrane_stain") or (r.role == "marker" and r.compartment in
                                                                  ("cytoplasm", "cell"))]
    afs, n = autofluorescence_from_slide(pixels, library.spectra, autofluorescence=names.index(row.endmember),
                                         stains=stains)
    if afs.shape[1] == 0:
        log.info("autofluorescence: the library's '%s' is kept (%d stain-free pixels: too few, or the library's "
                 "spectrum fits them as well)", row.endmember, n)
        return library
    k = names.index(row.endmember)
    spectra = library.spectra.copy()
    spectra[:, k] = afs[:, 0]
    extra = [f"{row.endmember}_{j + 1}" for j in range(1, afs.shape[1])]
    log.info("autofluorescence from %d stain-free pixels of the slide: %d spectra (%s; peaks %s nm)", n,
             afs.shape[1], ", ".join([row.endmember, *extra]),
             ", ".join(f"{library.wavelengths_nm[i]:.0f}" for i in afs.argmax(axis=0)))
    return replace(library, spectra=np.column_stack([spectra, afs[:, 1:]]), names=(*names, *extra))


#: Edge of the blocks (micrometres) the slide's windows are cut into and grouped by for the
#: autofluorescence of each region: a few cells, so that a block is nest or stroma.
REGION_BLOCK_UM = 8.0

#: An autofluorescence kind the stain-free pixels gave (:func:`with_slide_autofluorescence`)
#: is kept beside the regions' spectra when its cosine similarity to each is below this: another
#: emitter (red blood cells), not the tissue's autofluorescence the regions describe.
DISTINCT_COSINE = 0.98


def with_regional_autofluorescence(cfg: Config, sample, library, pixels, offset: np.ndarray, shape,
                                   pixel_size: float):
    """The library with its tissue autofluorescence fitted per region of the slide (stroma and
    epithelium apart; :mod:`qdquant.regional_autofluorescence`), after refinement.

    The library's autofluorescence as written is shifted and widened to the
    pixels of each region; the other endmembers stay as refined. Kinds the
    stain-free pixels gave that are unlike every region's are kept. Under
    the same conditions as :func:`with_slide_autofluorescence`.
    ``pixels``: :func:`library_pixels`; ``shape``: the cube's.
    """
    row = _slide_autofluorescence_row(cfg, sample)
    if row is None:
        return library
    from qdquant.pipeline.sampling import sample_windows
    from qdquant.regional_autofluorescence import autofluorescence_by_region

    name, names = row.endmember, list(library.names)
    family = [i for i, n in enumerate(names) if n == name or n.startswith(f"{name}_")]
    base = [i for i in range(len(names)) if i not in family]
    written = cfg.library.spectra[:, list(cfg.library.names).index(name)]
    windows, stride = sample_windows(shape, **LIBRARY_SAMPLING)
    sample = pixels() - offset[:, None, None]
    widths = [len(range(0, width, stride)) for _, _, _, width in windows]
    block_px = max(2, round(REGION_BLOCK_UM / (pixel_size * stride)))
    afs, fits = autofluorescence_by_region(
        np.split(sample, np.cumsum(widths)[:-1], axis=2), np.column_stack([library.spectra[:, base], written]),
        library.wavelengths_nm, autofluorescence=len(base), block_px=block_px)
    log.info("autofluorescence by region: %s", "; ".join(
        f"{f['n_pixels']} px, shift {f['shift_nm']:+.1f} nm, width x{f['widen']:.2f}, residual "
        f"-{100 * f['gain']:.1f} %{'' if f['kept'] else ' (not kept)'}" for f in fits))
    if afs.shape[1] == 0:
        return library
    from qdquant.unmixing.spectra import cosine_similarity

    others = [i for i in family if names[i] != name
              and max(cosine_similarity(library.spectra[:, i], af) for af in afs.T) < DISTINCT_COSINE]
    # the autofluorescence columns where the library has its autofluorescence (before a flat column)
    at = names.index(name)
    before, after = [i for i in base if i < at], [i for i in base if i > at]
    spectra = np.column_stack([library.spectra[:, before], afs, library.spectra[:, others],
                               library.spectra[:, after]])
    n_af = afs.shape[1] + len(others)
    return replace(library, spectra=spectra,
                   names=(*[names[i] for i in before], name, *[f"{name}_{j + 1}" for j in range(1, n_af)],
                          *[names[i] for i in after]))


#: How library refinement subsamples the :data:`LIBRARY_SAMPLING` pixels: an endmember is
#: refined on the pixels where it gives at least 10 % of the signal (PR on QD605 shares
#: nuclei with DAPI and dominates almost none, yet its drift leaks into HER2).
REFINE_SAMPLING = dict(n_pixels=100_000, min_share=0.1)


def refined_library(cfg: Config, library, pixels, offset: np.ndarray, qc_dir: Path):
    """The library the fit uses: refined on the slide (shading divided out) when the config says so.

    ``refine_library: auto`` keeps the refined spectra only when they lower
    the residual on the sampled pixels; ``true`` always, ``false`` never.
    ``pixels``: :func:`library_pixels`.
    """
    from qdquant import report

    mode = cfg.unmixing.refine_library
    if mode is False:
        return library
    refined, shifts = unmixing.refine_library(
        pixels(), library.to_frame(), library.wavelengths_nm, max_shift_nm=cfg.unmixing.max_shift_nm, offset=offset,
        **REFINE_SAMPLING,
    )
    before, after = shifts.attrs["residual_before"], shifts.attrs["residual_after"]
    kept = mode is True or after < before
    shifts["kept"] = kept
    shifts["sample_residual_before"], shifts["sample_residual_after"] = before, after
    io.write_csv(shifts, qc_dir / "library_refinement.csv")
    report.plot_library_refinement(library, refined, shifts, qc_dir / "library_refinement.png")
    log.info("library refinement: residual %.3g -> %.3g counts; %s", before, after, "kept" if kept else "not kept")
    return replace(library, spectra=refined[list(library.names)].to_numpy()) if kept else library


def channel_roles(cfg: Config, library) -> list[dict]:
    """Each endmember's marker and panel role, for viewers of ``unmixed.ome.zarr``.

    Endmembers the unmix step adds take the role of what they model: the
    slide's further autofluorescence kinds (``AF_2``, ...) that of the
    panel's autofluorescence row, a flat column ``background``.
    """
    panel = {row.endmember: row for row in cfg.panel}
    af = cfg.panel_row(role="autofluorescence")
    flat = unmixing.flat_columns(library.spectra)
    roles = []
    for name, is_flat in zip(library.names, flat):
        row = panel.get(name)
        if row is not None:
            roles.append({"marker": row.marker, "role": row.role})
        elif is_flat:
            roles.append({"marker": name, "role": "background"})
        elif af is not None and name.startswith(f"{af.endmember}_"):
            roles.append({"marker": f"{af.marker}{name[len(af.endmember):]}", "role": "autofluorescence"})
        else:
            roles.append({"marker": name, "role": "marker"})
    return roles
