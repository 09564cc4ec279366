"""napari layer data for a sample's results: ``(data, kwargs, layer_type)`` tuples, read lazily.

Every layer is multiscale (the store's own pyramid, dask arrays on its
chunks), so napari reads only the level and the tiles in view: a whole
slide opens from its coarsest level, and nothing here reads more than that
or grows with the slide but the class look-up table (one byte per label id).
Physical scale (µm per pixel) on every layer. No napari import here:
colormaps are given as plain dicts.
"""

from __future__ import annotations

import json
import math

import dask.array as da
import numpy as np

from qdquant import io
from qdquant.colours import HER2_CLASS_COLOURS
from qdquant.viewer.results import SampleResults

__all__ = ["HIDDEN_ROLES", "abundance_layers", "label_layers", "class_lut", "class_levels", "class_layer",
           "cell_classes", "contrast_limits", "outline", "outline_level", "read_levels", "results_layers",
           "channels"]

#: Channels shown hidden at first: they explain light, they are not markers.
HIDDEN_ROLES = ("autofluorescence", "background", "residual")

#: Percentiles of the coarsest level that set an abundance layer's contrast limits.
CONTRAST_PERCENTILES = (0.5, 99.5)

#: Chunk size (px) of the layers' dask arrays below the coarsest level (see :func:`read_levels`).
VIEW_CHUNK_PX = 512

#: Layer name of the HER2 class overlay, and its opacity over the abundances.
CLASS_LAYER = "HER2 class"
CLASS_OPACITY = 0.6


def _hex_rgba(colour: str, alpha: float = 1.0) -> list[float]:
    colour = colour.lstrip("#")
    return [int(colour[i : i + 2], 16) / 255 for i in (0, 2, 4)] + [alpha]


def channels(results: SampleResults) -> list[dict]:
    """The store's channels: ``label``, ``colour`` (RRGGBB), ``marker`` and ``role`` each.

    Roles come from the ``qdquant`` attribute the unmix step writes; a store
    without it (another writer) gets ``residual`` for its residual channel,
    ``background`` for a flat column of the ``spectra_used.csv`` beside it,
    ``autofluorescence`` for names starting ``AF`` and ``marker`` otherwise.
    """
    attrs = json.loads((results.store / ".zattrs").read_text(encoding="utf-8"))
    known = {c["label"]: c for c in (attrs.get("qdquant") or {}).get("channels", [])}
    flat = set()
    if not known and results.table("spectra_used.csv") is not None:
        from qdquant.unmixing import flat_columns

        library = io.read_csv(results.table("spectra_used.csv"), "spectra_used").drop(columns="wavelength_nm")
        flat = set(library.columns[flat_columns(library.to_numpy(np.float64))])
    out = []
    for channel in attrs["omero"]["channels"]:
        label = channel["label"]
        guess = ("residual" if label == "residual" else "background" if label in flat
                 else "autofluorescence" if label.upper().startswith("AF") else "marker")
        info = known.get(label, {"marker": label, "role": guess})
        out.append({"label": label, "colour": channel.get("color", "FFFFFF"),
                    "marker": info.get("marker", label), "role": info.get("role", guess)})
    return out


def _contrast_limits(coarse: np.ndarray) -> list[float]:
    """Robust display range of one channel (abundances are >= 0)."""
    finite = coarse[np.isfinite(coarse)]
    if finite.size == 0:
        return [0.0, 1.0]
    lo, hi = (float(v) for v in np.percentile(finite, CONTRAST_PERCENTILES))
    lo = max(lo, 0.0)
    return [lo, hi if hi > lo else lo + 1.0]


def _stored_window(results: SampleResults) -> list[list[float]] | None:
    """Each channel's display window as qdquant's writer stored it, or None for another writer's store.

    The unmix step stores the 99.5th percentile of each channel's coarsest
    pyramid level as its OMERO ``window`` (:func:`qdquant.io.write_ome_zarr`):
    the same robust range :func:`_contrast_limits` computes, read without
    touching a chunk. Other writers' windows mean other things, so they are
    not trusted.
    """
    attrs = json.loads((results.store / ".zattrs").read_text(encoding="utf-8"))
    if "qdquant" not in attrs:
        return None
    limits = []
    for channel in attrs["omero"]["channels"]:
        window = channel.get("window") or {}
        lo, hi = (float(window.get(k, math.nan)) for k in ("start", "end"))
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi):
            return None
        limits.append([lo, hi])
    return limits


