"""Whole-slide scale: time, throughput and peak memory of every step, by slide size.

For each size (default 4096², 8192², 16384², 31 bands) a slide is simulated
tile by tile (``qdquant simulate --size N``), then each step runs as its own
process (``qdquant <step>``, exactly as the workflow runs it) and reports its
wall time, Mpx/s, CPU time (user + system over all threads: unlike wall
time, it does not grow when other jobs share the machine) and peak RSS, and
beside it the step's lower bound (``lower_bounds.py``: the bare cost of the
work the step must do, on the same files) and the ratio "step / lower bound"
(of CPU time, which other jobs on the machine do not inflate). With
``--workflow`` the whole Snakemake workflow also runs on the slide, from a
fresh results folder, and its wall time to ``cohort_report.html`` gives the
end-to-end Mpx/s.

The config is the default one with shading correction on
(``illumination: estimate``; library refinement is on by default).
Targets: end to end >= 2 Mpx/s on 16384²; no step above 3x its lower bound;
peak RSS <= 4 GiB and flat (within 20 %) from 8192² to 16384².

    python benchmarks/bench_wholeslide.py [--sizes 4096 8192 16384] [--work /tmp/qdquant-wholeslide] [--workflow]

Needs about 1.3 GB of disk per 4096² (raw input, uncompressed, plus outputs).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lower_bounds  # noqa: E402  (this folder's lower_bounds.py)

STEPS = ("unmix", "segment", "quantify", "score", "report")

# Runs one CLI command in a child process and prints its own peak RSS (MiB) last.
CHILD = (
    "import resource, sys\n"
    "from qdquant.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('PEAK_RSS_MIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(args: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system, all threads) and peak RSS (MiB) of one CLI command."""
    t0, c0 = time.perf_counter(), _children_cpu_s()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - t0, _children_cpu_s() - c0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    peak = [float(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_MIB")]
    return seconds, cpu, peak[-1]


def workflow_row(cfg_path: Path, results: Path, size: int) -> dict:
    """Wall and CPU time of the whole workflow (``snakemake --cores 2``) from an empty results
    folder to ``cohort_report.html``; peak RSS is that of the largest single process."""
    t0, c0 = time.perf_counter(), _children_cpu_s()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", str(cfg_path),
                           "--quiet", "rules"], cwd=REPO, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - t0, _children_cpu_s() - c0
    if proc.returncode != 0 or not (results / "cohort_report.html").is_file():
        raise SystemExit(f"the workflow failed:\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    mpx = size * size / 1e6
    print(f"  workflow  {seconds:8.1f} s {mpx / seconds:8.2f} Mpx/s end to end  CPU {cpu:8.1f} s", flush=True)
    return {"size": size, "step": "workflow (end to end)", "seconds": seconds, "cpu_seconds": cpu,
            "Mpx_per_s": mpx / seconds, "cpu_s_per_Mpx": cpu / mpx, "peak_rss_MiB": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--work", default="/tmp/qdquant-wholeslide")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--keep", action="store_true", help="keep the slides and outputs")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS),
                        help="steps to run (later steps need the outputs of earlier ones: use with --keep)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a slide simulated by an earlier --keep run instead of simulating it again")
    parser.add_argument("--illumination", choices=["none", "estimate"], default="estimate")
    parser.add_argument("--workflow", action="store_true",
                        help="also run the whole Snakemake workflow on each slide (end-to-end Mpx/s)")
    parser.add_argument("--no-bounds", action="store_true", help="skip the lower bounds")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        name = f"ws{size}"
        if args.reuse and (work / f"{name}.ome.tif").exists():
            t_sim = 0.0
        else:
            t_sim, _, _ = run(["simulate", "--size", str(size), "--seed", "7", "--out", str(work), "--name", name])
        (work / f"{name}.tsv").write_text(f"sample_id\timage\n{name}\t{work / name}.ome.tif\n")
        config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
        config.update(samples=str(work / f"{name}.tsv"), spectra=str(REPO / "config" / "spectra.csv"),
                      panel=str(REPO / "config" / "panel.tsv"), results=str(work / "results"),
                      chunk_size=args.chunk_size, illumination=args.illumination)
        cfg_path = work / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(config))
        mpx = size * size / 1e6
        print(f"\n{size}x{size} ({mpx:.0f} Mpx), simulated in {t_sim:.0f} s" + (" (reused)" if not t_sim else ""), flush=True)
        for step in args.steps:
            seconds, cpu, peak = run([step, "--config", str(cfg_path), "--sample", name])
            rows.append({"size": size, "step": step, "seconds": seconds, "cpu_seconds": cpu,
                         "Mpx_per_s": mpx / seconds, "cpu_s_per_Mpx": cpu / mpx, "peak_rss_MiB": peak})
            print(f"  {step:9s} {seconds:8.1f} s {mpx / seconds:8.2f} Mpx/s  CPU {cpu:8.1f} s"
                  f" ({cpu / mpx:6.2f} s/Mpx)  peak RSS {peak:7.0f} MiB", flush=True)
        results = work / "results" / name
        if not args.no_bounds and (results / "unmixed.ome.zarr" / "labels" / "cells").is_dir():
            parts = lower_bounds.lower_bounds(work / f"{name}.ome.tif", results, spectra_csv=REPO / "config" /
                                              "spectra.csv", chunk=args.chunk_size)
            print("  lower bounds (the bare work, lower_bounds.py):")
            for part, (wall, cpu) in parts.items():
                print(f"    {part:18s} {wall:7.1f} s  CPU {cpu:7.1f} s")
            bounds = lower_bounds.step_bounds(parts)
            for r in rows:
                if r["size"] == size and r["step"] in bounds:
                    r["bound_seconds"], r["bound_cpu_seconds"] = bounds[r["step"]]
                    r["cpu_ratio"] = r["cpu_seconds"] / max(r["bound_cpu_seconds"], 1e-9)
        if args.workflow:
            shutil.rmtree(results, ignore_errors=True)
            rows.append(workflow_row(cfg_path, results.parent, size))
        if not args.keep:
            shutil.rmtree(work / "results" / name, ignore_errors=True)
            (work / f"{name}.ome.tif").unlink(missing_ok=True)
    print("\n| size | step | time (s) | Mpx/s | CPU (s) | CPU s/Mpx | peak RSS (MiB) | lower bound CPU (s) "
          "| CPU / lower bound |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bound = (f"{r['bound_cpu_seconds']:.0f} | {r['cpu_ratio']:.1f}" if "cpu_ratio" in r else "- | -")
        print(f"| {r['size']}² | {r['step']} | {r['seconds']:.1f} | {r['Mpx_per_s']:.2f} | {r['cpu_seconds']:.0f}"
              f" | {r['cpu_s_per_Mpx']:.2f} | {r['peak_rss_MiB']:.0f} | {bound} |")
    (work / f"bench_wholeslide_{'_'.join(args.steps)}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
