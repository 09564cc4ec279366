"""Per-cell measurements: areas, centroids, compartment means, HER2 membrane sectors.

Every reduction is a ``np.bincount`` over label images, done one block at a
time and added up per cell, so a whole slide is measured in memory bounded
by the block size, and a cell that straddles block borders gets exactly the
sums it would get in one piece: the values are summed in fixed point
(:data:`FIXED_POINT`), whose sums do not depend on the order they are added
in, so the means are the same to the last bit whatever the block size. Only
the cell labels are read with a halo (as wide as the membrane ring, which
depends on the neighbours' labels): the abundances, nuclei and flags are read
for the block itself, so a block whose edges are those of the stored chunks
decodes no neighbouring chunk of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import dask
import numpy as np
import pandas as pd

from qdquant.config.defaults import default
from qdquant.errors import InputError
from qdquant.segmentation import membrane_ring

COMPARTMENTS = ("nucleus", "cytoplasm", "membrane")

#: Values are summed as integer multiples of 1 / FIXED_POINT (2**-20, about 1e-6: finer than
#: float32's own step for values above 8). Float64 sums of such integers are exact, so they
#: come out the same in any order and over any split into blocks (float sums do not: a cell
#: cut by a block edge would get other last bits for another chunk_size), as long as a cell's
#: sum of |value| stays below 2**53 / FIXED_POINT = 8.6e9 (10 000 pixels at 860 000 units each).
FIXED_POINT = 2.0**20


def _fixed(values) -> np.ndarray:
    """``values`` as float64 integers in units of ``1 / FIXED_POINT`` (NaN and inf stay as they are)."""
    return np.rint(np.asarray(values, dtype=np.float64) * FIXED_POINT)


def _blocks(shape: tuple[int, int], block: int, halo: int) -> Iterator[tuple[tuple[slice, slice], tuple[slice, slice]]]:
    """(padded slices into the image, core slices into the padded block) for each block."""
    height, width = shape
    for y0 in range(0, height, block):
        for x0 in range(0, width, block):
            y1, x1 = min(y0 + block, height), min(x0 + block, width)
            py0, px0 = max(y0 - halo, 0), max(x0 - halo, 0)
            py1, px1 = min(y1 + halo, height), min(x1 + halo, width)
            yield (
                (slice(py0, py1), slice(px0, px1)),
                (slice(y0 - py0, y1 - py0), slice(x0 - px0, x1 - px0)),
            )


def _per_block(func, shape: tuple[int, int], block: int, halo: int, labels, *arrays) -> Iterator:
    """``func(padded, core, label_block, *blocks)`` on every block, results yielded in block order.

    ``label_block`` is the padded block of ``labels`` (the halo included);
    ``blocks`` are the core block of each of ``arrays`` (numpy or dask,
    sliced on their last two axes; None stays None). Each is read by the
    task itself. Blocks run on the current dask scheduler (local threads or
    processes, or the workers of a ``dask.distributed`` cluster) a few at a
    time, so only a batch of results is alive at once when the caller folds
    them in as they come.
    """
    batch = 2 * max(dask.config.get("num_workers", None) or os.cpu_count() or 1, 1)
    blocks = list(_blocks(shape, block, halo))
    task = dask.delayed(func, pure=True)

    def in_image(p, c):  # the core's slices into the image
        return tuple(slice(pp.start + cc.start, pp.start + cc.stop) for pp, cc in zip(p, c))

    for start in range(0, len(blocks), batch):
        yield from dask.compute(*[
            task(p, c, labels[(Ellipsis, *p)], *[None if a is None else a[(Ellipsis, *in_image(p, c))] for a in arrays])
            for p, c in blocks[start : start + batch]
        ])


def _check_inputs(cells, nuclei, abundances, names) -> None:
    if cells.ndim != 2:
        raise InputError(f"cells must be a 2-D label image, got shape {cells.shape}")
    for what, labels in (("cells", cells), ("nuclei", nuclei)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{what} labels must be integers, got dtype {labels.dtype}")
    if not np.issubdtype(abundances.dtype, np.floating) and not np.issubdtype(abundances.dtype, np.integer):
        raise InputError(f"abundances must be numbers, got dtype {abundances.dtype}")
    if nuclei.shape != cells.shape:
        raise InputError(f"nuclei shape {nuclei.shape} differs from cells shape {cells.shape}")
    if abundances.ndim != 3 or abundances.shape[1:] != cells.shape:
        raise InputError(
            f"abundances shape {abundances.shape} does not match the labels' (K, {cells.shape[0]}, {cells.shape[1]})"
        )
    if len(names) != abundances.shape[0]:
        raise InputError(f"{len(names)} marker names for {abundances.shape[0]} abundance channels")
    if len(set(names)) != len(names):
        raise InputError(f"duplicate marker names: {list(names)}")


def _dense_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(labels, return_inverse=True)`` for non-negative integer labels, without a sort.

    A block's ids usually span a short range (cells are numbered region by
    region), so a lookup table over that range replaces the sort; ids spread
    wider than that (labels from elsewhere) are sorted.
    """
    if labels.size == 0:
        return labels[:0], np.zeros(0, np.intp)
    low, high = int(labels.min()), int(labels.max())
    if high - low > 4 * labels.size + 65536:
        return np.unique(labels, return_inverse=True)
    offsets = (labels - low).astype(np.intp, copy=False)
    present = np.bincount(offsets).astype(bool)
    ids = np.flatnonzero(present) + low
    lookup = np.cumsum(present, dtype=np.intp) - 1
    return ids.astype(labels.dtype, copy=False), lookup[offsets]


