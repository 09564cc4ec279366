"""One function per workflow step: read with :mod:`qdquant.io`, call the stage
functions, write with :mod:`qdquant.io`.

The Snakemake rules and the ``qdquant`` command line both call these, so a step
run by hand is exactly the step the workflow runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import replace
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd

from qdquant import io, nucleus_size, quantification, scoring, segmentation, unmixing
from qdquant.config import Config, check_image
from qdquant.errors import InputError

log = logging.getLogger("qdquant")

#: Rows of a per-cell table written or scored at a time (measurements, cells.csv):
#: the peak memory then hardly grows with the number of cells.
TABLE_ROWS = 20_000
SECTOR_SUM = "her2_sector_sum_{:02d}"
SECTOR_NPX = "her2_sector_npx_{:02d}"


# ----------------------------------------------------------------------------
# paths: the one place that knows where each output lives


def sample_dir(cfg: Config, sample_id: str) -> Path:
    return cfg.results / sample_id


def outputs(cfg: Config, sample_id: str) -> dict[str, Path]:
    """Every per-sample output path, by name."""
    d = sample_dir(cfg, sample_id)
    return {
        "zarr": d / "unmixed.ome.zarr",
        "spectra_used": d / "spectra_used.csv",
        "unmixing_qc": d / "qc" / "unmixing.png",
        "segmentation_qc": d / "qc" / "segmentation.png",
        "nucleus_size": d / "qc" / "nucleus_size.csv",
        "measurements": d / "measurements.csv",
        "cells": d / "cells.csv",
        "summary": d / "summary.csv",
        "h5ad": d / "cells.h5ad",
        "report": d / "report.html",
    }


def calibration_path(cfg: Config) -> Path:
    return cfg.results / "calibration" / "her2_thresholds.csv"


@contextlib.contextmanager
def _about(path: Path):
    """Name ``path`` in any InputError a stage function raises while working on it."""
    try:
        yield
    except InputError as exc:
        if str(path) in str(exc):
            raise
        raise InputError(f"{path}: {exc}") from None


# ----------------------------------------------------------------------------
# steps


def _pixel_sample(*arrays: da.Array, n_blocks: int = 4, window: int = 384,
                  max_pixels: int | None = None, grid=None) -> list[np.ndarray]:
    """The same windows of a few evenly spaced chunks of lazy (..., Y, X) arrays, side by side along X.

    Enough pixels to fit a handful of parameters on (``n_blocks`` windows of
    at most ``window``² pixels, centred in their chunks), read without
    touching the rest of the slide. Chunks are those of ``grid`` (dask's
    (Y, X) chunk tuples; default the first array's). With ``max_pixels``,
    each window is strided (the same stride along Y and X) to keep at most
    about that many pixels in all.
    """
    ys, xs = grid if grid is not None else arrays[0].chunks[-2:]
    y_edges, x_edges = np.cumsum((0,) + ys), np.cumsum((0,) + xs)
    picks = np.unique(np.linspace(0, len(ys) * len(xs) - 1, min(n_blocks, len(ys) * len(xs))).round().astype(int))
    height = min(min(ys[p // len(xs)] for p in picks), window)
    windows = []
    for p in picks:
        by, bx = p // len(xs), p % len(xs)
        width = min(xs[bx], window)
        windows.append((y_edges[by] + (ys[by] - height) // 2, x_edges[bx] + (xs[bx] - width) // 2, width))
    total = height * sum(w for _, _, w in windows)
    stride = 1 if max_pixels is None else max(1, int(np.ceil(np.sqrt(total / max_pixels))))
    parts = [array[..., y0 : y0 + height : stride, x0 : x0 + width : stride]
             for array in arrays for y0, x0, width in windows]
    parts = [np.asarray(p) for p in da.compute(*parts)]  # one graph: the windows read together
    n = len(windows)
    return [np.concatenate(parts[i * n : (i + 1) * n], axis=-1) for i in range(len(arrays))]


def _cube_sample(cube: io.Cube, shading=None, **kwargs) -> np.ndarray:
    """:func:`_pixel_sample` of a cube on its chunks' grid, read from its tiles, the shading divided out.

    ``shading``: ``(Shading, offset)`` or None.
    """
    grid = cube.data.chunks[-2:]
    source = cube.tiles if cube.tiles is not None else cube.data
    if shading is None:
        return _pixel_sample(source, grid=grid, **kwargs)[0]
    from qdquant import illumination

    gain = illumination.inverse_field(shading[0], grid)
    raw, window_gain = _pixel_sample(source, gain[None], grid=grid, **kwargs)
    return unmixing.apply_gain(raw, window_gain[0], shading[1])


def _with_control_autofluorescence(cfg: Config, sample, library):
    """The library with its autofluorescence endmember measured on the sample's unstained control."""
    if sample.unstained is None:
        return library
    from qdquant.library import autofluorescence_spectrum

    row = cfg.panel_row(role="autofluorescence")  # exactly one: checked by load_config
    with io.open_cube(sample.unstained, chunk_size=cfg.chunk_size) as control, _about(sample.unstained):
        af = autofluorescence_spectrum(_cube_sample(control))
    spectra = library.spectra.copy()
    spectra[:, library.names.index(row.endmember)] = af
    log.info("autofluorescence '%s' from the unstained control %s (peak %.0f nm)", row.endmember,
             sample.unstained, library.wavelengths_nm[np.argmax(af)])
    return replace(library, spectra=spectra)


#: Pixels of the slide the autofluorescence spectra are taken from (up to 16 windows of 1024²,
#: strided): enough of the tissue's variety, a small part of a whole slide.
SLIDE_AF_SAMPLING = dict(n_blocks=16, window=1024, max_pixels=200_000)


def _slide_autofluorescence(cfg: Config, sample, library, cube: io.Cube, shading, offset: np.ndarray,
                            qc_dir: Path):
    """The library with its autofluorescence replaced by the slide's own (``unmixing.autofluorescence: slide``).

    The panel's autofluorescence endmember takes the spectrum of the most
    common stain-free tissue; other kinds of tissue autofluorescence found
    (stroma against epithelium) are added as endmembers ``{AF}_2``, ...
    Skipped when an unstained control gave the spectrum, or when the slide
    has too few stain-free pixels (logged).
    """
    row = cfg.panel_row(role="autofluorescence")
    if cfg.unmixing.autofluorescence != "slide" or row is None or sample.unstained is not None:
        return library
    from qdquant.slide_autofluorescence import autofluorescence_from_slide

    names = list(library.names)
    pixels = _cube_sample(cube, shading, **SLIDE_AF_SAMPLING)
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


#: How the unmix step samples the slide's pixels for library refinement: an endmember is
#: refined on the pixels where it gives at least 10 % of the signal (PR on QD605 shares
#: nuclei with DAPI and dominates almost none, yet its drift leaks into HER2).
REFINE_SAMPLING = dict(n_pixels=100_000, min_share=0.1)


def _library_for(cfg: Config, library, cube: io.Cube, shading, offset: np.ndarray, qc_dir: Path):
    """The library the fit uses: refined on the slide (shading divided out) when the config says so.

    ``refine_library: auto`` keeps the refined spectra only when they lower
    the residual on the sampled pixels; ``true`` always, ``false`` never.
    """
    from qdquant import report

    mode = cfg.unmixing.refine_library
    if mode is False:
        return library
    sample = _cube_sample(cube, shading, max_pixels=REFINE_SAMPLING["n_pixels"])
    refined, shifts = unmixing.refine_library(
        sample, library.to_frame(), library.wavelengths_nm, max_shift_nm=cfg.unmixing.max_shift_nm, offset=offset,
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


def _with_flat_endmember(library):
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


#: Flagged pixels are grown by this margin (about the optics' blur), micrometres.
FLAG_MARGIN_UM = 0.5


def unmix_sample(cfg: Config, sample_id: str) -> None:
    """Unmix a sample's cube into ``unmixed.ome.zarr`` (abundances + residual)."""
    from qdquant import report

    sample = cfg.sample(sample_id)
    out = outputs(cfg, sample_id)
    _, pixel_size = check_image(cfg, sample)
    with io.open_cube(sample.image, chunk_size=cfg.chunk_size) as cube, _about(sample.image):
        unmixing.check_library(cfg.library.spectra, list(cfg.library.names))
        cube = io.decoded_once(cube)  # read four or five times below
        library = _with_control_autofluorescence(cfg, sample, cfg.library)
        qc_dir = out["unmixing_qc"].parent
        dark, dark_warning = _dark_offset(library, cube, qc_dir)
        library = _with_flat_endmember(library)
        shading = _shading(cfg, library, cube, qc_dir)
        data, gain = cube.data, {}
        if shading is not None:  # divided out before refinement and the fit
            from qdquant import illumination

            data = illumination.correct_shading(cube.data, *shading)
            # the fit applies it itself as it reads the cube, without a corrected copy
            gain = dict(gain=illumination.inverse_field(shading[0], cube.data.chunks[1:]), gain_offset=shading[1])
        library = _slide_autofluorescence(cfg, sample, library, cube, shading, dark.counts, qc_dir)
        library = _library_for(cfg, library, cube, shading, dark.counts, qc_dir)
        log.info("unmixing %s: %s bands x %s px, %d endmembers", sample_id, data.shape[0],
                 "x".join(map(str, data.shape[1:])), len(library.names))
        abundances, residual = unmixing.unmix(
            cube.data,
            library.spectra,
            offset=dark.counts,
            weights="poisson" if cfg.unmixing.poisson_weights else None,
            **gain,
        )
        image = da.concatenate([abundances, residual[None]], axis=0)
        from qdquant.colours import channel_colours

        # The store (abundances, residual, labels/flagged) is built under a temporary name and
        # renamed when complete: a reader never sees a store without its flags.
        with io.atomic_path(out["zarr"]) as store:
            io.write_ome_zarr(
                store,
                image,
                [*library.names, "residual"],
                pixel_size_um=pixel_size,
                chunk_size=cfg.chunk_size,
                colours=[*channel_colours(library.spectra, library.wavelengths_nm), "FFFFFF"],
                roles=[*channel_roles(cfg, library), {"marker": "residual", "role": "residual"}],
                atomic=False,
            )
            stored, _ = io.read_ome_zarr(store, cfg.chunk_size)
            signal = data - dark.counts.astype(np.float32)[:, None, None]  # what was fitted
            # pixels the library cannot explain (residual far above photon + read noise)
            noise = unmixing.noise_model(_cube_sample(cube, shading) - dark.counts[:, None, None],
                                         _pixel_sample(stored[-1], grid=data.chunks[-2:])[0])
            if cfg.unmixing.flag_poor_fit:
                probes = unmixing.broadband_probes(library.spectra, library.wavelengths_nm)
                flagged = unmixing.flag_poor_fit(signal, stored[-1], noise) | unmixing.flag_broadband(
                    signal, probes, noise, n_endmembers=len(library.names))
                # the optics spread an emitter's light a little beyond where it is detectable
                flagged = unmixing.grow_mask(flagged, round(FLAG_MARGIN_UM / pixel_size))
            else:  # switched off: the mask stays, empty
                flagged = da.zeros(stored.shape[1:], dtype=bool, chunks=stored.chunks[1:])
            # the labels group's metadata is the segment step's (it lists flagged with nuclei and cells)
            io.write_labels(store, {"flagged": flagged.astype(np.uint8)}, chunk_size=cfg.chunk_size,
                            group_metadata=False)
        io.write_csv(library.to_frame(), out["spectra_used"])
        stored, _ = io.read_ome_zarr(out["zarr"], cfg.chunk_size)
        stats = report.plot_unmixing_qc(signal, stored, library, out["unmixing_qc"],
                                        flagged=io.read_labels(out["zarr"], "flagged", cfg.chunk_size),
                                        noise=noise,
                                        dark_offset=dark.counts, warnings=[w for w in (dark_warning,) if w])
        log.info("unmixed %s: median relative residual %.3f, %.2f%% pixels flagged", sample_id,
                 stats["relative_residual_median"], 100 * stats["fraction_flagged"])


def _channel(names: list[str], endmember: str, zarr_path: Path) -> int:
    """Index of an endmember's channel in the unmixed image, or a clear error."""
    if endmember not in names:
        raise InputError(
            f"{zarr_path}: no channel '{endmember}' (has {', '.join(names)}); the panel names an endmember"
            " the image was not unmixed with: rerun the unmix step"
        )
    return names.index(endmember)


def _panel_channel(cfg: Config, names: list[str], role: str, zarr_path: Path) -> int | None:
    row = cfg.panel_row(role=role)
    return None if row is None else _channel(names, row.endmember, zarr_path)


#: With a membrane stain, a cell may grow at least this many nucleus diameters beyond its nucleus:
#: carcinoma cells are 1.4-2.2 nucleus diameters across (nuclear:cytoplasmic area 0.5-0.2), and
#: a polygonal cell's corners lie further out than its mean radius.
CELL_EXPANSION_PER_NUCLEUS = 0.6


def segment_sample(cfg: Config, sample_id: str) -> None:
    """Segment nuclei and cells; write ``labels/nuclei`` and ``labels/cells`` into the OME-Zarr."""
    from qdquant import report

    out = outputs(cfg, sample_id)
    abundances, names = io.read_ome_zarr(out["zarr"], cfg.chunk_size)
    pixel_size = io.read_pixel_size_um(out["zarr"])
    seg = cfg.segmentation
    nuclear = abundances[_panel_channel(cfg, names, "nuclear_stain", out["zarr"])]
    membrane_idx = _panel_channel(cfg, names, "membrane_stain", out["zarr"])
    membrane = None if membrane_idx is None else abundances[membrane_idx]
    # Once per slide (a few windows of it), so that every tile uses the same size.
    hint = seg.nucleus_diameter_um
    used, estimate = nucleus_size.resolve_nucleus_diameter(nuclear, pixel_size, hint, hint=hint != "auto")
    log.info("%s: nucleus diameter %.2f um (setting %s, estimate %.2f um)", sample_id, used, hint, estimate)
    out["nucleus_size"].parent.mkdir(parents=True, exist_ok=True)
    io.write_csv(
        pd.DataFrame([{"hint_um": hint, "estimate_um": estimate, "used_um": used, "pixel_size_um": pixel_size}]),
        out["nucleus_size"],
    )
    expansion = seg.cell_expansion_um
    if membrane is not None and CELL_EXPANSION_PER_NUCLEUS * used > expansion:
        # the membrane stain stops the growth; the cap must not stop it short of a large cell's membrane
        expansion = CELL_EXPANSION_PER_NUCLEUS * used
        log.info("%s: cells may grow %.1f um (%.1f x the nucleus diameter; cell_expansion_um %s)", sample_id,
                 expansion, CELL_EXPANSION_PER_NUCLEUS, seg.cell_expansion_um)
    # Tiles wait for their neighbours on disk, not in memory: local disk ($TMPDIR), or beside
    # the outputs where the tasks run on a dask.distributed cluster (io.scratch_dir).
    with io.scratch_dir(out["zarr"].parent, prefix="qdquant-segment-") as scratch:
        nuclei, cells = segmentation.segment_chunked(
            nuclear,
            membrane,
            pixel_size_um=pixel_size,
            nucleus_diameter_um=used,
            cell_expansion_um=expansion,
            chunk_size=cfg.chunk_size,
            scratch=scratch,
        )
        io.write_labels(out["zarr"], {"nuclei": nuclei, "cells": cells}, chunk_size=cfg.chunk_size)
    report.plot_segmentation_qc(
        nuclear, io.read_labels(out["zarr"], "nuclei", cfg.chunk_size),
        io.read_labels(out["zarr"], "cells", cfg.chunk_size),
        out["segmentation_qc"],
    )


def quantify_sample(cfg: Config, sample_id: str) -> None:
    """Measure every cell (contract columns) and the HER2 membrane sectors."""
    out = outputs(cfg, sample_id)
    abundances, names = io.read_ome_zarr(out["zarr"], cfg.chunk_size)
    pixel_size = io.read_pixel_size_um(out["zarr"])
    cells = io.read_labels(out["zarr"], "cells", cfg.chunk_size)
    nuclei = io.read_labels(out["zarr"], "nuclei", cfg.chunk_size)
    flagged = _flagged(out["zarr"], cfg.chunk_size)
    measured = cfg.measured
    channels = abundances[[_channel(names, r.endmember, out["zarr"]) for r in measured]]
    width = cfg.segmentation.membrane_width_px
    table = quantification.measure_cells(
        cells, nuclei, channels, [r.marker for r in measured], width,
        pixel_size_um=pixel_size, flagged=flagged, block_size=cfg.chunk_size,
    )
    if cfg.her2 is not None:
        her2_row = cfg.panel_row(marker=cfg.her2.marker)
        sums, npx = quantification.membrane_sectors(
            cells,
            abundances[_channel(names, her2_row.endmember, out["zarr"])],
            table["CellID"].to_numpy(),
            table[["Y_centroid", "X_centroid"]].to_numpy(),
            width,
            sectors=cfg.her2.sectors,
            flagged=flagged,
            block_size=cfg.chunk_size,
        )
    log.info("measured %d cells in %s", len(table), sample_id)
    def slices():
        # A slice of rows at a time, the sector columns joined per slice: the
        # whole table with its 2 x sectors extra columns is never built.
        for start in range(0, max(len(table), 1), TABLE_ROWS):
            part = table.iloc[start : start + TABLE_ROWS]
            if cfg.her2 is not None:
                rows = slice(start, start + len(part))
                part = part.assign(
                    **{SECTOR_SUM.format(s): sums[rows, s] for s in range(cfg.her2.sectors)},
                    **{SECTOR_NPX.format(s): npx[rows, s] for s in range(cfg.her2.sectors)},
                )
            yield part

    io.write_csv_slices(slices(), out["measurements"])


def _flagged(zarr_path: Path, chunk_size: int):
    path = Path(zarr_path) / "labels" / "flagged"
    return io.read_labels(zarr_path, "flagged", chunk_size).astype(bool) if path.is_dir() else None


def _sector_arrays(table: pd.DataFrame, sectors: int) -> tuple[np.ndarray, np.ndarray]:
    sums = table[[SECTOR_SUM.format(s) for s in range(sectors)]].to_numpy(np.float64)
    npx = table[[SECTOR_NPX.format(s) for s in range(sectors)]].to_numpy(np.int64)
    return sums, npx


def calibrate(cfg: Config) -> None:
    """Fit the HER2 thresholds so the control slides score as known; write them."""
    from qdquant import report

    her2 = cfg.her2
    controls = []
    for sample in cfg.controls:
        table = io.read_csv(outputs(cfg, sample.sample_id)["measurements"], "measurements")
        controls.append((*_sector_arrays(table, her2.sectors), sample.control_score))
    fitted = scoring.calibrate_her2_thresholds(
        controls, complete_fraction=her2.complete_fraction, ultralow_min_pct=her2.ultralow_min_pct
    )
    path = calibration_path(cfg)
    io.write_csv(
        pd.DataFrame([{**fitted, "n_controls": len(controls),
                       "controls": ";".join(f"{s.sample_id}={s.control_score}" for s in cfg.controls)}]),
        path,
    )
    report.plot_calibration(controls, fitted, path.with_suffix(".png"))


def her2_thresholds(cfg: Config) -> tuple[dict, str]:
    """The HER2 thresholds in force and where they come from.

    Explicit thresholds in the config win; else those fitted on the control
    slides when the sample sheet has any; else the contract's defaults.
    """
    her2 = cfg.her2
    config_values = {"t_faint": her2.t_faint, "t_weak": her2.t_weak, "t_strong": her2.t_strong}
    if her2.thresholds_explicit or not cfg.controls:
        return config_values, "config" if her2.thresholds_explicit else "default"
    fitted = io.read_csv(calibration_path(cfg), "HER2 calibration").iloc[0]
    return {k: float(fitted[k]) for k in config_values}, "calibrated on control slides"


def _gate_column(cfg: Config) -> str:
    return f"{cfg.tumour.marker}_membrane_mean"


def _scored_column(row) -> str:
    return row.marker if row.compartment == "cell" else f"{row.marker}_{row.compartment}_mean"


def tumour_threshold(cfg: Config, gate: np.ndarray) -> float:
    """The tumour gate's threshold: from the config, or fitted on ``gate`` (every cell's gate value)."""
    return scoring.tumour_threshold_auto(gate) if cfg.tumour.threshold == "auto" else float(cfg.tumour.threshold)


def score_cell_rows(cfg: Config, table: pd.DataFrame, threshold: float | None, her2: dict | None,
                    sample_id: str | None = None) -> pd.DataFrame:
    """The contract's ``cells.csv`` columns for some rows of the measurements.

    Per cell only, so any slice of the rows gives the same result for its
    cells: ``threshold`` is the tumour gate's (:func:`tumour_threshold`),
    ``her2`` the HER2 thresholds in force (:func:`her2_thresholds`).

    Laid out for scimap's ``mcmicro_to_scimap``: ``CellID`` and the
    whole-cell marker means come before ``X_centroid`` (its markers), the
    compartment means after it (its metadata); with ``sample_id``, a last
    column ``imageid`` names the sample, which scimap then uses instead of
    the file name's stem ("cells" for every sample) to name the cells.
    """
    markers = [r.marker for r in cfg.measured]
    geometry = ["X_centroid", "Y_centroid", "X_um", "Y_um", "Area", "NucleusArea", "n_flagged_px"]
    compartments = [f"{m}_{c}_mean" for m in markers for c in quantification.COMPARTMENTS]
    cells = table[["CellID", *markers, *geometry, *compartments]].copy()
    if cfg.tumour is not None:
        cells["is_tumour"] = scoring.is_tumour(table[_gate_column(cfg)].to_numpy(np.float64), threshold)
    if cfg.her2 is not None:
        sums, npx = _sector_arrays(table, cfg.her2.sectors)
        intensity, completeness, klass = scoring.her2_cell_scores(
            sums, npx, **her2, complete_fraction=cfg.her2.complete_fraction
        )
        cells["her2_membrane_intensity"] = intensity
        cells["her2_completeness"] = completeness
        cells["her2_class"] = klass
    if sample_id is not None:
        cells["imageid"] = sample_id
    return cells


def _summary_columns(cfg: Config) -> list[str]:
    """The columns of the scored cells that :func:`summarise_cells` reads."""
    columns = ["is_tumour"] if cfg.tumour is not None else []
    columns += ["her2_class"] if cfg.her2 is not None else []
    return columns + [_scored_column(row) for row in cfg.scored]


def summarise_cells(cfg: Config, cells: pd.DataFrame, threshold: float | None, her2: dict | None,
                    her2_source: str | None) -> dict:
    """The ``summary.csv`` row from every cell's :func:`_summary_columns` (the scored cells)."""
    summary: dict = {"n_cells": len(cells)}
    population = np.ones(len(cells), dtype=bool)
    if cfg.tumour is not None:
        population = cells["is_tumour"].to_numpy(bool)
        summary["n_tumour_cells"] = int(population.sum())
        summary["tumour_threshold"] = threshold
    if cfg.her2 is not None:
        klass = cells["her2_class"].to_numpy()
        summary.update(scoring.her2_sample_score(klass[population], ultralow_min_pct=cfg.her2.ultralow_min_pct))
        summary.update({f"her2_{k}": v for k, v in her2.items()})
        summary["her2_thresholds_source"] = her2_source
    for row in cfg.scored:
        scores = scoring.marker_sample_scores(
            cells[_scored_column(row)].to_numpy(np.float64)[population],
            score=row.score, t1=row.t1, t2=row.t2, t3=row.t3, marker=row.marker,
        )
        summary.update(scores)
        summary[f"{row.marker}_status"] = scoring.receptor_status(scores[f"{row.marker}_pct_positive"])
    if cfg.subtype is not None:
        st = cfg.subtype
        summary["surrogate_subtype"] = scoring.surrogate_subtype(
            summary.get("her2_score"),
            summary[f"{st.er}_pct_positive"],
            summary[f"{st.pr}_pct_positive"],
            None if st.ki67 is None else summary[f"{st.ki67}_pct_positive"],
            pr_cutoff_pct=st.pr_cutoff_pct,
            ki67_cutoff_pct=st.ki67_cutoff_pct,
        )
    return summary


def score_cells(cfg: Config, table: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """From measurements to the contract's ``cells.csv`` columns and ``summary.csv`` row.

    Pure: a table in, a table and a dict out. :func:`score_sample` does the
    same in slices of rows, for tables larger than memory.
    """
    threshold = tumour_threshold(cfg, table[_gate_column(cfg)].to_numpy(np.float64)) if cfg.tumour else None
    her2, source = her2_thresholds(cfg) if cfg.her2 is not None else (None, None)
    cells = score_cell_rows(cfg, table, threshold, her2)
    return cells, summarise_cells(cfg, cells, threshold, her2, source)


def score_sample(cfg: Config, sample_id: str) -> None:
    """Write ``cells.csv``, ``cells.h5ad`` and ``summary.csv`` from the sample's measurements.

    The measurements are read ``TABLE_ROWS`` rows at a time and the scored
    rows appended to the outputs as they come; only the few columns the
    summary needs (:func:`_summary_columns`) are kept for every cell, so
    the memory hardly grows with the number of cells.
    """
    out = outputs(cfg, sample_id)
    threshold = None
    if cfg.tumour is not None:
        gate = io.read_csv(out["measurements"], "measurements", usecols=[_gate_column(cfg)])
        threshold = tumour_threshold(cfg, gate[_gate_column(cfg)].to_numpy(np.float64))
        del gate
    her2, source = her2_thresholds(cfg) if cfg.her2 is not None else (None, None)
    kept = []
    with io.H5adWriter(out["h5ad"], sample_id=sample_id) as h5ad:

        def scored():
            # (a table without rows still comes as one empty slice: its header is written)
            for table in io.read_csv(out["measurements"], "measurements", chunksize=TABLE_ROWS):
                cells = score_cell_rows(cfg, table, threshold, her2, sample_id)
                h5ad.append(cells, [r.marker for r in cfg.measured])
                kept.append(cells[_summary_columns(cfg)])
                yield cells

        io.write_csv_slices(scored(), out["cells"])
    summary = summarise_cells(cfg, pd.concat(kept, ignore_index=True), threshold, her2, source)
    if summary["n_cells"] == 0:
        warnings.warn(f"{sample_id}: no cells were found; the scores are not assessable", stacklevel=1)
    from qdquant import __version__

    io.write_csv(pd.DataFrame([{"sample_id": sample_id, **summary, "qdquant_version": __version__}]), out["summary"])


def report_sample(cfg: Config, sample_id: str) -> None:
    """QC figures and the one-page ``report.html``."""
    from qdquant import report

    report.write_sample_report(cfg, sample_id, outputs(cfg, sample_id))


def cohort(cfg: Config) -> None:
    """``cohort_summary.csv`` (every sample's summary row), ``cohort_report.html`` and the run's
    ``provenance/params.yml``."""
    from qdquant import report

    rows = [io.read_csv(outputs(cfg, s.sample_id)["summary"], "summary") for s in cfg.samples]
    table = pd.concat(rows, ignore_index=True)
    io.write_csv(table, cfg.results / "cohort_summary.csv")
    warnings = {}
    for sample, row in zip(cfg.samples, rows):
        stats_path = outputs(cfg, sample.sample_id)["unmixing_qc"].with_suffix(".json")
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
        warnings[str(row["sample_id"].iloc[0])] = report.sample_warnings(row.iloc[0].to_dict(), stats, cfg)
    report.write_cohort_report(cfg, table, cfg.results / "cohort_report.html", warnings)
    write_provenance(cfg)


def provenance_path(cfg: Config) -> Path:
    return cfg.results / "provenance" / "params.yml"


def write_provenance(cfg: Config) -> None:
    """``{results}/provenance/params.yml``: resolved config, thresholds and library used per sample,
    versions and input checksums (:func:`qdquant.provenance.run_record`)."""
    import yaml

    from qdquant import provenance

    record = provenance.run_record(cfg, outputs)
    with io.atomic_path(provenance_path(cfg)) as tmp:
        tmp.write_text(yaml.safe_dump(record, sort_keys=False, allow_unicode=True), encoding="utf-8")


STEPS = {
    "unmix": unmix_sample,
    "segment": segment_sample,
    "quantify": quantify_sample,
    "score": score_sample,
    "report": report_sample,
}


def run_sample(cfg: Config, sample_id: str) -> None:
    """Run every per-sample step in order (for notebooks; the workflow runs them as rules)."""
    for step in STEPS.values():
        step(cfg, sample_id)