def contrast_limits(results: SampleResults, coarsest: da.Array) -> list[list[float]]:
    """Every channel's contrast limits: the stored windows, else robust percentiles of the coarsest
    level (read in one go: at most ``PYRAMID_COARSEST_PX``² per channel, whatever the slide's size)."""
    stored = _stored_window(results)
    if stored is not None and len(stored) == coarsest.shape[0]:
        return stored
    coarse = np.asarray(coarsest)
    return [_contrast_limits(coarse[c]) for c in range(coarse.shape[0])]


def _layer_name(channel: dict) -> str:
    marker, label = channel["marker"], channel["label"]
    return label if marker in (label, "residual") else f"{marker} ({label})"


def read_levels(path, view_chunk: int | None = None) -> list[da.Array]:
    """Every level of an OME-Zarr multiscale (finest first) as dask arrays, in ``view_chunk``² chunks.

    napari loads whole chunks around the view, so the chunks set how much of
    a level a screenful holds in memory (and in textures): up to two chunks
    more than the canvas in each direction. ``VIEW_CHUNK_PX`` (each task
    reads its part of a stored chunk) rather than the stored 1024² halves
    that at full resolution. The coarsest level, shown whole, keeps its
    stored chunks.
    """
    import zarr

    view_chunk = VIEW_CHUNK_PX if view_chunk is None else view_chunk
    group = zarr.open_group(str(path), mode="r")
    arrays = [group[d["path"]] for d in group.attrs["multiscales"][0]["datasets"]]
    levels = []
    for i, array in enumerate(arrays):
        chunks = array.chunks
        if i < len(arrays) - 1:
            chunks = chunks[:-2] + tuple(min(c, view_chunk) for c in chunks[-2:])
        levels.append(da.from_zarr(array, chunks=chunks))
    return levels


def abundance_layers(results: SampleResults, pixel_size_um: float) -> list[tuple]:
    """One image layer per channel: additive, coloured by the endmember's emission peak."""
    levels = read_levels(results.store)
    all_limits = contrast_limits(results, levels[-1])
    layers = []
    for c, (channel, limits) in enumerate(zip(channels(results), all_limits)):
        data = [level[c] for level in levels]
        kwargs = {
            "name": _layer_name(channel),
            "multiscale": True,
            "scale": (pixel_size_um, pixel_size_um),
            "units": ("µm", "µm"),
            "blending": "additive",
            "colormap": {"name": f"qdquant-{channel['colour']}",
                         "colors": [[0.0, 0.0, 0.0, 1.0], _hex_rgba(channel["colour"])]},
            "contrast_limits": limits,
            "visible": channel["role"] not in HIDDEN_ROLES,
            "metadata": {"qdquant_results": str(results.folder or results.store), "qdquant_channel": channel},
        }
        layers.append((data, kwargs, "image"))
    return layers


def label_levels(results: SampleResults, name: str) -> list[da.Array] | None:
    """The pyramid of ``labels/{name}``, or None when the store has no such label image."""
    path = results.store / "labels" / name
    return read_levels(path) if (path / ".zattrs").is_file() else None


def outline(labels: np.ndarray, up=None, down=None, left=None, right=None) -> np.ndarray:
    """Each label's pixels that touch another value (4-neighbours), the rest 0: its contour, 1 px wide.

    ``up``, ``down``, ``left``, ``right``: the neighbouring blocks of a
    chunked image (None at its border), whose facing rows and columns count
    as neighbours, so that a chunk's contours are those of the whole image.
    """
    edge = np.zeros(labels.shape, dtype=bool)
    rows = labels[1:] != labels[:-1]
    edge[1:] |= rows
    edge[:-1] |= rows
    cols = labels[:, 1:] != labels[:, :-1]
    edge[:, 1:] |= cols
    edge[:, :-1] |= cols
    if up is not None:
        edge[0] |= labels[0] != up[-1]
    if down is not None:
        edge[-1] |= labels[-1] != down[0]
    if left is not None:
        edge[:, 0] |= labels[:, 0] != left[:, -1]
    if right is not None:
        edge[:, -1] |= labels[:, -1] != right[:, 0]
    return np.where(edge, labels, 0)