def _block_sums(cells, nuclei, abundances, flagged, core, width_px):
    """Per-label sums over one block.

    ``cells`` is the padded block, ``core`` its slices of the block itself;
    ``nuclei``, ``abundances`` and ``flagged`` are of the block itself.
    Returns the block's ids, geometry sums (count, y, x, nucleus area,
    flagged) and, per compartment, a (n, 1 + K) array of pixel count and
    channel sums. Each pixel falls in one of four disjoint classes (in the
    nucleus or not x in the ring or not: the nucleus and the ring may
    overlap), so one bincount per channel over ``4 * cell + class`` gives all
    compartments at once.
    """
    ring = membrane_ring(cells, width_px)[core]
    cells = cells[core]
    inside = cells > 0
    ids, inv = _dense_ids(cells[inside])
    n = len(ids)
    ys, xs = np.nonzero(inside)  # relative to the core's origin
    in_nucleus = nuclei[inside] > 0
    good = ~flagged[inside] if flagged is not None else np.ones(len(inv), bool)
    geometry = np.stack(
        [
            np.bincount(inv, minlength=n),
            np.bincount(inv, weights=ys, minlength=n),
            np.bincount(inv, weights=xs, minlength=n),
            np.bincount(inv, weights=in_nucleus, minlength=n),
            np.bincount(inv, weights=~good, minlength=n),
        ],
        axis=1,
    ).astype(np.float64)
    # class: 0 cytoplasm, 1 nucleus only, 2 ring only, 3 nucleus and ring
    index = (4 * inv + in_nucleus + 2 * ring[inside])[good]
    values = abundances[:, inside][:, good]  # (K, n_good_pixels); to fixed point one channel at a time
    per_class = np.stack(
        [np.bincount(index, minlength=4 * n)]
        + [np.bincount(index, weights=_fixed(v), minlength=4 * n) for v in values],
        axis=1,
    ).reshape(n, 4, 1 + len(values))
    sums = {
        "cell": per_class.sum(axis=1),
        "nucleus": per_class[:, 1] + per_class[:, 3],
        "membrane": per_class[:, 2] + per_class[:, 3],
        "cytoplasm": per_class[:, 0],
    }
    return ids, geometry, sums


