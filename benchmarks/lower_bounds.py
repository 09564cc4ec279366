"""Lower bounds of each whole-slide step: the work that must happen, measured on its own.

For a slide and its results (``qdquant unmix`` and ``segment`` already run),
each bound is the bare cost of one necessary part, on the same files and with
the same thread count as the steps:

- ``read cube``: every tile of the slide decoded once (tifffile via
  :func:`qdquant.io.open_cube`), nothing else;
- ``nnls``: the NNLS kernel (:func:`qdquant.unmixing.unmix`, default engine)
  on the slide's pixels, timed on in-memory chunks and scaled to the slide;
- ``write abundances``: the abundances and residual written once as Zarr
  chunks with the store's own codec, no pyramid;
- ``segment nuclei``: a bare classical nuclear segmentation (Gaussian blur,
  one global threshold, connected components) on the nuclear channel, read
  and written once;
- ``measure``: each cell's per-channel sums (``np.bincount``) from the cell
  labels and the abundance channels, read once;
- ``read measurements``: ``measurements.csv`` parsed once into numbers with the
  fastest reader installed (pandas' pyarrow engine, else its C parser); every
  column, as the score step needs them all (the means and geometry go on to
  ``cells.csv``, the HER2 sectors are scored);
- ``python start``: ``import qdquant.cli`` in a fresh interpreter (paid once by
  every step).

A step's lower bound is the sum of the parts it must do (``STEP_PARTS``);
``bench_wholeslide.py`` prints "step time / lower bound" from them.

    python benchmarks/lower_bounds.py SLIDE.ome.tif RESULTS/SAMPLE [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from scipy import ndimage as ndi

from qdquant import io, unmixing

REPO = Path(__file__).resolve().parents[1]

#: The parts each step cannot avoid (keys of :func:`lower_bounds`).
STEP_PARTS = {
    "unmix": ("python start", "read cube", "nnls", "write abundances"),
    "segment": ("python start", "segment nuclei"),
    "quantify": ("python start", "measure"),
    "score": ("python start", "read measurements"),
    "report": ("python start",),
}


def _blocks(shape_yx, chunk):
    """(y, x) slices of the ``chunk``² grid over ``shape_yx``."""
    return [(slice(y, min(y + chunk, shape_yx[0])), slice(x, min(x + chunk, shape_yx[1])))
            for y in range(0, shape_yx[0], chunk) for x in range(0, shape_yx[1], chunk)]


class Clock:
    """Wall and CPU seconds (user + system, all threads of this process) of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def scaled(self, factor: float) -> tuple[float, float]:
        return self.wall * factor, self.cpu * factor


def _level0(group_path: Path) -> zarr.Array:
    """The full-resolution array of an OME-Zarr multiscale group (its first dataset)."""
    attrs = json.loads((group_path / ".zattrs").read_text())
    return zarr.open_array(str(group_path / attrs["multiscales"][0]["datasets"][0]["path"]), mode="r")


def _parallel(fn, items, threads):
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def time_read_cube(slide: Path, chunk: int, threads: int) -> tuple[float, float]:
    """Wall and CPU seconds to decode every pixel of the slide once, ``chunk``² blocks on ``threads`` threads."""
    with io.open_cube(slide, chunk_size=chunk) as cube, Clock() as clock:
        _parallel(lambda b: np.asarray(cube.data[:, b[0], b[1]]).shape, _blocks(cube.data.shape[1:], chunk), threads)
    return clock.wall, clock.cpu


def time_nnls(slide: Path, spectra: np.ndarray, chunk: int, n_blocks: int = 2) -> tuple[float, float]:
    """Wall and CPU seconds per megapixel of the NNLS kernel on ``n_blocks`` in-memory ``chunk``² blocks."""
    with io.open_cube(slide, chunk_size=chunk) as cube:
        blocks = _blocks(cube.data.shape[1:], chunk)
        picks = [blocks[i] for i in np.linspace(0, len(blocks) - 1, n_blocks).round().astype(int)]
        arrays = [np.asarray(cube.data[:, b[0], b[1]]) for b in picks]
    offset = np.percentile(arrays[0].reshape(arrays[0].shape[0], -1), 1, axis=1)
    unmixing.unmix(arrays[0][:, :64, :64], spectra, offset=offset)  # compile / load numba's cache first
    with Clock() as clock:
        for a in arrays:
            unmixing.unmix(a, spectra, offset=offset)
    return clock.scaled(1e6 / sum(a[0].size for a in arrays))


def time_write_abundances(results: Path, chunk: int, threads: int) -> tuple[float, float]:
    """Wall and CPU seconds to write the store's full-resolution level once (same codec and chunks), from memory."""
    level = _level0(results / "unmixed.ome.zarr")
    # one real chunk of every channel, written at every position: realistic compressibility
    sample = np.asarray(level[:, : min(chunk, level.shape[1]), : min(chunk, level.shape[2])])
    with tempfile.TemporaryDirectory(dir=results) as tmp:
        target = zarr.open_array(f"{tmp}/s0", mode="w", shape=level.shape, chunks=level.chunks, dtype=level.dtype,
                                 compressor=level.compressors[0] if level.compressors else None, zarr_format=2)

        def write(b):
            h, w = b[0].stop - b[0].start, b[1].stop - b[1].start
            target[:, b[0], b[1]] = sample[:, :h, :w]

        with Clock() as clock:
            _parallel(write, _blocks(level.shape[1:], chunk), threads)
    return clock.wall, clock.cpu


