"""qdquant on slides from the INDEPENDENT generator (tests/independent), against its truth.

Four cohorts: library with / without an ``Offset`` column x clean / messy slides
(7 slides each: null x2, ultralow, 1+, 2+, strong-incomplete 2+, 3+). Each cohort is
generated on first use into ``test_data/independent/{cohort}_{size}_s{seed}/`` (git-
ignored) and the pipeline's steps (unmix, segment, quantify, score) run in-process
on it with the cohort's own config.yaml (the contract's example config).

Printed per slide: true / measured HER2 score and category (and the oracle's: the
contract rule on the noise-free blurred HER2 map with true labels), per-cell
agreement and quadratic kappa (cells matched by the true cell under the measured
centroid), also against the oracle's class, and the oracle's own kappa against the
generator's class (the ceiling of a pipeline that follows the contract), the
HER2-0 false-positive rate (true class-0 cells measured >= 1+, %), the mean HER2
membrane abundance bias over true-0 cells, and nuclei / cell F1 at IoU 0.5; then
per cohort and per phenomenon. Writes ``{out}/eval_independent.csv``.

    python benchmarks/eval_independent.py [--size 1024] [--seed 0] [--cohort clean_offset ...]
                                          [--only ind_3plus ...] [--out results/eval_independent]
                                          [--set KEY=YAML ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "independent"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import slides as independent  # noqa: E402
from eval_cohort import apply_settings, quadratic_kappa  # noqa: E402

from qdquant import io, pipeline  # noqa: E402
from qdquant.config import load_config  # noqa: E402
from qdquant.metrics import match_instances  # noqa: E402

COHORTS = {  # name -> (offset_column, messy)
    "clean_offset": (True, False),
    "clean_nooffset": (False, False),
    "messy_offset": (True, True),
    "messy_nooffset": (False, True),
}
RANK = {"0": 0, "1+": 1, "2+": 2, "3+": 3}


def cohort_dir(name: str, size: int, seed: int) -> Path:
    return ROOT / "test_data" / "independent" / f"{name}_{size}_s{seed}"


def ensure_cohort(name: str, size: int, seed: int, only) -> Path:
    """The cohort's folder, generated unless an identical one (same arguments, version) is there."""
    folder = cohort_dir(name, size, seed)
    offset_column, messy = COHORTS[name]
    wanted = list(independent.SLIDES) if not only else [n for n in independent.SLIDES if n in only]
    meta = folder / "cohort.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        same = (m.get("version") == independent.VERSION and m.get("size") == size and m.get("seed") == seed
                and m.get("messy") == messy and m.get("offset_column") == offset_column)
        if same and set(wanted) <= set(m.get("slides", [])) and all(
                (folder / f"{n}.ome.tif").exists() for n in wanted):
            return folder
    t0 = time.perf_counter()
    independent.make_cohort(folder, offset_column=offset_column, messy=messy, size=size, seed=seed,
                            only=None if not only else wanted)
    print(f"[{name}] generated {len(wanted)} slides of {size}^2 in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def evaluate_slide(cfg, sample_id: str, folder: Path, truth_row) -> dict:
    out = pipeline.outputs(cfg, sample_id)
    summary = pd.read_csv(out["summary"], dtype={"her2_score": str}, keep_default_na=False).iloc[0]
    truth_cells = pd.read_csv(folder / f"{sample_id}_truth_cells.csv",
                              dtype={"her2_class": str, "her2_class_oracle": str})
    true_nuc = tifffile.imread(folder / f"{sample_id}_truth_nuclei.tif")
    true_cells = tifffile.imread(folder / f"{sample_id}_truth_cells.tif")
    cells = pd.read_csv(out["cells"], dtype={"her2_class": str})
    y = cells["Y_centroid"].round().astype(int).clip(0, true_cells.shape[0] - 1)
    x = cells["X_centroid"].round().astype(int).clip(0, true_cells.shape[1] - 1)
    true_id = true_cells[y, x]
    hit = true_id > 0
    t = truth_cells.set_index("cell_id").loc[true_id[hit]]
    t_cls = t["her2_class"].to_numpy()
    o_cls = t["her2_class_oracle"].astype(str).to_numpy()
    m_cls = cells.loc[hit, "her2_class"].to_numpy()
    zero = t_cls == "0"
    m_rank = np.array([RANK[c] for c in m_cls]) if len(m_cls) else np.zeros(0)
    col = "HER2_membrane_mean" if "HER2_membrane_mean" in cells else "HER2"
    her2 = cells.loc[hit, col].to_numpy(float)
    nuclei = io.read_labels(out["zarr"], "nuclei").compute()
    seg_cells = io.read_labels(out["zarr"], "cells").compute()
    pct = {k: float(summary[f"her2_pct_{s}"]) for k, s in (("1+", "1plus"), ("2+", "2plus"), ("3+", "3plus"))}
    return {
        "her2_true": truth_row.her2_score, "her2_got": str(summary["her2_score"]),
        "her2_oracle": truth_row.her2_score_oracle,
        "cat_true": truth_row.her2_category, "cat_got": summary["her2_category"],
        "score_ok": truth_row.her2_score == str(summary["her2_score"]),
        "category_ok": truth_row.her2_category == summary["her2_category"],
        "pct_1p_true": truth_row.her2_pct_1plus, "pct_1p_got": pct["1+"],
        "pct_2p_true": truth_row.her2_pct_2plus, "pct_2p_got": pct["2+"],
        "pct_3p_true": truth_row.her2_pct_3plus, "pct_3p_got": pct["3+"],
        "n_true": int(truth_row.n_cells), "n_got": int(len(cells)), "matched": float(hit.mean()) if len(hit) else 0.0,
        "agreement": float(np.mean(t_cls == m_cls)) if len(t_cls) else np.nan,
        # kappa is undefined (0 by formula) when the truth has a single class (null slides)
        "kappa": quadratic_kappa(t_cls, m_cls) if len(set(t_cls)) > 1 else np.nan,
        # against the oracle's class (the contract's rule on the noise-free map, true labels): the
        # generator's class also counts the neighbours' membrane light the blur carries across a
        # shared border as absent, which no pipeline that follows the contract can see
        "kappa_oracle": quadratic_kappa(o_cls, m_cls) if len(set(o_cls)) > 1 else np.nan,
        "kappa_oracle_vs_truth": quadratic_kappa(t_cls, o_cls) if len(set(t_cls)) > 1 else np.nan,
        "fp0_pct": 100.0 * float(np.mean(m_rank[zero] >= 1)) if zero.any() else np.nan,
        # the same rate for the oracle (perfect unmixing + segmentation): membrane spill-over floor
        "fp0_oracle_pct": 100.0 * float(np.mean(truth_cells.loc[truth_cells.her2_class == "0", "her2_class_oracle"]
                                                .astype(str) != "0")),
        "bias0": float(np.nanmean(her2[zero] - t.loc[zero, "her2_level"].to_numpy())) if zero.any() else np.nan,
        "nuclei_f1": match_instances(true_nuc, nuclei, iou_threshold=0.5)["f1"],
        "cell_f1": match_instances(true_cells, seg_cells, iou_threshold=0.5)["f1"],
        "phenomena": truth_row.phenomena,
    }


def run_cohort(name: str, args) -> list[dict]:
    folder = ensure_cohort(name, args.size, args.seed, args.only)
    truth = pd.read_csv(folder / "truth_samples.csv", dtype={"her2_score": str, "her2_score_oracle": str},
                        keep_default_na=False).set_index("sample_id")
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    apply_settings(raw, args.set)
    out = Path(args.out).resolve() / name
    out.mkdir(parents=True, exist_ok=True)
    raw["results"] = str(out)
    names = [n for n in truth.index if not args.only or n in args.only]
    (out / "samples.tsv").write_text("sample_id\timage\n" + "".join(f"{n}\t{folder / n}.ome.tif\n" for n in names))
    raw["samples"] = str(out / "samples.tsv")
    (out / "config.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(out / "config.yaml", check_images=True)
    rows = []
    for n in names:
        t0 = time.perf_counter()
        row = {"cohort": name, "sample": n}
        try:
            for step in ("unmix", "segment", "quantify", "score"):
                pipeline.STEPS[step](cfg, n)
            row.update(evaluate_slide(cfg, n, folder, truth.loc[n].rename(n)))
        except Exception as exc:  # report, go on with the next slide
            row["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"[{name}] {n}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in row.items() if k not in ("cohort", "sample", "phenomena")),
              flush=True)
    return rows


def phenomenon_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per phenomenon: slides with / without it, mean of the key metrics."""
    ok = table.dropna(subset=["agreement"]) if "agreement" in table else table.iloc[0:0]
    tags = sorted({p for s in ok["phenomena"].fillna("") for p in s.split(";") if p})
    rows = []
    for tag in tags:
        has = ok["phenomena"].fillna("").str.split(";").apply(lambda v, tag=tag: tag in v)
        for label, part in (("with", ok[has]), ("without", ok[~has])):
            if len(part):
                rows.append({"phenomenon": tag, "slides": label, "n": len(part),
                             "score_ok": part.score_ok.mean(), "agreement": part.agreement.mean(), "kappa": part.kappa.mean(),
                             "fp0_pct": part.fp0_pct.mean(), "bias0": part.bias0.mean(),
                             "nuclei_f1": part.nuclei_f1.mean(), "cell_f1": part.cell_f1.mean()})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cohort", nargs="*", choices=list(COHORTS), default=list(COHORTS))
    parser.add_argument("--only", nargs="*", help="sample ids (ind_null_a, ind_3plus, ...)")
    parser.add_argument("--out", default="results/eval_independent")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML",
                        help="config overrides, e.g. illumination=estimate unmixing.refine_library=false")
    args = parser.parse_args()
    rows = []
    for name in args.cohort:
        rows += run_cohort(name, args)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "eval_independent.csv", index=False)
    fmt = {"float_format": lambda v: f"{v:.3f}"}
    cols = [c for c in ["cohort", "sample", "her2_true", "her2_got", "her2_oracle", "cat_true", "cat_got",
                        "agreement", "kappa", "kappa_oracle", "kappa_oracle_vs_truth", "fp0_pct", "fp0_oracle_pct",
                        "bias0", "nuclei_f1", "cell_f1", "n_true", "n_got", "seconds", "error"] if c in table]
    pd.set_option("display.width", 250)
    print("\nper slide\n" + table[cols].to_string(index=False, **fmt))
    if "agreement" in table:
        per = table.groupby("cohort", sort=False).agg(
            slides=("sample", "size"), score_ok=("score_ok", "sum"), category_ok=("category_ok", "sum"),
            agreement=("agreement", "mean"), kappa=("kappa", "mean"), min_kappa=("kappa", "min"),
            kappa_oracle=("kappa_oracle", "mean"), min_kappa_oracle=("kappa_oracle", "min"),
            oracle_vs_truth=("kappa_oracle_vs_truth", "mean"), fp0_pct=("fp0_pct", "mean"),
            fp0_oracle_pct=("fp0_oracle_pct", "mean"),
            bias0=("bias0", "mean"), nuclei_f1=("nuclei_f1", "mean"), cell_f1=("cell_f1", "mean"))
        print("\nper cohort\n" + per.to_string(**fmt))
        ph = phenomenon_table(table)
        if len(ph):
            print("\nper phenomenon (all evaluated slides)\n" + ph.to_string(index=False, **fmt))


if __name__ == "__main__":
    main()