def measure_cells(
    cells,
    nuclei,
    abundances,
    names,
    membrane_width_px: float,
    *,
    pixel_size_um: float = 1.0,
    flagged=None,
    block_size: int = default("chunk_size"),
) -> pd.DataFrame:
    """Measure every cell: geometry and per-compartment mean of each channel.

    Parameters
    ----------
    cells, nuclei : (M, N) int arrays (numpy or dask)
        Cell and nucleus labels; a nucleus shares its cell's id, 0 = background.
        Float labels, or negative ones (found as each block is read), are an
        :class:`InputError`.
    abundances : (K, M, N) float array (numpy or dask)
        Unmixed abundance of each channel; reduced in float32 per block (a
        float64 value beyond float32's range is an :class:`InputError`).
    names : sequence of K str
        Marker name of each channel; columns are named after them.
    membrane_width_px : float
        Width of the membrane ring (pixels), see :func:`qdquant.segmentation.membrane_ring`.
    pixel_size_um : float
        Pixel size (µm), for ``X_um``/``Y_um``.
    flagged : (M, N) bool array, optional
        Pixels left out of every mean (poorly fitted pixels); counted per cell.
    block_size : int
        Edge (pixels) of the blocks the image is reduced in. Default: the
        config schema's ``chunk_size``.

    Returns
    -------
    table : DataFrame, one row per cell sorted by ``CellID``
        ``CellID, X_centroid, Y_centroid`` (pixels), ``X_um, Y_um``, ``Area``,
        ``NucleusArea`` (pixels), ``n_flagged_px``, then per marker its
        whole-cell mean (column named as the marker) and
        ``{marker}_{nucleus,cytoplasm,membrane}_mean``. A compartment without
        pixels gives NaN, not 0.
    """
    _check_inputs(cells, nuclei, abundances, names)
    names = list(names)
    halo = int(np.ceil(membrane_width_px))

    def one(padded, core, cell_block, nucleus_block, values, f):
        f = None if f is None else np.asarray(f, dtype=bool)
        cell_block, nucleus_block = np.asarray(cell_block), np.asarray(nucleus_block)
        y0, x0 = padded[0].start + core[0].start, padded[1].start + core[1].start  # the block's origin
        for what, block, (oy, ox) in (("cells", cell_block, (padded[0].start, padded[1].start)),
                                      ("nuclei", nucleus_block, (y0, x0))):
            if block.size and block.min() < 0:
                y, x = np.unravel_index(np.argmin(block), block.shape)
                raise InputError(f"{what} labels must be >= 0 (0 = background), got {block.min()} at "
                                 f"y {oy + y}, x {ox + x}")
        values = np.asarray(values)
        if values.dtype.kind == "f" and values.dtype.itemsize > 4 and values.size:
            big = np.abs(values) > np.finfo(np.float32).max
            if big.any():  # the sums are float32 per block: say so rather than measure inf
                k, y, x = np.argwhere(big)[0]
                raise InputError(f"abundance {values[k, y, x]:.3g} of channel '{names[k]}' at "
                                 f"y {y0 + y}, x {x0 + x} overflows float32")
        ids, geometry, sums = _block_sums(
            cell_block,
            nucleus_block,
            values.astype(np.float32, copy=False),
            f,
            core,
            membrane_width_px,
        )
        # block-local pixel coordinates -> image coordinates
        n = geometry[:, 0]
        geometry[:, 1] += n * (padded[0].start + core[0].start)
        geometry[:, 2] += n * (padded[1].start + core[1].start)
        return ids, geometry, sums

    parts = [p for p in _per_block(one, cells.shape, block_size, halo, cells, nuclei, abundances, flagged)
             if len(p[0])]
    columns = ["CellID", "X_centroid", "Y_centroid", "X_um", "Y_um", "Area", "NucleusArea", "n_flagged_px"]
    columns += names + [f"{m}_{c}_mean" for m in names for c in COMPARTMENTS]
    if not parts:
        integer = {"CellID", "Area", "NucleusArea", "n_flagged_px"}
        return pd.DataFrame({c: pd.Series(dtype="int64" if c in integer else "float64") for c in columns})

    ids, inv = np.unique(np.concatenate([p[0] for p in parts]), return_inverse=True)

    def combine(arrays):
        stacked = np.concatenate(arrays, axis=0)
        out = np.zeros((len(ids), stacked.shape[1]))
        np.add.at(out, inv, stacked)
        return out

    geometry = combine([p[1] for p in parts])
    area = geometry[:, 0]
    table = {
        "CellID": ids.astype(np.int64),
        "X_centroid": geometry[:, 2] / area,
        "Y_centroid": geometry[:, 1] / area,
    }
    table["X_um"] = table["X_centroid"] * pixel_size_um
    table["Y_um"] = table["Y_centroid"] * pixel_size_um
    table["Area"] = area.astype(np.int64)
    table["NucleusArea"] = geometry[:, 3].astype(np.int64)
    table["n_flagged_px"] = geometry[:, 4].astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        for compartment in ("cell", *COMPARTMENTS):
            sums = combine([p[2][compartment] for p in parts])
            means = sums[:, 1:] / FIXED_POINT / sums[:, :1]
            means[sums[:, 0] == 0] = np.nan
            for k, marker in enumerate(names):
                key = marker if compartment == "cell" else f"{marker}_{compartment}_mean"
                table[key] = means[:, k]
    return pd.DataFrame({c: table[c] for c in columns}, copy=False)  # no second copy of every column