def outline_level(level: da.Array) -> da.Array:
    """:func:`outline` of a chunked label image, chunk by chunk, with the same chunks.

    Each chunk's task takes its own block and its four neighbours' whole
    blocks (the read chunks, shared with their own tasks) and nothing else.
    ``map_overlap`` would give it 1-pixel slices of them instead, and a cache
    of read chunks (napari's) counts such a slice by its own few bytes while
    it keeps its whole chunk in memory: hundreds of MB after some panning.
    """
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    name = "qdquant-outline-" + tokenize(level)
    src, (ny, nx) = level.name, level.numblocks
    graph = {
        (name, i, j): (outline, (src, i, j),
                       (src, i - 1, j) if i > 0 else None, (src, i + 1, j) if i < ny - 1 else None,
                       (src, i, j - 1) if j > 0 else None, (src, i, j + 1) if j < nx - 1 else None)
        for i in range(ny) for j in range(nx)
    }
    return da.Array(HighLevelGraph.from_collections(name, graph, dependencies=[level]), name,
                    chunks=level.chunks, dtype=level.dtype)


def label_layers(results: SampleResults, pixel_size_um: float) -> list[tuple]:
    """``nuclei`` and ``cells`` (contours) and ``flagged`` (hidden) label layers.

    The contours are drawn from each level's chunks as they are read
    (napari's own ``contour`` is not a layer argument a reader can pass).
    """
    styles = {  # contours in one colour each: the class overlay keeps its colours
        "nuclei": {"opacity": 0.6, "colormap": [[0.0, 0.0, 0.0, 0.0], [0.55, 0.65, 1.0, 1.0]]},  # light blue
        "cells": {"opacity": 0.7, "colormap": [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]},  # white
        "flagged": {"visible": False, "opacity": 0.6, "colormap": {None: [0, 0, 0, 0], 0: [0, 0, 0, 0],
                                                                   1: [1.0, 0.0, 1.0, 1.0]}},
    }
    layers = []
    for name, style in styles.items():
        levels = label_levels(results, name)
        if levels is None:
            continue
        if name in ("nuclei", "cells"):
            levels = [outline_level(level) for level in levels]
        kwargs = {"name": name, "multiscale": True, "scale": (pixel_size_um, pixel_size_um),
                  "units": ("µm", "µm"), "metadata": {"qdquant_results": str(results.folder or results.store)},
                  **style}
        layers.append((levels, kwargs, "labels"))
    return layers


def class_lut(cell_id: np.ndarray, codes: np.ndarray, max_label: int | None = None) -> np.ndarray:
    """Look-up table from a cell's label id to its HER2 class code + 1 (0 = no cell).

    Parameters
    ----------
    cell_id : (n,) array of int
        Label ids of the cells (``CellID``).
    codes : (n,) array of int
        Class codes 0..3 (index into ``HER2_CLASSES``), -1 for none.
    max_label : int, optional
        Largest label id of the image, when above every ``cell_id``.

    Returns
    -------
    (max_label + 1,) ndarray of uint8
    """
    cell_id = np.asarray(cell_id, dtype=np.int64)
    size = max(int(cell_id.max(initial=0)), int(max_label or 0)) + 1
    lut = np.zeros(size, dtype=np.uint8)
    lut[cell_id] = np.asarray(codes, dtype=np.int16) + 1  # code -1 (no class) -> 0
    return lut


def _lookup(block: np.ndarray, lut: np.ndarray) -> np.ndarray:
    # ids beyond the table (no row in cells.csv) show as no class
    return lut[np.minimum(block, lut.size - 1)] * (block < lut.size)


def class_levels(cell_levels: list[da.Array], lut: np.ndarray) -> list[da.Array]:
    """The cells' pyramid with every cell's pixels replaced by its class code + 1, chunk by chunk."""
    return [level.map_blocks(_lookup, lut, dtype=np.uint8) for level in cell_levels]


def class_colormap() -> dict:
    """Label colours of the class overlay: code + 1 -> the class's colour, 0 transparent."""
    from qdquant.scoring import HER2_CLASSES

    colours = {None: [0.0, 0.0, 0.0, 0.0], 0: [0.0, 0.0, 0.0, 0.0]}
    colours.update({k + 1: _hex_rgba(HER2_CLASS_COLOURS[c]) for k, c in enumerate(HER2_CLASSES)})
    return colours


