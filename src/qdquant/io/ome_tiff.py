"""Multispectral cubes in (OME-)TIFF/QPTIFF files: read lazily, written tile by tile.

A cube is read through tifffile's zarr store wrapped in dask, so a whole slide
never has to fit in memory; its header (shape, dtype, pixel size) is read
without touching pixel data, and a damaged or truncated file is reported in
one line naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

import dask.array as da
import numpy as np
import tifffile
import zarr

from qdquant.config.defaults import default
from qdquant.errors import InputError
from qdquant.io.atomic import atomic_path


#: OME length units and their size in micrometres.
_UNIT_UM = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


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


def open_cube(path: str | os.PathLike, *, chunk_size: int = default("chunk_size")) -> Cube:
    """Open level 0 of an OME-TIFF/QPTIFF/TIFF cube lazily, chunked (C, chunk, chunk).

    Parameters
    ----------
    path : path-like
        Tiled, striped or pyramidal TIFF holding a (C, Y, X) cube, planar
        (a page per band) or interleaved (bands as samples).
    chunk_size : int
        Edge of the dask chunks in pixels, Y and X; all bands share a chunk.
        Default: the config schema's ``chunk_size``.

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