def time_segment_nuclei(results: Path, nuclear: int, pixel_size_um: float, chunk: int,
                        threads: int) -> tuple[float, float]:
    """Wall and CPU seconds for a bare nuclear segmentation: blur, global threshold, connected components, write."""
    level = _level0(results / "unmixed.ome.zarr")
    coarse = np.asarray(level[nuclear, ::16, ::16])
    threshold = float(np.percentile(coarse, 50))  # any one global threshold: the cost, not the quality
    sigma = 1.0 / pixel_size_um
    with tempfile.TemporaryDirectory(dir=results) as tmp:
        target = zarr.open_array(f"{tmp}/nuclei", mode="w", shape=level.shape[1:], chunks=level.chunks[1:],
                                 dtype=np.uint32, compressor=level.compressors[0] if level.compressors else None, zarr_format=2)

        def segment(b):
            image = ndi.gaussian_filter(np.asarray(level[nuclear, b[0], b[1]]), sigma)
            target[b[0], b[1]] = ndi.label(image > threshold)[0].astype(np.uint32)

        with Clock() as clock:
            _parallel(segment, _blocks(level.shape[1:], chunk), threads)
    return clock.wall, clock.cpu


def time_measure(results: Path, chunk: int, threads: int) -> tuple[float, float]:
    """Wall and CPU seconds to sum every channel over every cell (bincount), labels and channels read once."""
    level = _level0(results / "unmixed.ome.zarr")
    labels = _level0(results / "unmixed.ome.zarr" / "labels" / "cells")

    def measure(b):  # per chunk: sums by label id over the chunk's own id range (chunks add up by id)
        lab = np.asarray(labels[b[0], b[1]]).ravel()
        low = lab.min(initial=0)
        image = np.asarray(level[:, b[0], b[1]]).reshape(level.shape[0], -1)
        # only a scalar is kept: a whole slide's per-chunk tables would not fit in memory
        return float(sum(np.bincount(lab - low, weights=c).sum() for c in image))

    with Clock() as clock:
        _parallel(measure, _blocks(level.shape[1:], chunk), threads)
    return clock.wall, clock.cpu


def time_read_measurements(results: Path) -> tuple[float, float]:
    """Wall and CPU seconds to parse every column of ``measurements.csv`` once, with the fastest reader installed."""
    # pyarrow's reader is pandas' fastest, but not a dependency: the bound is what this machine can do
    engine = "pyarrow" if importlib.util.find_spec("pyarrow") else "c"
    with Clock() as clock:
        pd.read_csv(results / "measurements.csv", engine=engine)
    return clock.wall, clock.cpu


def time_python_start() -> tuple[float, float]:
    """Wall and CPU seconds to start a fresh interpreter and import what a step imports (the CLI,
    and the numerical stack the steps use)."""
    code = "import qdquant.cli, qdquant.pipeline, qdquant.unmixing, qdquant.segmentation, qdquant.report"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with Clock() as clock:
        subprocess.run([sys.executable, "-c", code], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return clock.wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def lower_bounds(slide: Path, results: Path, *, spectra_csv: Path, threads: int = 2, chunk: int = 2048) -> dict:
    """Each part's bare (wall, CPU) seconds on this slide (see the module docstring)."""
    spectra = pd.read_csv(spectra_csv, index_col=0).to_numpy(float)
    with io.open_cube(slide, chunk_size=chunk) as cube:
        n_mpx = cube.data.shape[1] * cube.data.shape[2] / 1e6
    roles = json.loads((results / "unmixed.ome.zarr" / ".zattrs").read_text()).get("qdquant", {})
    nuclear = next((i for i, r in enumerate(roles.get("channels", [])) if r.get("role") == "nuclear_stain"), 0)
    return {
        "python start": time_python_start(),
        "read cube": time_read_cube(slide, chunk, threads),
        # the kernel runs on all threads itself: its wall time per Mpx times the slide's Mpx
        "nnls": tuple(t * n_mpx for t in time_nnls(slide, spectra, chunk)),
        "write abundances": time_write_abundances(results, chunk, threads),
        "segment nuclei": time_segment_nuclei(results, nuclear, io.read_pixel_size_um(results / "unmixed.ome.zarr"),
                                              chunk, threads),
        "measure": time_measure(results, chunk, threads),
        "read measurements": time_read_measurements(results),
    }


def step_bounds(parts: dict) -> dict:
    """Each step's lower bound, (wall, CPU) seconds: the sums of its parts'."""
    return {step: tuple(sum(parts[p][i] for p in names) for i in (0, 1)) for step, names in STEP_PARTS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide", type=Path)
    parser.add_argument("results", type=Path, help="the sample's results folder (unmix and segment run)")
    parser.add_argument("--spectra", type=Path, default=REPO / "config" / "spectra.csv")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=2048)
    args = parser.parse_args()
    parts = lower_bounds(args.slide, args.results, spectra_csv=args.spectra, threads=args.threads,
                         chunk=args.chunk_size)
    with io.open_cube(args.slide, chunk_size=args.chunk_size) as cube:
        n_mpx = cube.data.shape[1] * cube.data.shape[2] / 1e6
    for name, (wall, cpu) in parts.items():
        print(f"  {name:18s} {wall:7.1f} s  {n_mpx / wall:7.1f} Mpx/s  CPU {cpu:7.1f} s")
    for step, (wall, cpu) in step_bounds(parts).items():
        print(f"  lower bound {step:9s} {wall:7.1f} s  CPU {cpu:7.1f} s")
    print(json.dumps(parts))


if __name__ == "__main__":
    main()
