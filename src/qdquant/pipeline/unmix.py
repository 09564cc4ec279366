"""The unmix step: a sample's cube into ``unmixed.ome.zarr`` (abundances, residual, flagged pixels).

:func:`unmix_sample` reads as the step's recipe, one named part a line: the
library checked, the camera's dark offset and the field's shading measured,
the library adapted to the slide (:mod:`qdquant.pipeline.unmix_library`), the
noise model fitted on a few windows, the fit and the pixels the library
cannot explain flagged (one pass over the cube, which reads and smooths each
block once for both), the store written, and the QC figure.
"""

from __future__ import annotations

import logging
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import zarr

from qdquant import io, unmixing
from qdquant.config import Config, check_image
from qdquant.pipeline.common import naming
from qdquant.pipeline.paths import outputs
from qdquant.pipeline.sampling import sample_windows
from qdquant.pipeline.unmix_library import (
    channel_roles,
    library_pixels,
    refined_library,
    with_control_autofluorescence,
    with_flat_endmember,
    with_regional_autofluorescence,
    with_slide_autofluorescence,
)

log = logging.getLogger("qdquant")


def _dark_offset(library, cube: io.Cube, qc_dir: Path):
    """The camera's dark offset per band, from the slide's darkest region; recorded in ``qc/dark_offset.csv``.

    Always subtracted before the fit, whether or not the library has a flat
    column (which cannot explain an offset that differs between bands).
    Returns the :class:`~qdquant.dark_offset.DarkOffset` and a warning (or None)
    when the library alone cannot explain the dark region.
    """
    from qdquant import dark_offset

    # a few dozen of the file's own tiles across the slide, not whole chunks
    dark = dark_offset.estimate_dark_offset(cube.tiles if cube.tiles is not None else cube.data)
    io.write_csv(pd.DataFrame({"wavelength_nm": library.wavelengths_nm, "dark_offset_counts": dark.counts,
                               "dark_region_sd_counts": dark.spread}), qc_dir / "dark_offset.csv")
    lo, hi = dark.counts.min(), dark.counts.max()
    log.info("dark offset %.1f-%.1f counts per band (trimmed mean of the darkest %.0f%% of %s sampled px); subtracted",
             lo, hi, 100 * dark.dark_fraction, f"{round(dark.n_pixels / dark.dark_fraction):,}")
    warning = None
    if not dark_offset.library_explains(library.spectra, dark):
        what = "a constant" if dark.is_flat else "different in each band"
        warning = (f"The spectral library cannot explain the slide's darkest region (glass) by itself: a dark "
                   f"offset of {lo:.0f}-{hi:.0f} counts ({what}) was estimated from it and subtracted "
                   "(qc/dark_offset.csv).")
        log.warning(warning)
    return dark, warning


def _shading(cfg: Config, library, cube: io.Cube, qc_dir: Path):
    """The field-of-view shading estimated on the cube (``illumination: estimate``), with the dark
    offset it leaves alone; None when off or none is found."""
    if cfg.illumination != "estimate":
        return None
    from qdquant import illumination, report

    nuclear = library.names.index(cfg.panel_row(role="nuclear_stain").endmember)
    # the camera offset the shading leaves alone: each band's low percentile (on a slide covered
    # with tissue it stays below the faintest tissue's light, which the shading does scale)
    offset = unmixing.estimate_offset(cube.tiles if cube.tiles is not None else cube.data,
                                      max_pixels=illumination.OFFSET_PIXELS)
    shading, brightness, offset = illumination.estimate_slide_shading(cube.data, library.spectra, nuclear,
                                                                      offset=offset)
    report.plot_shading(shading, brightness, qc_dir / "illumination.png")
    return None if shading.is_flat else (shading, offset)


#: Flagged pixels are grown by this margin (about the optics' blur), micrometres.
FLAG_MARGIN_UM = 0.5


