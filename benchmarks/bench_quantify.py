"""Per-cell measurement throughput: qdquant's measure_cells vs regionprops per channel.

MCMICRO's quantification (MCQuant) calls ``skimage.measure.regionprops_table``
once per channel and per mask. This script times both on the same synthetic
label image (default: ~100k cells x 8 channels) in one run and prints the
ratio (target >= 10x) and peak memory.

    python benchmarks/bench_quantify.py [--cells 100000] [--channels 8]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from skimage import measure, segmentation

from qdquant.quantification import measure_cells
from qdquant.segmentation import compartments


def synthetic(n_cells: int, channels: int, seed: int = 0):
    # ~200 px per cell (a 7 um cell at 0.5 um/px), seeds on a jittered grid
    side = int(np.sqrt(n_cells * 200))
    rng = np.random.default_rng(seed)
    step = int(np.sqrt(side * side / n_cells))
    yy, xx = np.mgrid[step // 2 : side : step, step // 2 : side : step]
    pts = np.column_stack([yy.ravel(), xx.ravel()]) + rng.integers(-2, 3, size=(yy.size, 2))
    pts = np.clip(pts, 0, side - 1)
    seeds = np.zeros((side, side), np.int32)
    seeds[pts[:, 0], pts[:, 1]] = np.arange(1, len(pts) + 1)
    nuclei = segmentation.expand_labels(seeds, step // 4)
    cells = segmentation.expand_labels(seeds, step // 2)
    abundances = rng.gamma(2.0, 20.0, size=(channels, side, side)).astype(np.float32)
    return cells, nuclei, abundances


def mcquant_way(cells, nuclei, abundances, width):
    """regionprops_table per channel, for the whole cell and each compartment."""
    nucleus, membrane, cytoplasm = compartments(cells, nuclei, width)
    out = {}
    for mask_name, mask in (("cell", cells > 0), ("nucleus", nucleus), ("membrane", membrane), ("cytoplasm", cytoplasm)):
        lab = np.where(mask, cells, 0)
        for k in range(abundances.shape[0]):
            out[(mask_name, k)] = measure.regionprops_table(lab, intensity_image=abundances[k], properties=["label", "intensity_mean"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--channels", type=int, default=8)
    args = parser.parse_args()
    cells, nuclei, abundances = synthetic(args.cells, args.channels)
    n = len(np.unique(cells)) - 1
    names = [f"M{k}" for k in range(args.channels)]
    print(f"{n} cells, {args.channels} channels, image {cells.shape[0]}x{cells.shape[1]}")

    t0 = time.perf_counter()
    table = measure_cells(cells, nuclei, abundances, names, 2)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    mcquant_way(cells, nuclei, abundances, 2)
    t_ref = time.perf_counter() - t0
    assert len(table) == n
    print(f"measure_cells:                {t_ours:7.2f} s  ({n / t_ours / 1e3:7.1f} k cells/s)")
    print(f"regionprops_table per channel: {t_ref:7.2f} s  ({n / t_ref / 1e3:7.1f} k cells/s)")
    print(f"ratio (regionprops / ours):    {t_ref / t_ours:7.1f}x   (target >= 10x)")
    print(f"peak RSS:                      {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:7.0f} MiB")


if __name__ == "__main__":
    main()
