"""OME-NGFF 0.4 (OME-Zarr) images: multiscale pyramids on the image's physical scale.

The unmix step writes its abundances and residual here; later steps, the
report and the napari viewer read them back lazily. Label images of the same
store are in :mod:`qdquant.io.labels`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from qdquant.config.defaults import default
from qdquant.errors import InputError
from qdquant.io.atomic import atomic_path

#: The coarsest pyramid level is at most this many pixels across (a viewer shows a whole slide
#: from it at once), and the pyramid has at least 4 levels where the image allows.
PYRAMID_COARSEST_PX = 1024


#: Edge of the stored chunks at most (px). A viewer reads a whole chunk for any pixel of it: a
#: screenful of a whole slide then reads a few MB per channel, not tens; the steps read
#: several stored chunks per dask chunk (``chunk_size``).
STORE_CHUNK_PX = 1024


def store_codec():
    """The stored chunks' compressor: zstd at level 1.

    On unmixed abundances (float32, photon noise) level 1 compresses about
    2x faster than zarr's default (level 3) for a store 2 % larger (ratio
    1.54 against 1.57; docs/performance.md); the values are the same.
    """
    from numcodecs import Zstd

    return Zstd(level=1)


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
    chunk_size: int = default("chunk_size"),
    colours: list[str] | None = None,
    roles: list[dict] | None = None,
    atomic: bool = True,
    also: Sequence[tuple[da.Array, zarr.Array]] = (),
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

    ``also``: ``(array, target)`` pairs, lazy arrays stored into their
    (zarr) targets in the same dask computation as the image's levels, so
    that a graph they share with the image (a fit and the flags made from
    its blocks) is computed once for both; each array chunked on whole
    chunks of its target (no two tasks write one stored chunk).
    """
    from ome_zarr.format import FormatV04
    from ome_zarr.scale import Methods
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
        levels = write_image(
            image,
            root,
            axes="cyx",
            fmt=FormatV04(),
            scale_factors=factors,
            # each level the mean of 2x2 pixels of the one above (an abundance's mean over the area;
            # half the cost of ome-zarr's default anti-aliased resize)
            method=Methods.LOCAL_MEAN,
            storage_options={"chunks": (1, store_chunk(chunk_size), store_chunk(chunk_size)),
                             "compressor": store_codec()},
            scale={"c": 1.0, "y": pixel_size_um, "x": pixel_size_um},
            axes_units={"y": "micrometer", "x": "micrometer"},
            compute=False,
        )
        # one computation: the levels and ``also`` share their graph's tasks, each run once
        da.compute(*levels, *(da.store(array, target, lock=False, compute=False) for array, target in also))
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


def read_window(path: str | os.PathLike, channel: int, ys: tuple[int, int], xs: tuple[int, int]) -> np.ndarray:
    """Rows ``ys`` and columns ``xs`` (``(start, stop)``) of one channel of level 0, read straight
    from the store.

    Only the stored chunks under the window are decoded; a slice of the dask array of
    :func:`read_ome_zarr` decodes every dask chunk it touches whole (a tile with its overlap
    touches nine). Picklable as a ``functools.partial`` of the path and channel, for workers
    elsewhere.
    """
    root = zarr.open_group(str(path), mode="r")
    return root[_first_dataset(root)][channel, ys[0]:ys[1], xs[0]:xs[1]]


def read_pixel_size_um(zarr_path: str | os.PathLike) -> float:
    """Pixel size (µm) recorded in the level-0 scale of an OME-Zarr multiscale."""
    root = zarr.open_group(str(zarr_path), mode="r")
    for transform in root.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]:
        if transform["type"] == "scale":
            return float(transform["scale"][-1])
    raise InputError(f"{zarr_path}: no pixel size in the multiscale metadata")