def unmix_sample(cfg: Config, sample_id: str) -> None:
    """Unmix a sample's cube into ``unmixed.ome.zarr`` (abundances + residual + ``labels/flagged``).

    Also writes ``spectra_used.csv`` (the library of the fit) and the QC
    files under ``qc/`` (``unmixing.png`` and its ``.json``, ``dark_offset.csv``,
    and, where they run, the shading and library-refinement figures).
    """
    sample, out = cfg.sample(sample_id), outputs(cfg, sample_id)
    qc_dir = out["unmixing_qc"].parent
    _, pixel_size = check_image(cfg, sample)
    with io.open_cube(sample.image, chunk_size=cfg.chunk_size) as cube, naming(sample.image):
        unmixing.check_library(cfg.library.spectra, list(cfg.library.names))
        cube = io.decoded_once(cube)  # read four or five times below
        library = with_control_autofluorescence(cfg, sample, cfg.library)
        dark, dark_warning = _dark_offset(library, cube, qc_dir)
        library = with_flat_endmember(library)
        shading = _shading(cfg, library, cube, qc_dir)  # divided out before refinement and the fit
        pixels = library_pixels(cube, shading)  # read once, for both
        library = with_slide_autofluorescence(cfg, sample, library, pixels, dark.counts, qc_dir)
        library = refined_library(cfg, library, pixels, dark.counts, qc_dir)
        library = with_regional_autofluorescence(cfg, sample, library, pixels, dark.counts, cube.data.shape,
                                                 pixel_size)
        # the noise model first, on windows fitted by themselves: the flags then come from the
        # fit's own pass, each block of the cube read and smoothed once for all three outputs
        noise = _noise_model(cfg, cube, library, dark.counts, shading, pixel_size)
        data = _fit_input(cfg, cube, pixel_size, library)
        abundances, residual = _fit(cfg, sample_id, data, library, dark.counts, shading)
        unexplained = _flag_unexplained(cfg, data, residual, library, noise, dark.counts, shading)
        # the QC's statistics read a strided sample of pixels: of the cube as it is, since
        # the smoothed cube is only made by whole blocks (its means are the same)
        raw_signal = _qc_signal(cube, shading, dark.counts)
        # The store (abundances, residual, labels/flagged) is built under a temporary name and
        # renamed when complete: a reader never sees a store without its flags.
        with io.atomic_path(out["zarr"]) as store, io.scratch_dir(store.parent, prefix="qdquant-flags-") as tmp:
            staged = zarr.open_array(str(Path(tmp) / "flags"), mode="w", shape=residual.shape, dtype=bool,
                                     chunks=(cfg.chunk_size,) * 2, fill_value=False)
            _write_unmixed(cfg, store, abundances, residual, library, pixel_size,
                           also=[(unexplained.rechunk(staged.chunks), staged)])
            # grown in a pass of its own over the staged mask: a dilation needs the flags of the
            # neighbouring blocks, which the fit's pass has not made yet
            flagged = unmixing.grow_mask(da.from_zarr(staged), round(FLAG_MARGIN_UM / pixel_size))
            # the labels group's metadata is the segment step's (it lists flagged with nuclei and cells)
            io.write_labels(store, {"flagged": flagged.astype(np.uint8)}, chunk_size=cfg.chunk_size,
                            group_metadata=False)
        io.write_csv(library.to_frame(), out["spectra_used"])
        _unmixing_qc(cfg, sample_id, raw_signal, library, noise, dark.counts, [w for w in (dark_warning,) if w])


#: Edge (pixels) of the blocks the smoothing, the fit and the flags work on: the file's tiles
#: merged up to about this. Each block reads only a thin strip of its neighbours, and
#: blocks of ``chunk_size``² (whose neighbours dask would hold whole, 0.26 GB each for 31
#: bands of 2048²) are never assembled; the writer gathers the fit's outputs instead.
SMOOTHING_BLOCK_PX = 512

#: The scales of the direction of the smoothing along membranes (micrometres): the structure
#: tensor's integration, and the blur of the summed bands before their gradient. A membrane
#: between cells is about a micrometre wide; its direction holds over a couple of micrometres.
SMOOTHING_RHO_UM = 1.0
SMOOTHING_GUIDE_UM = 0.5


def _pass_blocks(cfg: Config, cube: io.Cube) -> da.Array:
    """The cube as it is, lazily, in blocks of the file's tiles merged to about
    :data:`SMOOTHING_BLOCK_PX`, all bands together."""
    source = cube.tiles if cube.tiles is not None else cube.data
    edge = min(SMOOTHING_BLOCK_PX, cfg.chunk_size)
    merged = [max(1, round(edge / max(source.chunksize[axis], 1))) * source.chunksize[axis] for axis in (1, 2)]
    return source.rechunk({0: -1, 1: merged[0], 2: merged[1]})


def _smoothing_scales(cfg: Config, pixel_size: float) -> dict:
    """The scales (pixels) of :func:`qdquant.unmixing.smooth_along_structures`, as its keywords."""
    return dict(sigma_px=cfg.unmixing.smoothing_um / pixel_size, rho_px=SMOOTHING_RHO_UM / pixel_size,
                guide_sigma_px=SMOOTHING_GUIDE_UM / pixel_size)


