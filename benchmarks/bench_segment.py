"""Throughput and memory of qdquant.segmentation on a synthetic slide.

Usage::

    python benchmarks/bench_segment.py [--size 4096] [--pixel-size 0.5]
                                       [--chunk-size 2048] [--no-chunked]
                                       [--mibi-figure docs/mibi_segmentation.png]

Builds a ``size`` x ``size`` nuclear-stain image of packed, touching
elliptical nuclei (8 um across at 0.5 um per pixel) with log-normal
brightness, texture, a sloped background, smooth shading and Gaussian noise,
and a membrane-stain image drawn on the cell borders (a quarter of the cells
unstained). Then prints, per stage, the time, the throughput in Mpx/s and the
traced peak of numpy allocations (tracemalloc) above what the inputs hold:

- ``nuclei``: :func:`segment_nuclei`;
- ``cells``: :func:`segment_cells` with the membrane image;
- ``compartments``: :func:`compartments` (membrane ring 2 px);
- ``chunked``: :func:`segment_chunked` over ``chunk-size`` tiles (dask,
  threads; skipped with ``--no-chunked``);

the nuclei F1 at IoU 0.5 against the synthetic truth, and the process's
maximum resident set size (``ru_maxrss``).

``--mibi-figure PATH`` instead segments the MIBI-TOF breast tumour field of
view in ``../shared/data/ark_mibi_tnbc_fov8`` (HH3 nuclei, E-cadherin +
Na/K-ATPase membrane, 0.49 um pixels, 15 um nuclei, 4 um expansion),
prints its F1 against the Mesmer model's whole-cell masks and writes an
overlay of both outlines to PATH.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from qdquant.metrics import match_instances
from qdquant.segmentation import compartments, segment_cells, segment_chunked, segment_nuclei

REPO = Path(__file__).resolve().parents[1]
MIBI = REPO.parent / "shared" / "data" / "ark_mibi_tnbc_fov8"


def synthetic_tile(size=1024, diameter_px=16.0, seed=0):
    """Truth nuclei, nuclear intensity (no background) and truth cells of one tile."""
    from skimage.segmentation import relabel_sequential, watershed

    rng = np.random.default_rng(seed)
    sp = diameter_px * 1.05
    rows = np.arange(size / (sp * 0.866) + 1)
    yy, xx = np.meshgrid(rows * sp * 0.866, np.arange(size / sp + 1) * sp, indexing="ij")
    xx = xx + (np.arange(len(rows))[:, None] % 2) * sp / 2
    pts = np.stack([yy.ravel(), xx.ravel()], 1) + rng.normal(0, sp * 0.12, (yy.size, 2))
    pts = pts[rng.random(len(pts)) < 0.85]
    n = len(pts)
    a = diameter_px / 2 * rng.uniform(1.1, 1.35, n)
    b = diameter_px / 2 * rng.uniform(0.7, 0.9, n)
    th = rng.uniform(0, np.pi, n)
    best = np.full((size, size), np.inf)
    truth = np.zeros((size, size), np.int32)
    for i in range(n):  # data generation, one small window per nucleus
        cy, cx = pts[i]
        rad = int(np.ceil(a[i])) + 1
        y0, y1 = max(int(cy) - rad, 0), min(int(cy) + rad + 1, size)
        x0, x1 = max(int(cx) - rad, 0), min(int(cx) + rad + 1, size)
        if y0 >= y1 or x0 >= x1:
            continue
        gy, gx = np.mgrid[y0:y1, x0:x1]
        u = (gx - cx) * np.cos(th[i]) + (gy - cy) * np.sin(th[i])
        v = -(gx - cx) * np.sin(th[i]) + (gy - cy) * np.cos(th[i])
        rr = (u / a[i]) ** 2 + (v / b[i]) ** 2
        sub = best[y0:y1, x0:x1]
        win = (rr < 1) & (rr < sub)
        sub[win] = rr[win]
        truth[y0:y1, x0:x1][win] = i + 1
    truth = relabel_sequential(truth)[0].astype(np.int32)
    nlab = int(truth.max())
    bright = rng.lognormal(0, 0.35, nlab + 1) * 100
    bright[0] = 0
    img = bright[truth] * (1 - 0.35 * np.where(truth > 0, best, 1.0))
    img *= 1 + 0.6 * ndi.gaussian_filter(rng.normal(0, 1, img.shape), 1.5)
    dist = ndi.distance_transform_edt(truth == 0)
    field = ndi.gaussian_filter(rng.normal(0, 1, img.shape), diameter_px / 3)
    field *= 0.5 * diameter_px / (field.std() + 1e-9)
    cells = watershed(dist + field, truth, mask=dist <= 0.5 * diameter_px).astype(np.int32)
    return truth, img, cells


def synthetic_slide(size, seed=0):
    """(nuclear, membrane, truth nuclei) float32, float32, int32 of shape (size, size)."""
    from skimage.segmentation import find_boundaries

    tile = min(size, 1024)
    truth_t, img_t, cells_t = synthetic_tile(tile, seed=seed)
    reps = -(-size // tile)
    # Tiling repeats the pattern; ids are made unique per repetition.
    n = int(truth_t.max()) + 1
    offs = (np.arange(reps * reps).reshape(reps, reps) * n).repeat(tile, 0).repeat(tile, 1)[:size, :size]
    truth = np.tile(truth_t, (reps, reps))[:size, :size]
    truth = np.where(truth > 0, truth + offs, 0).astype(np.int32)
    cells = np.tile(cells_t, (reps, reps))[:size, :size]
    cells = np.where(cells > 0, cells + offs, 0).astype(np.int32)
    rng = np.random.default_rng(seed + 1)
    nuclear = ndi.gaussian_filter(np.tile(img_t, (reps, reps))[:size, :size], 1.0)
    gy, gx = np.mgrid[0:size, 0:size] / size
    nuclear *= 0.55 + 0.45 * np.cos(2.0 * (gx - 0.6)) * np.cos(1.5 * (gy - 0.4))
    nuclear += 15 + 25 * gx + 10 * gy + rng.normal(0, 6, nuclear.shape)
    stain = rng.uniform(50, 150, int(cells.max()) + 1) * (rng.random(int(cells.max()) + 1) > 0.25)
    stain[0] = 0
    membrane = ndi.gaussian_filter(np.where(find_boundaries(cells, mode="inner"), stain[cells], 0.0), 1.0) * 2
    membrane += 10 + rng.normal(0, 4, membrane.shape)
    return nuclear.astype(np.float32), membrane.astype(np.float32), truth


def _stage(name, fn, npx):
    tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"{name:13s} {dt:8.2f} s {npx / dt / 1e6:8.3f} Mpx/s   traced peak {peak / 2**20:8.0f} MiB", flush=True)
    return out


def _maxrss_mib():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def bench(size, pixel_size, chunk_size, chunked):
    t0 = time.perf_counter()
    nuclear, membrane, truth = synthetic_slide(size)
    n = int(len(np.unique(truth))) - 1
    print(f"synthetic {size}x{size} slide ({n} nuclei) in {time.perf_counter() - t0:.1f} s")
    npx = size * size
    nuclei = _stage("nuclei", lambda: segment_nuclei(nuclear, pixel_size, 8), npx)
    cells = _stage("cells", lambda: segment_cells(nuclei, membrane, pixel_size_um=pixel_size, cell_expansion_um=5), npx)
    _stage("compartments", lambda: compartments(cells, nuclei, 2), npx)
    if chunked:
        import dask
        import dask.array as da

        def run():
            lazy = segment_chunked(
                da.from_array(nuclear, chunks=chunk_size), da.from_array(membrane, chunks=chunk_size),
                pixel_size_um=pixel_size, nucleus_diameter_um=8, cell_expansion_um=5, chunk_size=chunk_size,
            )
            return dask.compute(*lazy, scheduler="threads")

        chunked_nuclei, _ = _stage("chunked", run, npx)
        r = match_instances(nuclei, chunked_nuclei, iou_threshold=0.9)
        print(f"chunked vs whole: {r['n_matched']}/{r['n_true']} nuclei matched at IoU 0.9")
    r = match_instances(truth, nuclei, iou_threshold=0.5)
    print(f"nuclei vs truth: precision {r['precision']:.3f} recall {r['recall']:.3f} F1 {r['f1']:.3f} at IoU 0.5")
    print(f"max resident set size {_maxrss_mib():.0f} MiB")


def mibi_figure(path, nucleus_um=15.0, expansion_um=4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tifffile
    from PIL import Image
    from skimage.segmentation import find_boundaries

    hh3 = tifffile.imread(MIBI / "TIFs" / "HH3.tiff").astype(np.float32)
    mem = tifffile.imread(MIBI / "TIFs" / "ECadherin.tiff").astype(np.float32)
    mem += tifffile.imread(MIBI / "TIFs" / "NaK ATPase.tiff")
    mesmer = tifffile.imread(MIBI / "fov8_feature_0_wholecell_mask_mesmer.tiff")
    nuclei = segment_nuclei(hh3, 0.49, nucleus_um)
    cells = segment_cells(nuclei, mem, pixel_size_um=0.49, cell_expansion_um=expansion_um)
    r5 = match_instances(mesmer, cells, iou_threshold=0.5)
    r7 = match_instances(mesmer, cells, iou_threshold=0.7)
    print(f"MIBI fov8 cells vs Mesmer: {r5['n_pred']} vs {r5['n_true']} cells; IoU 0.5 precision "
          f"{r5['precision']:.3f} recall {r5['recall']:.3f} F1 {r5['f1']:.3f}; IoU 0.7 F1 {r7['f1']:.3f}")

    def norm(a):
        a = ndi.gaussian_filter(a, 1.5)
        return np.clip(a / np.percentile(a, 99.5), 0, 1)

    rgb = np.stack([norm(mem) * 0.8, norm(hh3) * 0.7, norm(hh3) * 0.9], -1)
    rgb[find_boundaries(mesmer, mode="inner")] = (1.0, 0.2, 1.0)
    rgb[find_boundaries(cells, mode="inner")] = (0.3, 1.0, 0.2)
    rgb[find_boundaries(nuclei, mode="inner")] = (1.0, 1.0, 0.4)
    fig, ax = plt.subplots(1, 2, figsize=(12, 6.6))
    ax[0].imshow(rgb, interpolation="nearest")
    ax[0].add_patch(plt.Rectangle((60, 110), 300, 300, fill=False, ec="w", lw=1))
    ax[1].imshow(rgb[110:410, 60:360], interpolation="nearest", extent=(60, 360, 410, 110))
    ax[0].set_title(f"MIBI TNBC fov8: qdquant cells (green; nuclei yellow) vs Mesmer (magenta)\n"
                    f"F1 at IoU 0.5 = {r5['f1']:.2f} ({r5['n_pred']} vs {r5['n_true']} cells)", fontsize=9)
    ax[1].set_title("zoom (white box)\nred: E-cadherin + Na/K-ATPase, cyan: HH3", fontsize=9)
    for a in ax:
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.canvas.draw()
    img = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    plt.close(fig)
    img.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"wrote {path} ({Path(path).stat().st_size / 1024:.0f} kB)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="slide edge in pixels (default 4096)")
    ap.add_argument("--pixel-size", type=float, default=0.5, help="micrometres per pixel (default 0.5)")
    ap.add_argument("--chunk-size", type=int, default=2048, help="tile edge of the chunked stage (default 2048)")
    ap.add_argument("--no-chunked", action="store_true", help="skip the chunked (dask) stage")
    ap.add_argument("--mibi-figure", metavar="PATH", help="segment the MIBI field of view and write an overlay")
    args = ap.parse_args(argv)
    if args.mibi_figure:
        if not MIBI.exists():
            sys.exit(f"MIBI data not found: {MIBI}")
        mibi_figure(args.mibi_figure)
        return
    bench(args.size, args.pixel_size, args.chunk_size, not args.no_chunked)


if __name__ == "__main__":
    main()