def membrane_sectors(
    cells,
    values,
    cell_ids,
    centroids_yx,
    membrane_width_px: float,
    *,
    sectors: int = default("her2.sectors"),
    flagged=None,
    block_size: int = default("chunk_size"),
) -> tuple[np.ndarray, np.ndarray]:
    """Sum and pixel count of ``values`` over each cell's membrane ring, per angular sector.

    Sector ``s`` holds the ring pixels whose angle ``atan2(y - cy, x - cx)``
    around the cell's centroid (image rows point down, so angles turn
    clockwise on screen) lies in ``[s, s + 1) * 360° / sectors``; sector 0
    starts at +x.

    Parameters
    ----------
    cells : (M, N) int array (numpy or dask)
    values : (M, N) float array (numpy or dask)
        The marker's abundance (e.g. HER2).
    cell_ids : (n,) int array
        Sorted cell ids whose sectors are wanted (e.g. ``CellID``).
    centroids_yx : (n, 2) float array
        Each cell's centroid (pixels).
    membrane_width_px : float
    sectors : int
        Number of equal angular sectors. Default: the config schema's
        ``her2.sectors``.
    flagged : (M, N) bool array, optional
        Pixels left out (neither summed nor counted).
    block_size : int
        As in :func:`measure_cells`.

    Returns
    -------
    sums : (n, sectors) float64
    npx : (n, sectors) int32
    """
    if values.shape != cells.shape:
        raise InputError(f"values shape {values.shape} differs from cells shape {cells.shape}")
    cell_ids = np.asarray(cell_ids)
    centroids_yx = np.asarray(centroids_yx, dtype=np.float64)
    n = len(cell_ids)
    if centroids_yx.shape != (n, 2):
        raise InputError(f"centroids_yx must be ({n}, 2), got {centroids_yx.shape}")
    halo = int(np.ceil(membrane_width_px))

    def one(padded, core, lab, v, f):
        lab = np.asarray(lab)
        ring = membrane_ring(lab, membrane_width_px)[core]
        lab = lab[core]
        if f is not None:
            ring &= ~np.asarray(f, dtype=bool)
        pos = np.searchsorted(cell_ids, lab[ring])
        known = (pos < n) & (cell_ids[np.minimum(pos, n - 1)] == lab[ring])
        ys, xs = np.nonzero(ring)
        ys = ys[known] + padded[0].start + core[0].start
        xs = xs[known] + padded[1].start + core[1].start
        pos = pos[known]
        angle = np.arctan2(ys - centroids_yx[pos, 0], xs - centroids_yx[pos, 1]) % (2 * np.pi)
        sector = np.minimum((angle * sectors / (2 * np.pi)).astype(np.int64), sectors - 1)
        # Sums over this block's cells only, so that a result's size does not grow with the slide.
        index, inv = np.unique(pos * sectors + sector, return_inverse=True)
        v = _fixed(np.asarray(v)[ring][known])
        return index, np.bincount(inv, weights=v, minlength=len(index)), np.bincount(inv, minlength=len(index))

    sums = np.zeros(n * sectors)
    npx = np.zeros(n * sectors, dtype=np.int32)  # a ring sector holds far fewer than 2**31 pixels
    if n:
        for index, s, c in _per_block(one, cells.shape, block_size, halo, cells, values, flagged):
            sums[index] += s  # indices are unique within a block
            npx[index] += c
    return sums.reshape(n, sectors) / FIXED_POINT, npx.reshape(n, sectors)
