"""Ablation of the real-slide corrections on the messy cohort.

Runs ``eval_cohort.py --cohort messy`` once with every correction on and
once with each switched off (library refinement, shading correction,
residual masking, Poisson weighting of the fit), then prints one row per run: HER2 scores right, per-cell
quadratic weighted kappa and class agreement over the cohort's cells
(pooled: a HER2-null slide alone has one class and no kappa), the lowest
slide agreement, and nuclei and cell F1 at IoU 0.5 (lowest slide).

    python benchmarks/ablation.py [--out results/ablation] [--size 2048] [--only messy_2plus ...]

2048² slides (the default) hold 8 x 8 fields of view of 256 px, enough to
estimate shading from; each run takes about as long as the pipeline on
five such slides.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import eval_cohort  # noqa: E402

ALL_ON = ["unmixing.refine_library=auto", "illumination=estimate", "unmixing.flag_poor_fit=true",
          "unmixing.poisson_weights=true"]
RUNS = {
    "all corrections": ALL_ON,
    "no library refinement": [*ALL_ON, "unmixing.refine_library=false"],
    "no shading correction": [*ALL_ON, "illumination=none"],
    "no residual masking": [*ALL_ON, "unmixing.flag_poor_fit=false"],
    "no Poisson weighting": [*ALL_ON, "unmixing.poisson_weights=false"],
    "none of them": ["unmixing.refine_library=false", "illumination=none", "unmixing.flag_poor_fit=false",
                     "unmixing.poisson_weights=false"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/ablation")
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--size", type=int, default=2048, help="slide edge, pixels (2048: 8 x 8 FOVs of 256 px)")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--table-only", action="store_true", help="only tabulate the runs already in --out")
    args = parser.parse_args()
    rows = []
    for name in args.runs:
        out = Path(args.out) / name.replace(" ", "_")
        cmd = [sys.executable, str(HERE / "eval_cohort.py"), "--cohort", "messy", "--size", str(args.size),
               "--out", str(out), "--set", *RUNS[name]]
        if args.only:
            cmd += ["--only", *args.only]
        if not args.table_only:
            print(f"== {name}: {' '.join(RUNS[name])}", flush=True)
            subprocess.run(cmd, check=True)
        t = pd.read_csv(out / "eval.csv", dtype={"her2_true": str, "her2_got": str})
        # per-cell classes of the whole cohort (a one-class slide, e.g. HER2-null, has no kappa of its own)
        slides = eval_cohort.messy_slides(args.size)
        pairs = [eval_cohort.matched_classes(out / s / "cells.csv", s, slides) for s in t["sample"]]
        truth, got = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
        rows.append({
            "run": name,
            "HER2 scores right": f"{int((t.her2_true == t.her2_got).sum())}/{len(t)}",
            "kappa (cohort)": eval_cohort.quadratic_kappa(truth, got),
            "agreement (cohort)": float(np.mean(truth == got)),
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