def membrane_guide(cfg: Config, library) -> np.ndarray | None:
    """Band weights that sum the membranes' light: the membrane stain's and the membrane markers'
    spectra, each scaled to a sum of 1 (so each gives its light's share); None without any.

    The smoothing's direction is that of this light's structure: by the total light, the
    edges of the bright nuclei would set it at the membranes between them.
    """
    names = list(library.names)
    rows = [r for r in cfg.panel if r.endmember in names
            and (r.role == "membrane_stain" or (r.role == "marker" and r.compartment == "membrane"))]
    if not rows:
        return None
    columns = library.spectra[:, [names.index(r.endmember) for r in rows]]
    return (columns / columns.sum(axis=0)).sum(axis=1)


def _fit_input(cfg: Config, cube: io.Cube, pixel_size: float, library) -> da.Array:
    """The (C, Y, X) cube the fit reads, lazily, in :func:`_pass_blocks`: smoothed along its
    membranes (:func:`membrane_guide`) when ``unmixing.smoothing_um`` > 0, else as it is."""
    blocks = _pass_blocks(cfg, cube)
    if not cfg.unmixing.smoothing_um:
        return blocks
    return unmixing.smooth_along_structures_dask(blocks, **_smoothing_scales(cfg, pixel_size),
                                                 guide_weights=membrane_guide(cfg, library))


def _fit_options(cfg: Config, offset: np.ndarray) -> dict:
    """The keyword arguments of :func:`qdquant.unmixing.unmix` that the whole cube and the noise
    model's windows share."""
    return dict(offset=offset, weights="poisson" if cfg.unmixing.poisson_weights else None)


def _fit(cfg: Config, sample_id: str, data: da.Array, library, offset: np.ndarray, shading):
    """The lazy (K, Y, X) abundances and (Y, X) residual of the fit of ``library`` to ``data``
    (from :func:`_fit_input`).

    The dark offset is subtracted and the shading divided out as the fit
    reads the cube, without a corrected copy of it.
    """
    gain = {}
    if shading is not None:
        from qdquant import illumination

        gain = dict(gain=illumination.inverse_field(shading[0], data.chunks[1:]), gain_offset=shading[1])
    log.info("unmixing %s: %s bands x %s px, %d endmembers", sample_id, data.shape[0],
             "x".join(map(str, data.shape[1:])), len(library.names))
    return unmixing.unmix(data, library.spectra, **_fit_options(cfg, offset), **gain)


#: Smallest file tile (pixels, Y and X) the QC's pass works on directly.
MIN_PASS_TILE = 256


def _qc_signal(cube: io.Cube, shading, offset: np.ndarray) -> da.Array:
    """The (C, Y, X) signal of the cube as it is, shading divided out and dark offset
    subtracted, for the QC: chunked as the file's tiles when they are not small, so no chunk
    of ``chunk_size``² is assembled from tiles for it."""
    data = cube.data
    if cube.tiles is not None and min(cube.tiles.chunksize[1:]) >= MIN_PASS_TILE:
        data = cube.tiles.rechunk({0: -1})
    if shading is not None:
        from qdquant import illumination

        data = illumination.correct_shading(data, *shading)
    return data - offset.astype(np.float32)[:, None, None]


def _write_unmixed(cfg: Config, store: Path, abundances, residual, library, pixel_size: float, *,
                   also=()) -> None:
    """Write the abundances and the residual into ``store`` as one multiscale, channels named,
    coloured and given their panel roles; ``also`` (``(array, target)`` pairs) stored in the
    same computation (:func:`qdquant.io.write_ome_zarr`)."""
    from qdquant.colours import channel_colours

    io.write_ome_zarr(
        store,
        da.concatenate([abundances, residual[None]], axis=0),
        [*library.names, "residual"],
        pixel_size_um=pixel_size,
        chunk_size=cfg.chunk_size,
        colours=[*channel_colours(library.spectra, library.wavelengths_nm), "FFFFFF"],
        roles=[*channel_roles(cfg, library), {"marker": "residual", "role": "residual"}],
        atomic=False,
        also=also,
    )


