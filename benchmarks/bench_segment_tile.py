"""CPU time of the per-tile segmentation on a padded tile of a real unmixed store.

Usage::

    python benchmarks/bench_segment_tile.py RESULTS/SAMPLE/unmixed.ome.zarr
        [--nuclear DAPI] [--membrane QD705] [--tiles 1,1 2,1] [--chunk-size 2048]
        [--diameter 8] [--expansion 5] [--repeat 3] [--save labels.npz]

Reads the nuclear and membrane channels of the store, computes the
whole-slide statistics as :func:`qdquant.segmentation.segment_chunked` does,
cuts the padded tiles it would cut (``chunk-size`` plus its default overlap
on every side) and times :func:`~qdquant.segmentation.nuclei._nuclei_tile`
and :func:`~qdquant.segmentation.cells._cells_tile` on each: CPU time (user +
system, the best of ``--repeat`` runs: on a shared machine wall time says
little). ``--save`` writes the labels (``{i}_{j}_n``, ``{i}_{j}_c``) to
compare two versions of the code pixel for pixel.
"""

from __future__ import annotations

import argparse
import time

import dask
import numpy as np

from qdquant import io
from qdquant.segmentation._checks import _as_float, _membrane_radius
from qdquant.segmentation._tuning import _MEMBRANE_SMOOTH_UM, _SMOOTH_Q
from qdquant.segmentation.cells import _cells_tile
from qdquant.segmentation.chunked import _tiling
from qdquant.segmentation.image_stats import _image_stats_lazy
from qdquant.segmentation.nuclei import _nuclei_tile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zarr")
    parser.add_argument("--nuclear", default="DAPI", help="channel name of the nuclear stain")
    parser.add_argument("--membrane", default="QD705", help="channel name of the membrane stain")
    parser.add_argument("--tiles", nargs="+", default=["1,1", "2,1"], help="tile row,column (raster grid)")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--diameter", type=float, default=8.0, help="nucleus diameter, um")
    parser.add_argument("--expansion", type=float, default=5.0, help="cell expansion, um")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--save", default=None)
    args = parser.parse_args()

    image, names = io.read_ome_zarr(args.zarr, args.chunk_size)
    ps = io.read_pixel_size_um(args.zarr)
    nuclear, membrane = image[names.index(args.nuclear)], image[names.index(args.membrane)]
    r = args.diameter / ps / 2
    dist_px = args.expansion / ps
    chunk, overlap = _tiling(args.chunk_size, None, args.diameter, args.expansion, ps)
    nstats, mstats = dask.compute(
        _image_stats_lazy(nuclear, r, max(_SMOOTH_Q * r, 0.7), None),
        _image_stats_lazy(membrane, _membrane_radius(ps), max(_MEMBRANE_SMOOTH_UM / ps, 0.5), None),
    )
    m, n = nuclear.shape
    saved = {}
    for tile in args.tiles:
        i, j = (int(v) for v in tile.split(","))
        y0, x0 = max(0, i * chunk - overlap), max(0, j * chunk - overlap)
        y1, x1 = min(m, (i + 1) * chunk + overlap), min(n, (j + 1) * chunk + overlap)
        nt, mt = np.asarray(nuclear[y0:y1, x0:x1]), np.asarray(membrane[y0:y1, x0:x1])
        t_nuc, t_cells = [], []
        for _ in range(args.repeat):
            c0 = time.process_time()
            nuc = _nuclei_tile(_as_float(nt), nstats, r, y0, x0)
            c1 = time.process_time()
            cells = _cells_tile(nuc, mt, mstats, ps, dist_px, y0, x0)
            t_nuc.append(c1 - c0)
            t_cells.append(time.process_time() - c1)
        print(f"tile {i},{j} ({y1 - y0}x{x1 - x0} px, {int(nuc.max())} nuclei): "
              f"nuclei {min(t_nuc):.2f} s CPU, cells {min(t_cells):.2f} s CPU", flush=True)
        saved[f"{i}_{j}_n"], saved[f"{i}_{j}_c"] = nuc, cells
    if args.save:
        np.savez_compressed(args.save, **saved)


if __name__ == "__main__":
    main()
