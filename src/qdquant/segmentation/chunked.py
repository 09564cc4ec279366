"""Whole slides in overlapping tiles, stitched by nucleus-centroid ownership."""

from __future__ import annotations

import math

import numpy as np
import zarr

from qdquant.errors import InputError
from qdquant.segmentation._checks import (
    _as_float, _check_image, _check_scale, _diameter, _is_dask, _membrane_radius, _radius_px,
)
from qdquant.segmentation._tuning import (
    CELL_EXPANSION_UM, CHUNK_SIZE, NUCLEUS_DIAMETER_UM, _MEMBRANE_SMOOTH_UM, _MIN_AREA_Q, _SMOOTH_Q,
)
from qdquant.segmentation.cells import _cells_tile
from qdquant.segmentation.image_stats import _image_stats_lazy
from qdquant.segmentation.nuclei import _nuclei_tile

#: Least edge of the scratch's chunks (px): smaller chunks would cut a tile into more files
#: than the reads they save are worth.
SCRATCH_CHUNK_MIN_PX = 256


def _tile_task(nuc_tile, mem_tile, nstats, mstats, *, read, window, scratch, index, at, r, ps, dist_px, core, width):
    """Segment one padded tile; store the objects whose nucleus centroid is in ``core``.

    ``window`` is the padded tile's place in the slide, ``((y0, y1), (x0,
    x1))``. Its images are ``nuc_tile`` and ``mem_tile``, or, where ``read``
    is given, ``read("nuclear" | "membrane", *window)`` (see ``read_window``
    of :func:`segment_chunked`). The owned objects, numbered ``1 ..`` in this tile
    (int32, at the padded tile's full extent), are written to
    ``scratch[index]`` from position ``at`` -- nuclei in plane 0, cells in
    plane 1 -- so that dask holds only the returned keys
    between this task and the blocks that read the tile back. Returns each
    owned object's key (int64): the slide-wide raster index ``y * width + x``
    of its nucleus's first pixel in raster order, which orders the objects
    the same way whatever the tiling (:func:`_canonical_ids`).
    """
    (py0, _), (px0, _) = window
    (cy0, cy1), (cx0, cx1) = core
    if read is not None:
        nuc_tile = read("nuclear", *window)
        mem_tile = read("membrane", *window) if mstats is not None else None
    nuc = _nuclei_tile(_as_float(nuc_tile), nstats, r, py0, px0)
    cells = _cells_tile(nuc, mem_tile, mstats, ps, dist_px, py0, px0)
    n = int(nuc.max())
    if not n:
        return np.zeros(0, dtype=np.int64)
    yy, xx = np.nonzero(nuc)  # raster order
    lab = nuc[yy, xx]
    area = np.bincount(lab, minlength=n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.floor(np.bincount(lab, yy, n + 1) / area) + py0
        cx = np.floor(np.bincount(lab, xx, n + 1) / area) + px0
    own = (area > 0) & (cy >= cy0) & (cy < cy1) & (cx >= cx0) & (cx < cx1)
    own[0] = False
    ids = np.flatnonzero(own)
    present, first = np.unique(lab, return_index=True)  # each label's first pixel in raster order
    key = np.zeros(n + 1, dtype=np.int64)
    key[present] = (yy[first].astype(np.int64) + py0) * width + xx[first] + px0
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1)
    h, w = nuc.shape
    sy, sx = at
    scratch[index + (slice(None), slice(sy, sy + h), slice(sx, sx + w))] = np.stack([lut[nuc], lut[cells]])
    return key[ids]


