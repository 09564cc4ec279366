"""Throughput of qdquant.unmixing.unmix against a pseudo-inverse and scipy.

Usage::

    python benchmarks/bench_unmix.py [--size 2048] [--bands 31] [--endmembers 7]
                                     [--scipy-px 20000] [--repeat 3] [--pause 0.25]
                                     [--threads 1] [--engine numba|numpy] [--corrections]

Builds a float32 cube (bands x size x size) from known sparse abundances
(Gaussian-peak spectra, one broad autofluorescence-like endmember present
everywhere, the others in about half of the pixels) plus Poisson-like noise,
then prints:

- the cost of the first call of ``unmix`` (numba compilation, or loading the
  compiled kernel from numba's cache), before any timing;
- NNLS throughput of ``unmix`` (abundances + residual), in Mpx/s;
- the throughput of a plain pseudo-inverse matmul (``pinv(A) @ cube``,
  float32, no residual, no constraint) in the same run, and the ratio;
- the speed-up over a per-pixel ``scipy.optimize.nnls`` loop, timed on a
  subset of pixels;
- peak memory: the traced peak of numpy allocations during ``unmix``
  (tracemalloc) and the process's maximum resident set size.

With ``--corrections`` it instead simulates a messy slide (crowded nests,
3 nm drift, 20 % shading on 192-px fields of view, off-library
autofluorescence, 2 e-/count) and times, as the unmix step runs them, the
library refinement, the shading estimation and the correction (fused into
the unmixing pass), each the best of 3 with every kernel compiled first,
against one unmixing pass (the default fit), then against one pass with
``poisson_weights`` (the fit of the ablation's "all corrections" run).

The best of ``--repeat`` timings is reported for both ``unmix`` and pinv
(interleaved, so that both see the same machine load; each timing starts
after a pause, ``--pause`` seconds, so that neither runs while the other's
idle threads still busy-wait: OpenBLAS's do so for about 0.1 s after a
call, on the cores the next method needs). ``--threads`` sets the
BLAS threads and numba's threads alike; ``--engine numpy`` times the
pure-numpy FC-NNLS fallback instead of the numba kernel.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import tracemalloc
from functools import partial


def _parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=2048, help="image edge in pixels (default 2048)")
    ap.add_argument("--bands", type=int, default=31)
    ap.add_argument("--endmembers", type=int, default=7)
    ap.add_argument("--scipy-px", type=int, default=20000, help="pixels for the scipy loop")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pause", type=float, default=0.25,
                    help="seconds of pause before each timing (default 0.25; 0: back to back)")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS and numba threads for every method (default 1, set before numpy loads)")
    ap.add_argument("--engine", choices=["numba", "numpy"], default="numba",
                    help="unmix kernel: numba (default) or the pure-numpy fallback")
    ap.add_argument("--corrections", action="store_true",
                    help="instead: the cost of library refinement and shading correction on a messy "
                         "simulated slide of --size² (default 2048²), against one unmixing pass")
    return ap


if __name__ == "__main__":  # thread counts must be set before numpy / numba are imported
    _threads = str(_parser().parse_known_args()[0].threads)
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[_var] = _threads

import numpy as np  # noqa: E402
from scipy.optimize import nnls  # noqa: E402

from qdquant import unmixing  # noqa: E402
from qdquant.unmixing import unmix  # noqa: E402


def make_problem(size, bands, endmembers, seed=0):
    """Spectra (C, K) float64, cube (C, Y, X) float32, true abundances (K, Y, X)."""
    rng = np.random.default_rng(seed)
    wl = np.linspace(450.0, 750.0, bands)
    centres = np.linspace(500.0, 720.0, endmembers - 1)
    spectra = [np.exp(-0.5 * ((wl - c) / 12.0) ** 2) for c in centres]
    spectra.append(np.exp(-0.5 * ((wl - 560.0) / 90.0) ** 2))  # broad AF
    a = np.stack(spectra, axis=1)
    a /= a.max(axis=0)
    x = np.empty((endmembers, size, size), np.float32)
    for k in range(endmembers - 1):
        present = rng.random((size, size), dtype=np.float32) < 0.5
        x[k] = rng.gamma(2.0, 40.0, (size, size)).astype(np.float32) * present
    x[-1] = rng.gamma(4.0, 5.0, (size, size)).astype(np.float32)
    cube = (a.astype(np.float32) @ x.reshape(endmembers, -1)).reshape(bands, size, size)
    # Poisson-like noise, sqrt(signal + read noise^2), drawn row slab by slab
    for y0 in range(0, size, 256):
        sl = cube[:, y0:y0 + 256]
        sl += rng.standard_normal(sl.shape, dtype=np.float32) * np.sqrt(sl + 4.0)
    return a, cube, x


def corrections(size: int) -> int:
    """Time library refinement and shading correction as the unmix step runs them, vs one unmixing pass."""
    import dask.array as da

    from qdquant import illumination, simulate
    from qdquant.pipeline import LIBRARY_SAMPLING, REFINE_SAMPLING, pixel_sample
    from qdquant.unmixing import refine_library

    t = time.perf_counter()
    slide = simulate.simulate_slide(her2_score="2+", shape=(size, size), seed=3, shading=0.2, fov_px=192,
                                    crowded=True, off_library_af=True, photons_per_count=2.0, drift_nm=3.0)
    print(f"messy {size}x{size} slide (192-px FOVs, 20 % shading, 3 nm drift, off-library AF, "
          f"2 e-/count) simulated in {time.perf_counter() - t:.0f} s; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    library = slide.library
    names = [c for c in library.columns if c != "wavelength_nm"]
    a = library[names].to_numpy()
    nuclear = names.index("DAPI")
    cube = da.from_array(slide.cube, chunks=(slide.cube.shape[0], 1024, 1024))

    def refine(data):
        sample = pixel_sample(data, **LIBRARY_SAMPLING)[0]  # as the unmix step reads it
        return refine_library(sample, library, slide.wavelengths_nm, max_shift_nm=6, **REFINE_SAMPLING)

    def estimate(data):
        return illumination.estimate_slide_shading(data, a, nuclear)

    def unmix_pass(data, **kw):
        return da.compute(*unmix(data, a, **kw))

    def gain_of(data, shading, offset):  # as the unmix step corrects: inside the fit
        return dict(gain=illumination.inverse_field(shading, data.chunks[1:]), gain_offset=offset)

    # compile / load every kernel on a corner first (numpy and dask signatures,
    # the raw and the corrected cube's dtype), so that no timing includes numba
    corner = cube[:, :512, :512].rechunk((-1, 256, 256))
    unmix(corner.compute(), a)
    shading, _, offset = estimate(corner)
    for data in (corner, illumination.correct_shading(corner, shading, offset)):
        unmix_pass(data)
        refine(data)
    for kw in ({}, dict(weights="poisson")):
        unmix_pass(corner, **gain_of(corner, shading, offset), **kw)

    def best(f, repeat=3):
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            out = f()
            times.append(time.perf_counter() - t)
        return out, min(times)

    _, t_unmix = best(lambda: unmix_pass(cube))
    _, t_refine = best(lambda: refine(cube))
    (shading, _, offset), t_estimate = best(lambda: estimate(cube))
    _, t_unmix_corrected = best(lambda: unmix_pass(cube, **gain_of(cube, shading, offset)))
    t_apply = max(t_unmix_corrected - t_unmix, 0.0)
    total = t_refine + t_estimate + t_apply
    print(f"best of 3 each; load average {os.getloadavg()[0]:.2f}")
    print(f"one unmixing pass (dask, abundances + residual): {t_unmix:7.3f} s")
    print(f"library refinement (4 windows of 384² px):       {t_refine:7.3f} s")
    print(f"shading estimation (one read of the cube):       {t_estimate:7.3f} s  (FOV {shading.fov_px})")
    print(f"shading correction, fused into the pass:        +{t_apply:7.3f} s")
    print(f"refinement + shading / one unmixing pass: {total / t_unmix:.2f}  (target < 1)")
    # the fit the ablation's "all corrections" run uses (photon-noise weights: the scalar kernel)
    _, t_poisson = best(lambda: unmix_pass(cube, **gain_of(cube, shading, offset), weights="poisson"), repeat=1)
    print(f"one unmixing pass with poisson_weights: true:   {t_poisson:7.3f} s; "
          f"refinement + shading / that pass: {total / t_poisson:.2f}")
    _unmix_step_cost(slide)
    return 0


def _unmix_step_cost(slide) -> None:
    """The pipeline's unmix step on the slide as an OME-TIFF, with and without the two corrections."""
    import tempfile
    from pathlib import Path

    import yaml

    from qdquant import pipeline, simulate
    from qdquant.config import load_config

    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="qdquant-bench-") as tmp:
        tmp = Path(tmp)
        image = simulate.write_slide(slide, tmp, "messy")["image"]
        (tmp / "samples.tsv").write_text(f"sample_id\timage\nmessy\t{image}\n")
        times = {}
        for label, refine, illumination in (("without", False, "none"), ("with", "auto", "estimate")):
            raw = yaml.safe_load((repo / "config" / "config.yaml").read_text())
            raw.update(samples=str(tmp / "samples.tsv"), spectra=str(repo / "config" / "spectra.csv"),
                       panel=str(repo / "config" / "panel.tsv"), results=str(tmp / label),
                       illumination=illumination)
            raw.setdefault("unmixing", {})["refine_library"] = refine
            (tmp / f"{label}.yaml").write_text(yaml.safe_dump(raw))
            cfg = load_config(tmp / f"{label}.yaml")
            runs = []
            for _ in range(2):
                t = time.perf_counter()
                pipeline.STEPS["unmix"](cfg, "messy")
                runs.append(time.perf_counter() - t)
            times[label] = min(runs)
    added = times["with"] - times["without"]
    print(f"the unmix step (read the OME-TIFF, unmix, flags, QC, write the OME-Zarr), best of 2: "
          f"{times['without']:.2f} s without refinement and shading, {times['with']:.2f} s with them "
          f"(+{added:.2f} s, {added / times['without']:.0%})")


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.corrections:
        return corrections(args.size)

    t0 = time.perf_counter()
    a, cube, _ = make_problem(args.size, args.bands, args.endmembers)
    n_px = args.size * args.size
    print(f"problem: {args.bands} bands x {args.endmembers} endmembers x "
          f"{args.size}x{args.size} px float32 ({cube.nbytes / 2**20:.0f} MiB), "
          f"built in {time.perf_counter() - t0:.1f} s; "
          f"BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    use = "numba" if args.engine == "numba" and unmixing.fit.resolve_engine("auto") == "numba" else "numpy"
    fit = partial(unmix, engine=use)
    engine = use
    if engine == "numba":
        import numba

        engine += f" {numba.__version__}, {numba.get_num_threads()} threads"
    flat = cube.reshape(args.bands, -1)

    # first call: numba compiles the kernel for this input type (or loads it
    # from its on-disk cache, cache=True); not part of the timings below
    t = time.perf_counter()
    fit(np.ascontiguousarray(cube[:, :64, :64]), a)
    t_first = time.perf_counter() - t
    if use == "numba":
        from qdquant.unmixing.kernels import K16_MAX, KP, lanes, scalar

        kernels = [scalar.tiles, scalar.tiles_parallel, scalar.inverse_table, lanes.table16]
        if args.endmembers <= KP:
            kernels.append(lanes.lane_kernel(8, KP))
        elif args.endmembers <= K16_MAX:
            kernels.append(lanes.lane_kernel(16, args.endmembers))
        misses = sum(sum(f.stats.cache_misses.values()) for f in kernels)
        how = "compiled" if misses else "loaded from numba's cache"
        print(f"first call (64x64 px): {t_first:.2f} s, kernel {how}")

    # pseudo-inverse baseline and unmix, interleaved, best of --repeat
    pinv = np.linalg.pinv(a).astype(np.float32)
    t_pinv = t_nnls = np.inf
    for _ in range(args.repeat):
        time.sleep(args.pause)
        t = time.perf_counter()
        _ = pinv @ flat
        t_pinv = min(t_pinv, time.perf_counter() - t)
        del _
        time.sleep(args.pause)
        t = time.perf_counter()
        abund, resid = fit(cube, a)
        t_nnls = min(t_nnls, time.perf_counter() - t)
        del abund, resid

    tracemalloc.start()
    fit(cube, a)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # scipy loop on a subset
    n_sub = min(args.scipy_px, n_px)
    sub = flat[:, :n_sub].astype(np.float64)
    ref = np.empty((args.endmembers, n_sub))
    t = time.perf_counter()
    for i in range(n_sub):
        ref[:, i] = nnls(a, sub[:, i])[0]
    t_scipy = (time.perf_counter() - t) / n_sub * n_px
    sub_cube = np.ascontiguousarray(flat[:, :n_sub]).reshape(args.bands, 1, n_sub)
    t = time.perf_counter()
    ours = fit(sub_cube, a)[0][:, 0, :]
    t_sub = time.perf_counter() - t
    err = np.linalg.norm(ours - ref, axis=0) / np.maximum(1.0, np.linalg.norm(ref, axis=0))

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MiB (Linux)
    mpx = n_px / 1e6
    print(f"unmix engine: {engine}")
    print(f"unmix (NNLS + residual):    {t_nnls:8.3f} s  {mpx / t_nnls:8.2f} Mpx/s")
    print(f"pinv matmul (float32):      {t_pinv:8.3f} s  {mpx / t_pinv:8.2f} Mpx/s")
    print(f"ratio NNLS / pinv throughput: {t_pinv / t_nnls:.3f}  (target >= 0.33)")
    print(f"scipy.optimize.nnls loop:   {t_scipy:8.1f} s (extrapolated from {n_sub} px)  "
          f"{mpx / t_scipy:8.4f} Mpx/s")
    print(f"speed-up over scipy loop: {t_scipy / t_nnls:.0f}x on the whole image, "
          f"{t_scipy / n_px * n_sub / t_sub:.0f}x on the {n_sub}-px subset  (target >= 200x)")
    print(f"max per-pixel |x - x_scipy| / max(1, |x_scipy|) on the subset: {err.max():.2e}")
    print(f"peak traced memory during unmix: {peak / 2**20:.0f} MiB "
          f"(cube {cube.nbytes / 2**20:.0f} MiB, outputs "
          f"{(args.endmembers + 1) * n_px * 4 / 2**20:.0f} MiB); max RSS {rss:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
