"""Shading on fields that are not repeated: BaSiCPy against qdquant's own estimator (issue #19).

On each slide, the flat field each method estimates is compared with the
true shading field the slide was rendered with:

* the independent generator's messy slides (``tests/independent``; default
  ``test_data/independent/messy_nooffset_1024_s0``): 1024², shaded over 1-3
  fields of view per side (``shading_fovs``) by ``shading_depth`` at the corners
  (``slides.shading_map``);
* positive controls, whose field IS repeated: qdquant's messy 1+ slide at
  1024² and 2048² with 192-px fields (``qdquant.simulate.messy_cohort(size, 192)``,
  about 5 x 5 and 11 x 11 fields, 25 % darker corners), simulated into
  ``--positive`` on first use.

Methods (each on the offset-subtracted cube; the dark offset as the pipeline
estimates it, ``unmixing.estimate_offset``):

* ``qdquant auto``: ``illumination.estimate_slide_shading`` as ``illumination:
  estimate`` runs it (FOV size searched, flat below a held-out explained
  variance of 0.01);
* ``qdquant field=N``: ``estimate_shading`` on the same block brightness with
  the FOV size given (``N`` = the slide's edge: one quadratic surface over the
  whole slide, the smooth estimator a user can run without knowing the fields);
* ``basic tile=N s=S``: BaSiCPy (``BaSiC(get_darkfield=False)``) fitted to the
  stack of the slide's ``N``² tiles (from pixel 0) of the total light (the bands
  summed), ``smoothness_flatfield`` S (``auto``: BaSiCPy's default), its flat
  field tiled back over the slide. ``N`` = the slide's edge: the single image.

Per estimate: the RMS relative error of the flat field (estimate / truth - 1,
both normalised to mean 1) over the whole slide and over the tissue (true cells),
the explained variance of the true shading (1 - var(log(est/true)) / var(log true),
whole slide; 0 for a flat estimate, 1 for a perfect one, negative when worse than none)
and the seconds. A flat field ("none") is the reference.

    PYTHONPATH=src /tmp/basic-venv/bin/python benchmarks/eval_shading.py \\
        [--slides test_data/independent/messy_nooffset_1024_s0] [--positive test_data/shading_positive] \\
        [--positive-sizes 1024 2048] \\
        [--tiles 256 341 512 1024] [--smoothness auto 10] [--only ind_null_a ...] [--out results/eval_shading]

BaSiCPy is optional: without it only qdquant's estimator is measured. It is
best installed in a venv of its own (BaSiCPy 2.0.0 pulls torch and declares scipy < 1.13;
installing qdquant's dependencies beside it moves scipy past that, pip warns, and its fit
still runs)::

    python3.11 -m venv /tmp/basic-venv
    /tmp/basic-venv/bin/pip install basicpy tifffile pandas numba imagecodecs zarr ome-zarr jsonschema \\
        matplotlib anndata

and this script run with that interpreter (``PYTHONPATH=src``). On a shared machine set
``OMP_NUM_THREADS=1``: torch's threads fighting for few cores made each fit 10-50 times slower.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "independent"))
import slides as independent  # noqa: E402

from qdquant import illumination, unmixing  # noqa: E402

try:
    from basicpy import BaSiC
except Exception as exc:  # pragma: no cover - optional
    BaSiC = None
    BASIC_ERROR = f"{type(exc).__name__}: {exc}"

POSITIVE = "messy_1plus_{size}_fov192"


def read_library(path: Path):
    """(C, K) spectra with a flat column appended when there is none (as the pipeline's fit), names."""
    frame = pd.read_csv(path)
    names = [c for c in frame.columns if c != "wavelength_nm"]
    spectra = frame[names].to_numpy(np.float64)
    if not unmixing.flat_columns(spectra).any():
        spectra, names = np.column_stack([spectra, np.ones(len(spectra))]), [*names, "Offset"]
    return spectra, names


def independent_slides(folder: Path, only):
    """(name, cube, spectra, names, true field, tissue mask, fields per side, depth) of each slide."""
    if not (folder / "truth_samples.csv").exists():
        raise SystemExit(f"{folder}: no independent cohort there (python benchmarks/eval_independent.py "
                         "--cohort messy_nooffset makes one)")
    truth = pd.read_csv(folder / "truth_samples.csv")
    spectra, names = read_library(folder / "spectra.csv")
    for _, row in truth.iterrows():
        name = row["sample_id"]
        if only and name not in only:
            continue
        params = json.loads(row["params"])
        cube = tifffile.imread(folder / f"{name}.ome.tif")
        fovs, depth = int(params["shading_fovs"]), float(params["shading_depth"])
        true = independent.shading_map(cube.shape[1:], fovs, depth)
        tissue = tifffile.imread(folder / f"{name}_truth_cells.tif") > 0
        yield name, cube, spectra, names, true, tissue, fovs, depth, cube.shape[1] // max(fovs, 1)


def positive_slide(folder: Path, size: int):
    """qdquant's messy 1+ slide at ``size``² with 192-px fields (simulated on first use)."""
    name = POSITIVE.format(size=size)
    image, field = folder / f"{name}.ome.tif", folder / f"{name}_shading.npy"
    if not (image.exists() and field.exists()):
        from qdquant import simulate

        slide = simulate.simulate_slide(**simulate.messy_cohort(size, 192)["messy_1plus"])
        simulate.write_slide(slide, folder, name)
        np.save(field, slide.shading)
    cube = tifffile.imread(image)
    spectra, names = read_library(folder / f"{name}_library.csv")
    tissue = tifffile.imread(folder / f"{name}_truth_labels.tif")[1] > 0
    true = np.load(field)
    return name, cube, spectra, names, true, tissue, cube.shape[1] / 192, 0.25, 192


def compare(est: np.ndarray, true: np.ndarray, tissue: np.ndarray) -> dict:
    """RMS relative error (whole slide, tissue) and explained variance of the true shading."""
    out = {}
    for where, mask in (("", np.ones_like(tissue)), ("_tissue", tissue)):
        e, t = est[mask].astype(np.float64), true[mask].astype(np.float64)
        ratio = (e / e.mean()) / (t / t.mean())
        out[f"rms_err{where}"] = float(np.sqrt(np.mean((ratio - 1) ** 2)))
        if not where:  # in logs: a flat estimate explains 0 exactly
            out["explained"] = float(1 - np.var(np.log(ratio)) / np.var(np.log(t)))
    return out


def tiled(profile: np.ndarray, shape) -> np.ndarray:
    """``profile`` repeated over a slide of ``shape`` from pixel (0, 0)."""
    py, px = profile.shape
    return profile[np.arange(shape[0])[:, None] % py, np.arange(shape[1])[None, :] % px]


def run_qdquant(cube, spectra, names, fields, true_field):
    """The pipeline's estimate (auto), the estimates with each FOV size of ``fields`` given, and
    those of the largest and the true FOV size kept whatever their held-out score (ungated)."""
    t0 = time.perf_counter()
    offset = unmixing.estimate_offset(cube, max_pixels=illumination.OFFSET_PIXELS)
    shading, brightness, offset = illumination.estimate_slide_shading(cube, spectra, names.index("DAPI"),
                                                                      offset=offset)
    seconds = time.perf_counter() - t0
    shape = cube.shape[1:]
    rows = [("qdquant auto", shading, seconds)]
    for n in fields:
        t0 = time.perf_counter()
        s = illumination.estimate_shading(brightness, fov_px=(n, n))
        rows.append((f"qdquant field={n}", s, time.perf_counter() - t0 + seconds))
    gate = illumination.MIN_EXPLAINED
    try:  # the surface the FOV size would give were it kept whatever its held-out score
        illumination.MIN_EXPLAINED = -np.inf
        for n in sorted({fields[-1], true_field}):
            t0 = time.perf_counter()
            s = illumination.estimate_shading(brightness, fov_px=(n, n))
            rows.append((f"qdquant field={n} ungated", s, time.perf_counter() - t0 + seconds))
    finally:
        illumination.MIN_EXPLAINED = gate
    out = []
    for method, s, sec in rows:
        field = illumination.shading_field(s, 0, shape[0], 0, shape[1])
        out.append(dict(method=method, field=field, seconds=sec, fov_found=f"{s.fov_px[0]}x{s.fov_px[1]}",
                        held_out=s.explained, applied=not s.is_flat))
    return out, offset


def run_basic(light: np.ndarray, tile: int, smoothness) -> tuple[np.ndarray, float]:
    """BaSiC's flat field of the stack of ``light``'s ``tile``² tiles, tiled back over the slide."""
    ny, nx = light.shape[0] // tile, light.shape[1] // tile
    stack = np.stack([light[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile]
                      for i in range(ny) for j in range(nx)]).astype(np.float32)
    if len(stack) == 1:  # BaSiCPy 2.0 fails on a stack of one (a 0-d baseline): the same image twice
        stack = np.concatenate([stack, stack])
    kwargs = {} if smoothness == "auto" else {"smoothness_flatfield": float(smoothness)}
    t0 = time.perf_counter()
    basic = BaSiC(get_darkfield=False, **kwargs)
    basic.fit(stack)
    seconds = time.perf_counter() - t0
    return tiled(np.asarray(basic.flatfield, np.float64), light.shape), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", default=str(ROOT / "test_data/independent/messy_nooffset_1024_s0"),
                        help="an independent messy cohort (benchmarks/eval_independent.py makes one)")
    parser.add_argument("--positive", default=str(ROOT / "test_data/shading_positive"),
                        help="folder of the positive control (simulated on first use); '' to skip it")
    parser.add_argument("--positive-sizes", type=int, nargs="*", default=[1024, 2048],
                        help="edges of the positive controls (192-px fields: about 5 or 11 per side)")
    parser.add_argument("--tiles", type=int, nargs="*", default=[256, 341, 512, 1024])
    parser.add_argument("--smoothness", nargs="*", default=["auto", "10"],
                        help="BaSiCPy smoothness_flatfield values (auto: its default)")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--out", default="results/eval_shading")
    args = parser.parse_args()
    if BaSiC is None:
        print(f"BaSiCPy not importable ({BASIC_ERROR}): measuring qdquant's estimator only. To add it, "
              "install it in a venv of its own and run this script with that interpreter "
              "(see this script's docstring).", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slides = independent_slides(Path(args.slides), args.only)
    positives = [size for size in args.positive_sizes if not args.only or POSITIVE.format(size=size) in args.only]
    if args.positive:  # the positive controls first
        slides = itertools.chain((positive_slide(Path(args.positive), size) for size in positives), slides)
    rows = []
    for name, cube, spectra, names, true, tissue, fovs, depth, field_px in slides:
        shape = cube.shape[1:]
        base = dict(slide=name, fovs=round(fovs, 2), depth=round(depth, 3), field_px=field_px)
        rows.append({**base, "method": "none", **compare(np.ones(shape), true, tissue), "seconds": 0.0})
        fields = sorted({*(t for t in args.tiles if t <= shape[0]), field_px, shape[0]})  # + the single image
        estimates, offset = run_qdquant(cube, spectra, names, fields, field_px)
        for e in estimates:
            rows.append({**base, "method": e["method"], **compare(e["field"], true, tissue),
                         "seconds": e["seconds"], "fov_found": e["fov_found"], "held_out": e["held_out"],
                         "applied": e["applied"]})
        if BaSiC is not None:
            light = (cube.astype(np.float32) - offset.astype(np.float32)[:, None, None]).sum(axis=0)
            for tile in fields:
                for s in args.smoothness:
                    field, seconds = run_basic(light, tile, s)
                    rows.append({**base, "method": f"basic tile={tile} s={s}", **compare(field, true, tissue),
                                 "seconds": seconds})
        print(pd.DataFrame([r for r in rows if r["slide"] == name]).to_string(
            index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
        pd.DataFrame(rows).to_csv(out / "eval_shading.csv", index=False)  # as far as it got
    table = pd.DataFrame(rows)
    print("\nRMS relative error of the flat field, whole slide (none = no correction):")
    pivot = table.pivot_table(index="method", columns="slide", values="rms_err", sort=False)
    print(pivot.to_string(float_format=lambda v: f"{v:.3f}"))
    print("\nExplained variance of the true shading:")
    pivot = table.pivot_table(index="method", columns="slide", values="explained", sort=False)
    print(pivot.to_string(float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
