"""All of qdquant's file reading and writing.

Images are read lazily (tifffile's zarr store wrapped in dask) so a whole slide
never has to fit in memory; outputs are written atomically (to a temporary
sibling, renamed when complete) so a failed step leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import threading
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import tifffile
import zarr

from qdquant.errors import InputError

#: OME length units and their size in micrometres.
_UNIT_UM = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}

NGFF_IMAGE_PATH = "0"  # level-0 dataset of the abundance multiscale


@dataclass(frozen=True)
class Cube:
    """A lazily read multispectral image.

    Attributes
    ----------
    data : (C, Y, X) dask array
        Level 0 of the image, in the file's dtype.
    pixel_size_um : float or None
        PhysicalSizeX from the OME metadata, in micrometres, if present.
    path : Path
        The file it was read from.
    tiles : (C, Y, X) dask array or None
        The same image chunked as the file stores it (its tiles or strips).
        Read a small part of the image (a sample window) from it: a window
        of :attr:`data`, whose chunks merge many tiles, decodes whole chunks.
    """

    data: da.Array
    pixel_size_um: float | None
    path: Path
    _handle: object = None
    tiles: da.Array | None = None

    def close(self) -> None:
        """Close the file behind :attr:`data` (which cannot be read after)."""
        if self._handle is not None:
            self._handle.close()

    def __enter__(self) -> "Cube":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decoded_once(cube: Cube) -> Cube:
    """``cube`` decoded into memory when :attr:`Cube.data` is a single chunk; else ``cube``.

    A step that reads a cube several times (the unmix step: the shading
    estimate, the sample windows, the fit, the residual flags, QC) decodes
    a compressed file again at each read. A cube of one chunk (a field of
    view, a TMA core, a region of up to ``chunk_size``² pixels) is what the
    step's memory allows a chunk anyway (:func:`qdquant.config.chunk_size_for`),
    so it is decoded once and held. A larger cube (a whole slide) stays
    lazy, read chunk by chunk at each pass. :attr:`Cube.tiles` keeps the
    file's tiling in Y and X (over the held array; every band a chunk), so
    what is sampled from it is unchanged.
    """
    if cube.data.npartitions != 1:
        return cube
    array = np.asarray(cube.data.compute())
    data = da.from_array(array, chunks=cube.data.chunks, name=False)
    tiles = None if cube.tiles is None else da.from_array(array, chunks=(-1,) + cube.tiles.chunks[1:], name=False)
    return replace(cube, data=data, tiles=tiles)


def _ome_pixel_size_um(ome_xml: str | None) -> float | None:
    if not ome_xml:
        return None
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
            unit = el.attrib.get("PhysicalSizeXUnit", "µm")
            size = float(el.attrib["PhysicalSizeX"]) * _UNIT_UM.get(unit, 1.0)
            return size if size > 0 else None
    return None


def _band_axis_last(axes: str) -> bool:
    """True for interleaved cubes (Y, X, bands): tifffile's axes 'YXS' or 'YXC'."""
    return len(axes) == 3 and axes[:2] == "YX" and axes[2] in "SC"


def _why_not_a_file(path: Path) -> str:
    """Why ``path`` cannot be read as an image file, in a few words."""
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop, not an image file"
        if path.is_symlink():
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        return "image file not found"
    if path.is_dir():
        return "is a directory, not an image file (name the .ome.tif inside it)"
    return "is not a regular file (a device, socket or pipe), not an image file"


@contextlib.contextmanager
def _tifffile_errors():
    """The messages tifffile logs as errors meanwhile (it logs a damaged structure and goes on)."""
    import logging

    messages = []

    class _Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = _Collect(level=logging.ERROR)
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _check_complete(path: Path, tif, series, shape) -> None:
    """A clear error for a file cut short: image data past its end, or fewer bands than its
    OME metadata declares (a cut between pages). Reads offsets only, no pixel data."""
    size = path.stat().st_size
    for band, page in enumerate(series.levels[0].pages):
        if page is None or not hasattr(page, "dataoffsets"):
            continue
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        if ends and max(ends) > size:
            raise InputError(f"{path}: truncated: the image data of band {band} runs to byte {max(ends):,} "
                             f"of a {size:,}-byte file")
    if tif.ome_metadata:
        declared = re.search(r'<Pixels[^>]*\bSizeC="(\d+)"', tif.ome_metadata)
        bands = 1 if _band_axis_last(series.axes) else shape[0]
        if declared and int(declared.group(1)) > bands and not _band_axis_last(series.axes):
            raise InputError(f"{path}: truncated or incomplete: its OME metadata declares "
                             f"{declared.group(1)} bands, the file holds {bands}")