def _canonical_ids(*keys):
    """Slide-wide ids from every tile's object keys (see :func:`_tile_task`): ``1 ..`` in key order.

    Returns one lookup table per tile, from its own numbers (``0`` the
    background) to the slide's ids.
    """
    counts = np.cumsum([len(k) for k in keys])[:-1]
    order = np.argsort(np.concatenate(keys), kind="stable")
    ids = np.empty(len(order), dtype=np.int32)
    ids[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return tuple(np.concatenate([[0], part]).astype(np.int32) for part in np.split(ids, counts))


def _assemble_task(core, scratch, tiles, *luts):
    """Compose one output block from the owned objects of the tiles around it.

    ``tiles`` lists ``(index, origin, shape)`` of the block's own tile first,
    then its neighbours in raster order; each is read back from ``scratch``
    (only the part over the block) and its numbers turned into the slide's
    ids by its lookup table in ``luts`` (:func:`_canonical_ids`). A pixel
    claimed by several tiles goes to the first (the own tile, then raster
    order), cell and nucleus together, so a nucleus pixel always lies in the
    cell of its id.
    """
    (y0, y1), (x0, x1) = core
    nuc_out = np.zeros((y1 - y0, x1 - x0), dtype=np.int32)
    cell_out = np.zeros_like(nuc_out)
    for (index, (oy, ox), (h, w)), lut in zip(tiles, luts):
        ty0, tx0 = max(y0, oy), max(x0, ox)
        ty1, tx1 = min(y1, oy + h), min(x1, ox + w)
        if ty0 >= ty1 or tx0 >= tx1:
            continue
        nuc, cells = lut[scratch[index + (slice(None), slice(ty0 - oy, ty1 - oy), slice(tx0 - ox, tx1 - ox))]]
        dst = (slice(ty0 - y0, ty1 - y0), slice(tx0 - x0, tx1 - x0))
        free = (cell_out[dst] == 0) & (cells > 0)
        cell_out[dst] = np.where(free, cells, cell_out[dst])
        nuc_out[dst] = np.where(free, nuc, nuc_out[dst])
    return nuc_out, cell_out


def segment_chunked(
    nuclear,
    membrane=None,
    *,
    pixel_size_um: float,
    nucleus_diameter_um: float | str = NUCLEUS_DIAMETER_UM,
    nucleus_diameter_hint: bool = False,
    cell_expansion_um: float = CELL_EXPANSION_UM,
    chunk_size: int = CHUNK_SIZE,
    overlap_px: int | None = None,
    scratch=None,
    read_window=None,
):
    """Segment nuclei and cells of a whole slide tile by tile, lazily.

    The slide is cut into ``chunk_size`` x ``chunk_size`` tiles; each is
    segmented (:func:`segment_nuclei` then :func:`segment_cells`) with
    ``overlap_px`` pixels of context on every side, and keeps only the
    objects whose nucleus centroid falls in its own tile, at their full
    extent (which may reach into the neighbouring tiles). Each output block
    is then composed from the kept objects of its tile and of its eight
    neighbours; where two claim a pixel, the block's own tile wins, then the
    neighbours in raster order. Global statistics (background surface, Otsu
    level, noise) come from one lazy pass of block reductions that do not
    depend on the tiling, so with enough overlap the result matches the
    unchunked one object for object, ids included; except where a cell
    grows farther than the overlap, and where the cells' watershed meets a
    tie, which skimage breaks in an order that depends on the tile
    (``docs/cluster.md``, "Determinism").

    Parameters
    ----------
    nuclear : (M, N) dask or NumPy array
        Nuclear-stain abundance.
    membrane : (M, N) dask or NumPy array, optional
        Membrane-stain abundance (see :func:`segment_cells`).
    pixel_size_um : float
        Pixel edge, micrometres.
    nucleus_diameter_um, nucleus_diameter_hint, cell_expansion_um : optional
        As in :func:`segment_nuclei` and :func:`segment_cells`, micrometres.
        An estimated diameter is estimated once, from a few windows of the
        whole slide, before the tiles are cut, so all tiles use the same.
        Defaults: the config schema's (``nucleus_diameter_um="auto"``).
    chunk_size : int, optional
        Tile edge and output chunk edge, pixels. Inputs chunked otherwise
        are rechunked (reading is cheapest when it is a multiple of the
        input's chunk edge). Default: the config schema's ``chunk_size``.
    overlap_px : int, optional
        Context on each side of a tile, pixels; at most ``chunk_size``.
        Default: two cell diameters, ``ceil(2 * (nucleus_diameter_um + 2 *
        cell_expansion_um) / pixel_size_um)``, capped at ``chunk_size``.
        An object whose nucleus is larger than the overlap may be cut at a
        tile edge.
    scratch : str, path or zarr store, optional
        Where the tiles' labels wait for their neighbours (an empty or
        absent directory; it must outlive the computation of the results,
        and may be deleted after). Default: in memory, which grows with
        the slide; whole slides should pass a directory on local disk.
    read_window : callable, optional
        ``read_window(which, (y0, y1), (x0, x1))``: that window of the
        ``"nuclear"`` or ``"membrane"`` image as a NumPy array, the same
        values as slicing ``nuclear`` or ``membrane``; each tile task then
        reads its padded tile with it (e.g. straight from the Zarr store,
        :func:`qdquant.io.read_window`, which decodes only the stored
        chunks under the window; a slice of a dask array holds and decodes
        the nine whole dask chunks a padded tile touches). It must be
        picklable for a distributed cluster. Default: slices of the dask
        arrays.

    Returns
    -------
    nuclei, cells : (M, N) dask arrays of int32, chunks (chunk_size, chunk_size)
        Lazy label images; a cell and its nucleus share the id. Ids are
        ``1 ..`` in the raster order of each nucleus's first pixel (its top
        row's leftmost pixel), so they do not depend on the tiling.

    Raises
    ------
    InputError
        For a non-2-D image, differing shapes, bad lengths, an overlap
        outside ``[0, chunk_size]`` or a slide too large for int32 ids.

    Notes
    -----
    Memory does not grow with the slide, but for 8 bytes per object (the
    keys that number the objects once every tile is segmented): a tile
    task holds its padded tile
    (``(chunk_size + 2 * overlap_px)**2`` pixels) as float32 and about a
    dozen same-sized work arrays (~60 bytes per pixel, ~300 MB at the
    defaults) and writes its labels to ``scratch``; a block task reads back
    only the parts of its nine tiles that cover it (about 16 bytes per block
    pixel); dask runs one task per worker thread at a time. Computing
    ``nuclei`` and ``cells`` separately segments every tile twice: compute or
    store them together (``dask.compute(nuclei, cells)``,
    ``dask.array.store``). The whole-slide statistics need one extra read of
    the slide at block-mean resolution, within the same graph.
    """
    import dask.array as da

    nuclear = _check_image(nuclear, "nuclear")
    shape = tuple(int(v) for v in nuclear.shape)
    if membrane is not None:
        membrane = _check_image(membrane, "membrane")
        if tuple(membrane.shape) != shape:
            raise InputError(f"membrane shape {tuple(membrane.shape)} differs from nuclear shape {shape}")
    _check_scale(pixel_size_um, cell_expansion_um=cell_expansion_um)
    d_um = _diameter(nuclear, pixel_size_um, nucleus_diameter_um, nucleus_diameter_hint)
    ps, (d_um, e_um) = _check_scale(
        pixel_size_um, nucleus_diameter_um=d_um, cell_expansion_um=cell_expansion_um
    )
    r = _radius_px(d_um, ps)
    dist_px = e_um / ps
    chunk_size, overlap_px = _tiling(chunk_size, overlap_px, d_um, e_um, ps)

    def as_dask(a):
        if _is_dask(a):
            return a.rechunk((chunk_size, chunk_size))
        return da.from_array(np.asarray(a), chunks=(chunk_size, chunk_size))

    nuclear = as_dask(nuclear)
    membrane = as_dask(membrane) if membrane is not None else None
    nstats = _image_stats_lazy(nuclear, r, max(_SMOOTH_Q * r, 0.7), f"nuclear image of shape {shape}")
    mstats = None
    if membrane is not None:
        mstats = _image_stats_lazy(membrane, _membrane_radius(ps), max(_MEMBRANE_SMOOTH_UM / ps, 0.5), None)

    ty, tx, scratch = _tile_grid(shape, chunk_size, overlap_px, r, scratch)
    tiles = _tile_tasks(
        nuclear, membrane, nstats, mstats, scratch, ty=ty, tx=tx, overlap_px=overlap_px, r=r, ps=ps,
        dist_px=dist_px, read_window=read_window,
    )
    return _assembled(tiles, scratch, ty, tx)


def _tiling(chunk_size, overlap_px, d_um: float, e_um: float, ps: float) -> tuple[int, int]:
    """Checked ``(chunk_size, overlap_px)`` of :func:`segment_chunked`, the overlap's default filled in."""
    try:
        chunk_size = int(chunk_size)
    except (TypeError, ValueError):
        raise InputError(f"chunk_size must be an integer, got {chunk_size!r}") from None
    if chunk_size < 16:
        raise InputError(f"chunk_size must be >= 16 pixels, got {chunk_size}")
    if overlap_px is None:
        overlap_px = min(int(math.ceil(2 * (d_um + 2 * e_um) / ps)), chunk_size)
    try:
        overlap_px = int(overlap_px)
    except (TypeError, ValueError):
        raise InputError(f"overlap_px must be an integer, got {overlap_px!r}") from None
    if not 0 <= overlap_px <= chunk_size:
        raise InputError(f"overlap_px must be in [0, chunk_size={chunk_size}], got {overlap_px}")
    return chunk_size, overlap_px


def _scratch_chunk(chunk_size: int, overlap_px: int) -> int:
    """Edge of the scratch's chunks: the smallest divisor of ``chunk_size`` of at least
    ``overlap_px`` and :data:`SCRATCH_CHUNK_MIN_PX` (``chunk_size`` where none is smaller)."""
    least = max(overlap_px, SCRATCH_CHUNK_MIN_PX, 1)
    return next((d for d in range(least, chunk_size) if chunk_size % d == 0), chunk_size)


def _tile_grid(shape, chunk_size: int, overlap_px: int, r: float, scratch):
    """Tile rows and columns and the scratch array of :func:`segment_chunked`.

    ``ty`` and ``tx`` list each tile's ``(start, stop)``; ``scratch`` holds
    two int32 planes (nuclei, cells) per padded tile, the tile's own
    ``chunk_size``² from position ``(c, c)`` (``c`` its chunk edge,
    :func:`_scratch_chunk`) and the overlap around it. So the part of a
    tile over each of the nine blocks it reaches is whole scratch chunks of
    its own: a block reads back ``c`` rows of a neighbour tile, not the whole
    padded tile.
    """
    m, n = shape
    ty = [(y, min(y + chunk_size, m)) for y in range(0, m, chunk_size)]
    tx = [(x, min(x + chunk_size, n)) for x in range(0, n, chunk_size)]
    c = _scratch_chunk(chunk_size, overlap_px)
    pad = (min(chunk_size, m) + 2 * c, min(chunk_size, n) + 2 * c)
    most = int(m * n // max(_MIN_AREA_Q * math.pi * r * r, 1.0))  # disjoint nuclei of the minimum area
    if most >= 2**31 - 1:
        raise InputError(
            f"slide of shape {shape} may hold up to {most} nuclei, more than int32 ids; "
            "use a larger nucleus_diameter_um or pixel_size_um"
        )
    scratch = zarr.open_array(
        zarr.storage.MemoryStore() if scratch is None else scratch, mode="w",
        shape=(len(ty), len(tx), 2, *pad), chunks=(1, 1, 2, c, c), dtype=np.int32, fill_value=0,
    )
    return ty, tx, scratch


def _tile_tasks(nuclear, membrane, nstats, mstats, scratch, *, ty, tx, overlap_px, r, ps, dist_px, read_window):
    """One delayed :func:`_tile_task` per tile of the grid ``ty`` x ``tx`` (lists of ``(start, stop)``).

    Returns ``{(i, j): ((index, origin, shape), keys)}``: tile ``(i, j)``'s
    index in ``scratch``, the slide position of its scratch plane's first
    pixel and the plane's shape, and its delayed result (its objects'
    keys). With ``read_window`` the tasks read their own windows
    (:func:`segment_chunked`) and do not depend on the input arrays' chunks.
    """
    import dask

    m, n = nuclear.shape
    c = scratch.chunks[-1]
    task = dask.delayed(_tile_task, pure=True)
    tiles = {}
    for i, (y0, y1) in enumerate(ty):
        for j, (x0, x1) in enumerate(tx):
            py0, py1 = max(0, y0 - overlap_px), min(m, y1 + overlap_px)
            px0, px1 = max(0, x0 - overlap_px), min(n, x1 + overlap_px)
            nt = mt = None
            if read_window is None:
                nt = nuclear[py0:py1, px0:px1]
                mt = membrane[py0:py1, px0:px1] if membrane is not None else None
            keys = task(
                nt, mt, nstats, mstats, read=read_window, window=((py0, py1), (px0, px1)), scratch=scratch,
                index=(i, j), at=(c - (y0 - py0), c - (x0 - px0)), r=r, ps=ps, dist_px=dist_px,
                core=((y0, y1), (x0, x1)), width=n,
            )
            tiles[i, j] = ((i, j), (y0 - c, x0 - c), scratch.shape[-2:]), keys
    return tiles


def _assembled(tiles, scratch, ty, tx):
    """The slide's (nuclei, cells) dask arrays, each block composed by :func:`_assemble_task`.

    A block reads its own tile first, then its eight neighbours in raster
    order (see :func:`_tile_tasks` for ``tiles``), each with its lookup
    table to the slide's ids (one task, :func:`_canonical_ids`, that waits
    for every tile's keys).
    """
    import dask
    import dask.array as da

    names = list(tiles)
    luts = dask.delayed(_canonical_ids, pure=True, nout=len(names))(*[tiles[key][1] for key in names])
    lut = dict(zip(names, luts))
    assemble = dask.delayed(_assemble_task, pure=True, nout=2)
    nuc_rows, cell_rows = [], []
    for i, (y0, y1) in enumerate(ty):
        nuc_row, cell_row = [], []
        for j, (x0, x1) in enumerate(tx):
            order = [(i, j)] + [
                (i + di, j + dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)
                if (di or dj) and (i + di, j + dj) in tiles
            ]
            nb, cb = assemble(
                ((y0, y1), (x0, x1)), scratch, [tiles[key][0] for key in order], *[lut[key] for key in order]
            )
            nuc_row.append(da.from_delayed(nb, shape=(y1 - y0, x1 - x0), dtype=np.int32))
            cell_row.append(da.from_delayed(cb, shape=(y1 - y0, x1 - x0), dtype=np.int32))
        nuc_rows.append(nuc_row)
        cell_rows.append(cell_row)
    return da.block(nuc_rows), da.block(cell_rows)