def _class_codes(names: np.ndarray) -> np.ndarray:
    """Class names (``HER2_CLASSES``) to codes 0..3, -1 for anything else (no class)."""
    from qdquant.scoring import HER2_CLASSES

    codes = np.full(len(names), -1, dtype=np.int8)
    for code, name in enumerate(HER2_CLASSES):
        codes[names == name] = code
    return codes


def _classes_from_h5ad(path) -> tuple[np.ndarray, np.ndarray] | None:
    """``(CellID, class code)`` of every cell from ``cells.h5ad``'s ``obs``, None when it has no
    ``her2_class``. Two columns of a binary table, not a parse of all of ``cells.csv``."""
    import h5py

    with h5py.File(path, "r") as f:
        obs = f["obs"]
        if "her2_class" not in obs:
            return None
        index = obs[obs.attrs.get("_index", "_index")].asstr()[()]
        klass = obs["her2_class"]
        if isinstance(klass, h5py.Group):  # categorical: codes into categories, -1 (missing) to ""
            categories = np.append(np.asarray(klass["categories"].asstr()[()], dtype=object), "")
            names = categories[klass["codes"][()]]
        else:
            names = np.asarray(klass.asstr()[()], dtype=object)
    # the index is "{sample_id}_{CellID}" (io.H5adWriter)
    cell_id = np.fromiter((int(s.rpartition("_")[2]) for s in index), dtype=np.int64, count=len(index))
    return cell_id, _class_codes(names)


def cell_classes(results: SampleResults) -> tuple[np.ndarray, np.ndarray] | None:
    """``(CellID, class code 0..3)`` of every cell of ``cells.csv``; None without HER2 classes.

    Read from ``cells.h5ad`` (``cells.csv``'s content, written by the same
    score step just after it) when it is there and not older than
    ``cells.csv``: a 16384² slide's ``cells.csv`` is about 200 MB of text,
    which takes seconds to parse even for two columns.
    """
    cells_csv = results.table("cells.csv")
    if cells_csv is None:
        return None
    h5ad = results.table("cells.h5ad")
    if h5ad is not None and h5ad.stat().st_mtime >= cells_csv.stat().st_mtime:
        try:
            found = _classes_from_h5ad(h5ad)
        except (OSError, KeyError, ValueError, ImportError):
            found = None  # unreadable: cells.csv says the same
        if found is not None:
            return found
    if "her2_class" not in io.read_csv(cells_csv, "cells", nrows=0).columns:
        return None
    cells = io.read_csv(cells_csv, "cells", usecols=["CellID", "her2_class"], dtype={"her2_class": str})
    return cells["CellID"].to_numpy(np.int64), _class_codes(cells["her2_class"].to_numpy(dtype=object))


def class_layer(results: SampleResults, pixel_size_um: float) -> tuple | None:
    """The cells coloured by their ``her2_class`` in ``cells.csv``; None without cells or HER2 scores."""
    cell_levels = label_levels(results, "cells")
    classes = cell_classes(results) if cell_levels is not None else None
    if classes is None:
        return None
    lut = class_lut(*classes)
    kwargs = {"name": CLASS_LAYER, "multiscale": True, "scale": (pixel_size_um, pixel_size_um),
              "units": ("µm", "µm"), "opacity": CLASS_OPACITY, "colormap": class_colormap(),
              "metadata": {"qdquant_results": str(results.folder or results.store), "qdquant_class_lut": lut}}
    return class_levels(cell_levels, lut), kwargs, "labels"


def results_layers(results: SampleResults) -> list[tuple]:
    """Every layer of a sample, bottom to top: abundances, nuclei, HER2 class, cell contours, flagged."""
    pixel_size = io.read_pixel_size_um(results.store)
    labels = {kw["name"]: (data, kw, kind) for data, kw, kind in label_layers(results, pixel_size)}
    klass = class_layer(results, pixel_size)
    ordered = [labels.get("nuclei"), klass, labels.get("cells"), labels.get("flagged")]
    return abundance_layers(results, pixel_size) + [layer for layer in ordered if layer is not None]
