"""The ``qdquant`` command line.

Each workflow step is ``qdquant <step> --config CONFIG --sample ID``, the same
command the Snakemake rule runs. Heavy modules are imported inside the
commands so ``qdquant --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

SAMPLE_STEPS = ("unmix", "segment", "quantify", "score", "report")
CONFIG_HELP = "config.yaml; repeat to merge several in order (later keys win), as snakemake --configfile does"


def _load(args, *, check_images: bool = False):
    from qdquant.config import load_config

    return load_config(args.config if len(args.config) > 1 else args.config[0], check_images=check_images)


def _run_step(args) -> None:
    from qdquant import pipeline
    from qdquant.scheduler import dask_scheduler, step_config

    cfg = _load(args)
    with dask_scheduler(cfg, threads=args.threads) as workers:
        pipeline.STEPS[args.command](step_config(cfg, workers, args.mem_mb), args.sample)


def _calibrate(args) -> None:
    from qdquant import pipeline

    pipeline.calibrate(_load(args))


def _cohort(args) -> None:
    from qdquant import pipeline

    pipeline.cohort(_load(args))


def _check(args) -> None:
    cfg = _load(args, check_images=True)
    print(f"{cfg.source}: OK ({len(cfg.samples)} samples, {len(cfg.library.names)} endmembers)")


def _simulate(args) -> None:
    from qdquant import simulate

    out = Path(args.out)
    if args.cohort:
        presets = simulate.test_cohort()
        names = list(presets) if args.preset is None else [args.preset]
        for name in names:
            if name not in presets:
                raise SystemExit(f"qdquant: error: unknown preset '{name}' ({', '.join(presets)})")
            simulate.write_slide(simulate.simulate_slide(**presets[name]), out, name)
            print(f"wrote {out / name}.ome.tif")
        return
    name = args.name or f"sim_her2_{args.her2.replace('+', 'plus')}_seed{args.seed}"
    if args.size > 2048:
        # whole slide: tile by tile, never in memory; no per-cell truth
        from qdquant import io

        cube = simulate.simulate_wholeslide(args.size, seed=args.seed, photons_per_count=args.photons_per_count)
        io.write_ome_tiff(out / f"{name}.ome.tif", cube, pixel_size_um=0.5, tile=512, interleaved=True,
                          compression=None)
        print(f"wrote {out / name}.ome.tif")
        return
    kwargs = dict(
        her2_score=args.her2,
        shape=(args.size, args.size),
        seed=args.seed,
        drift_nm=args.drift_nm,
        shading=args.shading,
        off_library_af=args.off_library_af,
        crowded=args.crowded,
        photons_per_count=args.photons_per_count,
    )
    simulate.write_slide(simulate.simulate_slide(**kwargs), out, name)
    print(f"wrote {out / name}.ome.tif")


def _view(args) -> None:
    from qdquant.viewer.app import open_results

    open_results(args.path)
    import napari

    napari.run()


def _library_build(args) -> None:
    import numpy as np

    from qdquant import io, library

    controls = {}
    for item in args.control:
        name, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"qdquant: error: --control takes NAME=PATH, got '{item}'")
        with io.open_cube(path) as cube:
            controls[name] = np.asarray(cube.data)
    unstained = None
    if args.unstained is not None:
        with io.open_cube(args.unstained) as cube:
            unstained = np.asarray(cube.data)
    wavelengths = np.asarray([float(w) for w in args.wavelengths.split(",")])
    table = library.build_library(controls, unstained, wavelengths_nm=wavelengths, names=list(controls))
    io.write_csv(table, args.out)
    library.plot_library(table, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out}")


def _positive_int(text: str) -> int:
    try:
        value = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qdquant",
        description="Quantify multiplexed quantum-dot immunofluorescence: unmix, segment, measure, score.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    for step in SAMPLE_STEPS:
        p = sub.add_parser(step, help=f"run the {step} step on one sample")
        p.add_argument("--config", required=True, action="append", help=CONFIG_HELP)
        p.add_argument("--sample", required=True, help="sample_id from the sample sheet")
        p.add_argument("--threads", type=_positive_int, metavar="N",
                       help="CPUs the step got (the rule's threads): dask's workers unless dask.num_workers is set")
        p.add_argument("--mem-mb", type=_positive_int, metavar="MB",
                       help="memory the step may use; chunk_size shrinks to fit it (default: no limit)")
        p.set_defaults(func=_run_step)
    for name, func, text in (
        ("calibrate", _calibrate, "fit HER2 thresholds on the control slides"),
        ("cohort", _cohort, "write cohort_summary.csv and cohort_report.html"),
        ("check", _check, "validate the config, sample sheet, panel, library and image headers"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, action="append", help=CONFIG_HELP)
        p.set_defaults(func=func)

    p = sub.add_parser("simulate", help="write a simulated multispectral slide with its ground truth")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cohort", action="store_true", help="write the bundled test cohort (or one --preset of it)")
    p.add_argument("--preset", help="one slide of the test cohort")
    p.add_argument("--name", help="file name stem")
    p.add_argument("--her2", default="2+", choices=["0", "ultralow", "1+", "2+", "3+"])
    p.add_argument("--size", type=int, default=512,
                   help="edge in pixels; above 2048 a whole slide is written tile by tile (no per-cell truth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drift-nm", type=float, default=0.0, help="spectral drift of the slide vs the library")
    p.add_argument("--shading", type=float, default=0.0, help="field-of-view corner darkening (0-1)")
    p.add_argument("--off-library-af", action="store_true", help="add off-library autofluorescent objects")
    p.add_argument("--crowded", action="store_true", help="touching nuclei in packed nests")
    p.add_argument("--photons-per-count", type=float, default=4.0)
    p.set_defaults(func=_simulate)

    p = sub.add_parser("view", help="look at a sample's results in napari (needs the napari extra)")
    p.add_argument("path", help="a sample's results folder (results/SAMPLE) or its unmixed.ome.zarr")
    p.set_defaults(func=_view)

    lib = sub.add_parser("library", help="spectral library tools").add_subparsers(dest="library_command", required=True)
    p = lib.add_parser("build", help="build spectra.csv from single-stain control images")
    p.add_argument("--control", action="append", required=True, metavar="NAME=PATH",
                   help="a single-stain control cube (repeat per fluorophore)")
    p.add_argument("--unstained", help="an unstained control cube (autofluorescence)")
    p.add_argument("--wavelengths", required=True, help="comma-separated band centres (nm)")
    p.add_argument("--out", required=True, help="spectra.csv to write")
    p.set_defaults(func=_library_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.captureWarnings(True)
    from qdquant.errors import QdquantError

    try:
        args.func(args)
    except QdquantError as exc:
        print(f"qdquant: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