def read_cube_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype, float | None]:
    """Shape (C, Y, X), dtype and pixel size of an image's level 0, reading only metadata.

    Planar files (one page per band: axes CYX, or QPTIFF's) and interleaved
    ones (bands as samples of each pixel: YXS) are both (C, Y, X) here.

    Raises
    ------
    InputError
        When the file is missing, not a readable TIFF, or not a (C, Y, X) cube.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {_why_not_a_file(path)}")
    try:
        with _tifffile_errors() as damage, tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, dtype = tuple(series.levels[0].shape), np.dtype(series.dtype)
            if _band_axis_last(series.axes):
                shape = (shape[2], shape[0], shape[1])
            pixel_size = _ome_pixel_size_um(tif.ome_metadata)
            _check_complete(path, tif, series, shape)
        offsets = [m for m in damage if "offset" in m]
        if offsets:  # tifffile skips what points past the end and reads on: fewer bands, no metadata
            raise InputError(f"{path}: truncated or damaged: {offsets[0]}")
    except InputError:
        raise
    except (tifffile.TiffFileError, ValueError, IndexError, OSError, KeyError) as exc:
        raise InputError(f"{path}: not a readable TIFF ({exc})") from None
    if len(shape) != 3:
        raise InputError(f"{path}: expected a (C, Y, X) multispectral cube, got shape {shape}")
    if dtype not in (np.uint8, np.uint16, np.float32):
        raise InputError(f"{path}: unsupported dtype {dtype} (uint8, uint16 or float32)")
    if min(shape) == 0:
        raise InputError(f"{path}: the image is empty (shape {shape})")
    return shape, dtype, pixel_size


def open_cube(path: str | os.PathLike, *, chunk_size: int = 2048) -> Cube:
    """Open level 0 of an OME-TIFF/QPTIFF/TIFF cube lazily, chunked (C, chunk, chunk).

    Parameters
    ----------
    path : path-like
        Tiled, striped or pyramidal TIFF holding a (C, Y, X) cube, planar
        (a page per band) or interleaved (bands as samples).
    chunk_size : int
        Edge of the dask chunks in pixels, Y and X; all bands share a chunk.

    Use it as a context manager (``with open_cube(path) as cube: ...``) so the
    file is closed when done.
    """
    path = Path(path)
    _, _, pixel_size = read_cube_header(path)
    level0 = _TiffLevel0(path)
    tiles = da.from_array(level0, chunks=level0.chunks, asarray=True, meta=np.empty((0,) * level0.ndim, level0.dtype))
    if _band_axis_last(level0.axes):
        tiles = tiles.transpose(2, 0, 1)
    data = tiles.rechunk((tiles.shape[0], chunk_size, chunk_size))
    return Cube(data=data, pixel_size_um=pixel_size, path=path, _handle=level0, tiles=tiles)


def _describe_key(key, axes: str) -> str:
    """A dask block's index into level 0, as 'band 3, Y 0-255, X 256-511' (tifffile's axes)."""
    key = key if isinstance(key, tuple) else (key,)
    parts = []
    for axis, index in zip(axes, key):
        if isinstance(index, slice):
            if index.start is None and index.stop is None:
                continue
            start = index.start or 0
            text = f"{start}" if index.stop is not None and index.stop - start == 1 else f"{start}-{'' if index.stop is None else index.stop - 1}"
        else:
            text = str(index)
        parts.append(f"{'band' if axis in 'CISQ' else axis} {text}")
    return ", ".join(parts) or "the whole image"


class _TiffLevel0:
    """Level 0 of a TIFF's first series, read through tifffile's zarr store, as a picklable array.

    A copy sent to another process (dask's ``processes`` scheduler, a
    ``dask.distributed`` worker) reopens the file there by its absolute path
    on its first read (a worker's working directory is not the step's), so a
    lazily read cube can be computed anywhere the path is; errors name the
    path as it was given.
    """

    def __init__(self, path: Path):
        self.shown = str(path)
        self.path = Path(path).absolute()
        self.__setstate__({"path": self.path})
        array = self._open()
        self.shape, self.dtype, self.ndim, self.chunks = array.shape, array.dtype, array.ndim, array.chunks
        self.axes = self._tif.series[0].axes

    def _open(self):
        with self._lock:
            if self._array is None:
                self._tif = tifffile.TiffFile(self.path)
                self._array = zarr.open(self._tif.series[0].aszarr(level=0), mode="r")
            return self._array

    def __getitem__(self, key):
        try:
            return self._open()[key]
        except (RuntimeError, ValueError, OSError, tifffile.TiffFileError) as exc:
            # a codec's error (imagecodecs.DeflateError, ...) on a corrupt or truncated tile:
            # one line naming the file and the pixels being read
            raise InputError(
                f"{self.shown}: cannot decode the image data at {_describe_key(key, self.axes)}"
                f" (corrupt or truncated file: {type(exc).__name__}: {exc})"
            ) from None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_tif", "_array")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _tif=None, _array=None)

    def __dask_tokenize__(self):
        stat = self.path.stat()
        return ("qdquant-tiff-level0", str(self.path.resolve()), stat.st_size, stat.st_mtime_ns)

    def close(self) -> None:
        with self._lock:
            if self._tif is not None:
                self._tif.close()
            self._tif = self._array = None


#: Image data beyond this many bytes is written as BigTIFF (classic TIFF stops at 4 GiB).
BIGTIFF_BYTES = 2**32 - 2**25


def write_ome_tiff(
    path: str | os.PathLike,
    cube,
    *,
    pixel_size_um: float,
    channel_names: list[str] | None = None,
    tile: int = 256,
    interleaved: bool = False,
    compression: str | None = "zlib",
) -> None:
    """Write a (C, Y, X) numpy or dask array as a tiled, zlib-compressed OME-TIFF.

    The cube is written tile by tile and never has to be in memory whole.
    ``interleaved=True`` stores the bands as samples of each pixel (YXS): each
    tile then holds every band, so a cube computed tile by tile (a whole
    simulated slide) is computed once, and a reader gets a pixel's spectrum
    from one tile.
    """
    path = Path(path)
    n_channels, height, width = cube.shape
    metadata = {
        "axes": "YXS" if interleaved else "CYX",
        "PhysicalSizeX": float(pixel_size_um),
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": float(pixel_size_um),
        "PhysicalSizeYUnit": "µm",
    }
    if channel_names is not None and not interleaved:
        metadata["Channel"] = {"Name": list(channel_names)}

    def padded(block, shape):
        out = np.zeros(shape, dtype=cube.dtype)
        out[tuple(slice(0, n) for n in block.shape)] = block
        return out

    def planar_tiles():
        for c in range(n_channels):
            for y in range(0, height, tile):
                band = np.asarray(cube[c, y : y + tile, :])
                for x in range(0, width, tile):
                    yield padded(band[:, x : x + tile], (tile, tile))

    def interleaved_tiles():
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                block = np.asarray(cube[:, y : y + tile, x : x + tile]).transpose(1, 2, 0)
                yield padded(block, (tile, tile, n_channels))

    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            interleaved_tiles() if interleaved else planar_tiles(),
            # classic TIFF offsets are 32-bit: a whole slide needs BigTIFF (tifffile
            # cannot tell from tiles coming out of a generator)
            bigtiff=cube.dtype.itemsize * n_channels * height * width > BIGTIFF_BYTES,
            shape=(height, width, n_channels) if interleaved else cube.shape,
            dtype=cube.dtype,
            tile=(tile, tile),
            photometric="minisblack",
            planarconfig="contig" if interleaved else None,  # planar: a page per band
            compression=compression,
            metadata=metadata,
            ome=True,
        )


# ----------------------------------------------------------------------------
# atomic outputs


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling of ``path``; rename it to ``path`` on success.

    On an exception the temporary file or folder is removed and ``path`` is
    left as it was, so a failed step leaves nothing half-written; what a
    killed step left (a ``.{name}.tmp-*`` sibling) is removed first.
    """
    path = Path(path).absolute()  # dask tasks may write into it from another working directory
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    stem = path.name.removesuffix(suffix)
    _remove_stale(path.parent, f".{stem}.tmp-*{suffix}")  # left by a step killed while writing it
    _remove_stale(path.parent, f"..{stem}.tmp-*")  # and what it built beside that (label images of a store)
    tmp = path.with_name(f".{stem}.tmp-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_csv(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a table as CSV atomically (no index column)."""
    write_csv_slices([table], path)


def write_csv_slices(tables, path: str | os.PathLike) -> None:
    """Write an iterable of tables (slices of the rows of one table) as one CSV, atomically.

    The header comes from the first; only one slice is in memory at a time
    when ``tables`` is a generator. At least one table is needed (a table
    without rows gives the header alone).
    """
    with atomic_path(path) as tmp:
        for i, table in enumerate(tables):
            table.to_csv(tmp, mode="a" if i else "w", header=not i, index=False)


# ----------------------------------------------------------------------------
# OME-Zarr


#: The coarsest pyramid level is at most this many pixels across (a viewer shows a whole slide
#: from it at once), and the pyramid has at least 4 levels where the image allows.
PYRAMID_COARSEST_PX = 1024


#: Edge of the stored chunks at most (px). A viewer reads a whole chunk for any pixel of it: a
#: screenful of a whole slide then reads a few MB per channel, not tens; the steps read
#: several stored chunks per dask chunk (``chunk_size``).
STORE_CHUNK_PX = 1024


def store_chunk(chunk_size: int) -> int:
    """The stored chunk edge for a processing ``chunk_size``: the largest divisor of it up to
    :data:`STORE_CHUNK_PX` (every processing chunk is then whole stored chunks, so no two tasks
    ever write one stored chunk), or ``chunk_size`` itself when it has no such divisor of 256 or more."""
    for parts in range(-(-chunk_size // STORE_CHUNK_PX), chunk_size // 256 + 1):
        if chunk_size % parts == 0:
            return chunk_size // parts
    return chunk_size


def _dask_chunks(array: zarr.Array, chunk_size: int | None) -> tuple[int, ...]:
    """Dask chunks reading ``chunk_size``² of the last two axes per task (the stored chunks when None)."""
    if chunk_size is None:
        return array.chunks
    return (*array.chunks[:-2], chunk_size, chunk_size)


def pyramid_factors(shape_yx: tuple[int, int]) -> tuple[int, ...]:
    """Downsampling factors (2, 4, 8, ...) of the pyramid levels below level 0.

    At least three (while the level stays 16 px or more across), and more
    until the coarsest level is at most :data:`PYRAMID_COARSEST_PX` across.
    """
    factors, f = [], 2
    while min(shape_yx) // f >= 16 and (len(factors) < 3 or max(shape_yx) // (f // 2) > PYRAMID_COARSEST_PX):
        factors.append(f)
        f *= 2
    return tuple(factors)


def write_ome_zarr(
    path: str | os.PathLike,
    image: da.Array,
    channel_names: list[str],
    *,
    pixel_size_um: float,
    chunk_size: int = 2048,
    colours: list[str] | None = None,
    roles: list[dict] | None = None,
    atomic: bool = True,
) -> None:
    """Write a (C, Y, X) float image as an OME-NGFF 0.4 multiscale, channels named.

    Written to a temporary folder and renamed when complete; with
    ``atomic=False``, straight into ``path`` (for a caller that writes the
    store's label images too before renaming it: ``with atomic_path(p) as
    tmp: write_ome_zarr(tmp, ..., atomic=False); write_labels(tmp, ...)``).
    The ``omero``
    block that names the channels (and gives each its ``colours`` entry, an
    ``RRGGBB`` hex string; white when None) is written here, not by
    ``ome-zarr`` (whose ``write_image`` drops it). ``roles``, one dict per
    channel (e.g. ``{"marker": "HER2", "role": "marker"}``), is stored as the
    store's ``qdquant`` attribute, which other OME-NGFF readers ignore.
    """
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    if image.shape[0] != len(channel_names):
        raise InputError(
            f"{path}: {image.shape[0]} channels but {len(channel_names)} channel names"
        )
    colours = ["FFFFFF"] * len(channel_names) if colours is None else list(colours)
    if len(colours) != len(channel_names):
        raise InputError(f"{path}: {len(colours)} colours for {len(channel_names)} channels")
    image = da.asarray(image).rechunk((1, chunk_size, chunk_size))
    factors = pyramid_factors(image.shape[1:])
    with atomic_path(path) if atomic else contextlib.nullcontext(Path(path).absolute()) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        write_image(
            image,
            root,
            axes="cyx",
            fmt=FormatV04(),
            scale_factors=factors,
            storage_options={"chunks": (1, store_chunk(chunk_size), store_chunk(chunk_size))},
            scale={"c": 1.0, "y": pixel_size_um, "x": pixel_size_um},
            axes_units={"y": "micrometer", "x": "micrometer"},
        )
        # display windows from the coarsest stored level: cheap, and never
        # recomputes the (lazy) image
        datasets = root.attrs["multiscales"][0]["datasets"]
        coarsest = np.asarray(root[datasets[-1]["path"]][:], dtype=np.float32)
        root.attrs["omero"] = {
            "version": "0.4",
            "channels": [
                {"label": name, "active": True, "color": colour, "window": _window(coarsest[i])}
                for i, (name, colour) in enumerate(zip(channel_names, colours))
            ],
        }
        if roles is not None:
            root.attrs["qdquant"] = {"channels": [{"label": n, **r} for n, r in zip(channel_names, roles)]}


def _window(thumb: np.ndarray) -> dict:
    """Display range of one channel's thumbnail."""
    hi = float(np.percentile(thumb, 99.5)) if thumb.size else 1.0
    return {"start": 0.0, "end": max(hi, 1e-6), "min": 0.0, "max": float(thumb.max(initial=1.0))}


def _first_dataset(group: zarr.Group) -> str:
    return group.attrs["multiscales"][0]["datasets"][0]["path"]


def read_multiscale(path: str | os.PathLike) -> list[da.Array]:
    """Every level of an OME-Zarr multiscale image (finest first), as lazy dask arrays."""
    group = zarr.open_group(str(path), mode="r")
    return [da.from_zarr(group[d["path"]]) for d in group.attrs["multiscales"][0]["datasets"]]


def read_ome_zarr(path: str | os.PathLike, chunk_size: int | None = None) -> tuple[da.Array, list[str]]:
    """Level 0 of an abundance OME-Zarr as a (C, Y, X) dask array (``chunk_size``² per chunk; the
    stored chunks when None), and its channel names."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: OME-Zarr not found")
    root = zarr.open_group(str(path.absolute()), mode="r")  # absolute: read by workers elsewhere
    names = [c["label"] for c in root.attrs["omero"]["channels"]]
    array = root[_first_dataset(root)]
    return da.from_zarr(array, chunks=_dask_chunks(array, chunk_size)), names


def write_labels(
    zarr_path: str | os.PathLike,
    labels: dict,
    *,
    chunk_size: int = 2048,
    group_metadata: bool = True,
) -> None:
    """Write (Y, X) integer label images under ``{zarr_path}/labels/{name}``.

    ``labels`` maps names to numpy or dask arrays; they are computed together
    in one pass (label images that share a lazy graph, as nuclei and cells
    do, are segmented once) and staged at full resolution in a temporary
    directory (``$TMPDIR``), from which the pyramid is then built: the peak
    memory is that of the larger of the two passes, not of both at once.
    Each is built beside the store (``.{store}.labels-tmp-*``) and moved into
    ``labels/`` when complete, so readers never see a partial label image
    and nothing temporary is ever inside the store; leftovers of a killed
    step are removed first. Every level
    carries the image's physical scale (µm) and axis units.

    The ``labels`` group's own metadata (``labels/.zgroup``, and ``labels/.zattrs``
    listing every label image in it) is written too; with
    ``group_metadata=False`` it is not (the unmix step's ``flagged``: the
    segment step writes the group's metadata, and each step only its own files).
    """
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_label_metadata, write_multiscale

    zarr_path = Path(zarr_path).absolute()  # dask tasks write here, maybe from another directory
    root = zarr.open_group(str(zarr_path), mode="r+")
    # Label images are built beside the store, not in it, and moved in when complete; what a
    # killed step left there (or, from older versions, inside labels/) goes first.
    _remove_stale(zarr_path.parent, f".{zarr_path.name}.labels-tmp-*")
    _remove_stale(zarr_path / "labels", ".*.tmp-*")
    building = zarr_path.parent / f".{zarr_path.name}.labels-tmp-{uuid.uuid4().hex[:8]}"
    building_root = zarr.open_group(str(building), mode="w", zarr_format=2)
    staging = scratch_dir(zarr_path.parent, prefix="qdquant-labels-")
    try:
        staged = {}
        for name, image in labels.items():
            staged[name] = zarr.open_array(
                str(Path(staging.name) / name), mode="w", shape=image.shape, dtype=image.dtype,
                chunks=(chunk_size, chunk_size), fill_value=0,
            )
        # Dask chunks on the Zarr chunks, so that no two tasks write one chunk (no lock needed).
        da.store([da.asarray(image).rechunk((chunk_size, chunk_size)) for image in labels.values()],
                 list(staged.values()), lock=False)
        if group_metadata:
            root.require_group("labels")  # where the finished label images move
        (zarr_path / "labels").mkdir(exist_ok=True)
        # the image's own physical scale per level, so that labels land on the image in any viewer
        image_levels = root.attrs["multiscales"][0]["datasets"]
        spatial = [ax.get("unit") for ax in root.attrs["multiscales"][0]["axes"]][-2:]
        axes = [{"name": a, "type": "space", **({"unit": u} if u else {})} for a, u in zip("yx", spatial)]
        for name, level0 in staged.items():
            # Nearest-neighbour levels, each read from the staged level 0 and
            # written in turn, so that no level waits in memory for another.
            factors = pyramid_factors(level0.shape)
            pyramid = [da.from_zarr(level0)] + [
                da.from_zarr(level0)[f // 2 :: f, f // 2 :: f].rechunk(chunk_size) for f in factors
            ]
            # level k holds level 0's pixels f // 2, f // 2 + f, ... (f = 2**k): its scale is the image's
            # at that level, its origin the physical position of pixel f // 2
            base = image_levels[0]["coordinateTransformations"][0]["scale"][-2:]
            transforms = [[{"type": "scale", "scale": [b * f for b in base]},
                           {"type": "translation", "translation": [b * (f // 2) for b in base]}]
                          for f in [1, *factors]]
            group = building_root.require_group(name)
            write_multiscale(pyramid, group, fmt=FormatV04(), axes=axes, name=name,
                             storage_options={"chunks": (store_chunk(chunk_size),) * 2})
            # set here: ome-zarr's scale argument cannot say where a level's pixels lie
            multiscales = group.attrs["multiscales"]
            for dataset, transform in zip(multiscales[0]["datasets"], transforms):
                dataset["coordinateTransformations"] = transform
            group.attrs["multiscales"] = multiscales
            write_label_metadata(building_root, name, fmt=FormatV04())
        for name in labels:
            final = zarr_path / "labels" / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(building / name, final)
    finally:
        staging.cleanup()
        shutil.rmtree(building, ignore_errors=True)
        folder = zarr_path / "labels"
        if group_metadata and (folder / ".zgroup").is_file():
            group = zarr.open_group(str(folder), mode="r+")
            known = [n for n in group.attrs.get("labels", []) if n not in labels]
            known += sorted(p.name for p in folder.iterdir()  # written without the group's metadata
                            if (p / ".zattrs").is_file() and p.name not in known and p.name not in labels)
            known += [n for n in labels if (folder / n).exists()]
            group.attrs["labels"] = known


def on_distributed_cluster() -> bool:
    """Whether dask computes on a ``dask.distributed`` cluster here (its client is the scheduler)."""
    import dask.base

    try:
        from distributed import Client
    except ImportError:
        return False
    return isinstance(getattr(dask.base.get_scheduler(), "__self__", None), Client)


def scratch_dir(near: str | os.PathLike, *, prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary directory that dask tasks write to and read back from.

    On local disk (``$TMPDIR``) with the local schedulers; beside ``near``
    (an output's folder, on the filesystem the cluster shares) when the
    tasks run on a ``dask.distributed`` cluster, whose workers may sit on
    other nodes, where the client's ``$TMPDIR`` is not theirs. The path is
    absolute either way. Use it as a context manager, or call ``cleanup()``.
    """
    if not on_distributed_cluster():
        return tempfile.TemporaryDirectory(prefix=prefix)
    near = Path(near).absolute()
    near.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".{prefix}", dir=near)


def _remove_stale(folder: Path, pattern: str) -> None:
    """Remove what matches ``pattern`` in ``folder``: temporary files or folders of a killed step."""
    for stale in Path(folder).glob(pattern) if Path(folder).is_dir() else ():
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def read_labels(zarr_path: str | os.PathLike, name: str, chunk_size: int | None = None) -> da.Array:
    """Level 0 of ``{zarr_path}/labels/{name}`` as a (Y, X) dask array (``chunk_size``² per chunk;
    the stored chunks when None)."""
    path = Path(zarr_path) / "labels" / name
    if not path.is_dir():
        raise InputError(f"{path}: label image not found (run the segment step first)")
    group = zarr.open_group(str(path.absolute()), mode="r")  # absolute: read by workers elsewhere
    array = group[_first_dataset(group)]
    return da.from_zarr(array, chunks=_dask_chunks(array, chunk_size))


def read_pixel_size_um(zarr_path: str | os.PathLike) -> float:
    """Pixel size (µm) recorded in the level-0 scale of an OME-Zarr multiscale."""
    root = zarr.open_group(str(zarr_path), mode="r")
    for transform in root.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]:
        if transform["type"] == "scale":
            return float(transform["scale"][-1])
    raise InputError(f"{zarr_path}: no pixel size in the multiscale metadata")


def read_csv(path: str | os.PathLike, what: str = "table", **kwargs):
    """Read a CSV written by an earlier step, with a clear error when it is missing.

    ``kwargs`` go to :func:`pandas.read_csv` (e.g. ``usecols``, or
    ``chunksize`` for an iterator of tables).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found (run the earlier steps first)")
    try:
        return pd.read_csv(path, **kwargs)
    except ValueError as exc:  # e.g. a column of usecols missing
        raise InputError(f"{path}: {what}: {exc}") from None


def _anndata(cells: pd.DataFrame, markers: list[str], sample_id: str):
    import anndata

    obs_columns = [c for c in cells.columns if c not in markers and not c.endswith("_mean") and c != "CellID"]
    obs = cells[obs_columns].copy()
    for column in obs.columns:
        if obs[column].dtype == object or pd.api.types.is_string_dtype(obs[column]):
            obs[column] = obs[column].astype(str).astype("category")
    obs["imageid"] = pd.Categorical([sample_id] * len(obs))
    obs.index = [f"{sample_id}_{i}" for i in cells["CellID"]]
    return anndata.AnnData(
        X=cells[markers].to_numpy(np.float32),
        obs=obs,
        var=pd.DataFrame(index=markers),
        obsm={"spatial": cells[["X_um", "Y_um"]].to_numpy()},
        layers={
            compartment: cells[[f"{m}_{compartment}_mean" for m in markers]].to_numpy(np.float32)
            for compartment in ("nucleus", "cytoplasm", "membrane")
        },
    )


class H5adWriter:
    """Write ``cells.csv``'s content as AnnData (``.h5ad``), from tables of cells appended one at a time.

    For scanpy / squidpy / scimap users: ``X`` holds the whole-cell marker
    means (cells x markers), ``layers`` the compartment means, ``obs`` every
    other column (plus ``imageid``) and ``obsm["spatial"]`` the centroids in
    micrometres. Each table is written to a temporary file as it comes; on
    leaving the ``with`` block they are concatenated on disk (``anndata``'s
    ``concat_on_disk``, in bounded memory) and the result renamed into
    place. On an exception nothing is written.
    """

    def __init__(self, path: str | os.PathLike, *, sample_id: str):
        self.path, self.sample_id = Path(path), sample_id
        self._parts: list[Path] = []

    def __enter__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="qdquant-h5ad-")
        return self

    def append(self, cells: pd.DataFrame, markers: list[str]) -> None:
        part = Path(self._dir.name) / f"{len(self._parts)}.h5ad"
        _anndata(cells, markers, self.sample_id).write_h5ad(part)
        self._parts.append(part)

    def __exit__(self, exc_type, *_):
        try:
            if exc_type is None:
                from anndata.experimental import concat_on_disk

                with atomic_path(self.path) as tmp:
                    if len(self._parts) == 1:
                        shutil.copyfile(self._parts[0], tmp)
                    else:
                        concat_on_disk(self._parts, tmp, max_loaded_elems=10_000_000, merge="same")
        finally:
            self._dir.cleanup()
        return False
