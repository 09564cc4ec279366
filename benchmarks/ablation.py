"""Ablation of the real-slide corrections on the messy cohort.

Runs ``eval_cohort.py --cohort messy`` once with every correction on and
once with each switched off (library refinement, shading correction,
residual masking), then prints one row per run: HER2 scores right, per-cell
quadratic weighted kappa and class agreement (minimum and mean over the
five slides), nuclei and cell F1 at IoU 0.5 (minimum).

    python benchmarks/ablation.py [--out results/ablation] [--only messy_2plus ...]

Each run takes about as long as the pipeline on five 512² slides.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent

ALL_ON = ["unmixing.refine_library=auto", "illumination=estimate", "unmixing.flag_poor_fit=true"]
RUNS = {
    "all corrections": ALL_ON,
    "no library refinement": [*ALL_ON, "unmixing.refine_library=false"],
    "no shading correction": [*ALL_ON, "illumination=none"],
    "no residual masking": [*ALL_ON, "unmixing.flag_poor_fit=false"],
    "none of them": ["unmixing.refine_library=false", "illumination=none", "unmixing.flag_poor_fit=false"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/ablation")
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args()
    rows = []
    for name in args.runs:
        out = Path(args.out) / name.replace(" ", "_")
        cmd = [sys.executable, str(HERE / "eval_cohort.py"), "--cohort", "messy", "--out", str(out),
               "--set", *RUNS[name]]
        if args.only:
            cmd += ["--only", *args.only]
        print(f"== {name}: {' '.join(RUNS[name])}", flush=True)
        subprocess.run(cmd, check=True)
        t = pd.read_csv(out / "eval.csv", dtype={"her2_true": str, "her2_got": str})
        rows.append({
            "run": name,
            "HER2 scores right": f"{int((t.her2_true == t.her2_got).sum())}/{len(t)}",
            "kappa min": t.kappa.min(), "kappa mean": t.kappa.mean(),
            "agreement min": t.agreement.min(),
            "nuclei F1 min": t.nuclei_f1.min(), "cell F1 min": t.cell_f1.min(),
        })
    table = pd.DataFrame(rows)
    print()
    print(table.to_markdown(index=False, floatfmt=".3f") if _has_tabulate() else table.to_string(index=False))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