def _noise_model(cfg: Config, cube: io.Cube, library, offset: np.ndarray, shading, pixel_size: float):
    """The photon + read noise model, fitted on the windows of
    :func:`~qdquant.pipeline.sampling.cube_sample`: their signal, and the residual of the fit
    of the windows themselves.

    Each window is read with the margin that the smoothing looks at around
    a pixel (fewer pixels at the slide's edge, which the smoothing repeats
    beyond, as for the whole cube), smoothed and fitted as the whole cube
    is: its residual is the whole fit's at those pixels, known before the
    fit, so that the flags can be computed in the fit's own pass.
    """
    source = cube.tiles if cube.tiles is not None else cube.data
    scales = _smoothing_scales(cfg, pixel_size)
    margin = unmixing.smoothing_depth(**scales) if cfg.unmixing.smoothing_um else 0
    guide = membrane_guide(cfg, library)  # the whole fit's, for each window
    height, width = source.shape[1:]
    windows, _ = sample_windows(source.shape)
    boxes = [(max(y0 - margin, 0), min(y0 + h + margin, height), max(x0 - margin, 0), min(x0 + w + margin, width))
             for y0, x0, h, w in windows]
    reads = da.compute(*[source[:, ya:yb, xa:xb] for ya, yb, xa, xb in boxes])  # the windows read together
    raws, residual = [], []
    for (y0, x0, h, w), (ya, _, xa, _), read in zip(windows, boxes, reads):
        inner = (slice(None), slice(y0 - ya, y0 - ya + h), slice(x0 - xa, x0 - xa + w))
        fitted = unmixing.smooth_along_structures(read, **scales, guide_weights=guide)[inner] if margin else read[inner]
        raw = np.ascontiguousarray(read[inner])
        gain = {}
        if shading is not None:
            from qdquant import illumination

            # the gain of the fit's inverse_field, at the window's own pixels
            field = illumination.shading_field(shading[0], y0, y0 + h, x0, x0 + w)
            gain = dict(gain=(1.0 / field).astype(np.float32), gain_offset=shading[1])
            raw = unmixing.apply_gain(raw, gain["gain"], shading[1])
        fit = unmixing.unmix(np.ascontiguousarray(fitted), library.spectra, **_fit_options(cfg, offset), **gain)
        residual.append(fit[1])
        raws.append(raw)
    # the offset subtracted once, from the windows side by side (one float64 copy of them)
    signal = np.concatenate(raws, axis=-1) - offset[:, None, None]
    return unmixing.noise_model(signal, np.concatenate(residual, axis=-1))


def _flag_unexplained(cfg: Config, data: da.Array, residual: da.Array, library, noise, offset: np.ndarray,
                      shading) -> da.Array:
    """The (Y, X) pixels the library cannot explain: residual far above the noise, or broadband light.

    Tested on the signal of ``data`` (from :func:`_fit_input`) that the fit explains, per pixel,
    chunked as ``data``, not yet grown by :data:`FLAG_MARGIN_UM`; all False when
    ``unmixing.flag_poor_fit`` is off (the mask is written either way).
    """
    if not cfg.unmixing.flag_poor_fit:
        return da.zeros(residual.shape, dtype=bool, chunks=residual.chunks)
    probes = unmixing.broadband_probes(library.spectra, library.wavelengths_nm)
    gain = None
    if shading is not None:
        from qdquant import illumination

        gain = illumination.inverse_field(shading[0], data.chunks[1:])
    return da.map_blocks(_flags_of_block, data, residual, gain, offset, None if shading is None else shading[1],
                         probes, noise, len(library.names), drop_axis=0, dtype=bool)


#: Rows of a block whose signal :func:`_flags_of_block` makes at a time: the block's signal
#: (a float32 copy of all its bands) is never whole in memory beside the block itself.
FLAG_STRIP_ROWS = 64


def _flags_of_block(data: np.ndarray, residual: np.ndarray, gain, offset: np.ndarray, gain_offset, probes,
                    noise, n_endmembers: int) -> np.ndarray:
    """:func:`_flag_unexplained` of one block: both tests on its signal (float32, shading
    divided out and dark offset subtracted, as :func:`_qc_signal`'s), made a strip of rows
    at a time."""
    flagged = np.empty(residual.shape, bool)
    offset = offset.astype(np.float32)[:, None, None]
    for y in range(0, residual.shape[0], FLAG_STRIP_ROWS):
        rows = slice(y, y + FLAG_STRIP_ROWS)
        strip = data[:, rows] if gain is None else unmixing.apply_gain(data[:, rows], gain[rows], gain_offset)
        signal = strip - offset
        flagged[rows] = unmixing.flag_poor_fit(signal, residual[rows], noise) | unmixing.flag_broadband(
            signal, probes, noise, n_endmembers=n_endmembers)
    return flagged


def _unmixing_qc(cfg: Config, sample_id: str, signal: da.Array, library, noise, offset: np.ndarray,
                 warnings: list[str]) -> None:
    """``qc/unmixing.png`` (and its statistics, ``qc/unmixing.json``), from the written store."""
    from qdquant import report

    out = outputs(cfg, sample_id)
    stored, _ = io.read_ome_zarr(out["zarr"], cfg.chunk_size)
    stats = report.plot_unmixing_qc(signal, stored, library, out["unmixing_qc"],
                                    flagged=io.read_labels(out["zarr"], "flagged", cfg.chunk_size),
                                    noise=noise, dark_offset=offset, warnings=warnings)
    log.info("unmixed %s: median relative residual %.3f, %.2f%% pixels flagged", sample_id,
             stats["relative_residual_median"], 100 * stats["fraction_flagged"])
