"""Accuracy of the whole pipeline on the simulated test cohort, against its truth.

Runs every step (in-process, the same functions the workflow runs) on each
slide of ``qdquant.simulate.test_cohort()`` and prints, per slide: the true and
measured HER2 score, per-cell HER2 class agreement and quadratic weighted
kappa (cells matched by the true cell under the measured centroid), and
nuclei / cell F1 at IoU 0.5.

    python benchmarks/eval_cohort.py [--out results/eval] [--config config/config.yaml] [--only her2_3plus]
                                     [--cohort test|messy] [--set KEY=YAML ...]

``--cohort messy``: :func:`qdquant.simulate.messy_cohort` (five slides, null
to 3+, each with all four real-slide phenomena; ``--size`` pixels square,
default 512), simulated into ``test_data/messy_slides/`` (``_{size}``
appended for other sizes) on first use. The per-slide table is also
written to ``{out}/eval.csv``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import yaml

from qdquant import io, pipeline, simulate
from qdquant.config import load_config
from qdquant.metrics import match_instances

CLASSES = ["0", "1+", "2+", "3+"]


def apply_settings(raw: dict, items) -> None:
    """Set each ``KEY=YAML`` of ``items`` (dotted keys: ``her2.t_faint=25``) in the config mapping ``raw``."""
    for item in items:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)


def quadratic_kappa(truth, pred) -> float:
    t = np.searchsorted(CLASSES, truth)
    p = np.searchsorted(CLASSES, pred)
    observed = np.zeros((4, 4))
    np.add.at(observed, (t, p), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / max(observed.sum(), 1)
    weights = (np.subtract.outer(np.arange(4), np.arange(4)) ** 2) / 9
    denom = (weights * expected).sum()
    return 1.0 - (weights * observed).sum() / denom if denom else 1.0


def matched_classes(cells_csv: Path, sample_id: str, slides: Path, labels=None):
    """True and measured HER2 class of every measured cell whose centroid lies in a true cell.

    ``labels``: the slide's true (nuclei, cells) labels, when already read.
    Returns the two class arrays and the fraction of measured cells matched.
    """
    truth_cells = pd.read_csv(slides / f"{sample_id}_truth_cells.csv", dtype={"her2_class": str})
    if labels is None:
        labels = tifffile.imread(slides / f"{sample_id}_truth_labels.tif")
    cells = pd.read_csv(cells_csv, dtype={"her2_class": str})
    y = cells["Y_centroid"].round().astype(int)
    x = cells["X_centroid"].round().astype(int)
    true_id = labels[1][y, x]
    matched = true_id > 0
    true_class = truth_cells.set_index("CellID").loc[true_id[matched], "her2_class"].to_numpy()
    return true_class, cells.loc[matched, "her2_class"].to_numpy(), float(matched.mean())


def evaluate(cfg, sample_id: str, slides: Path) -> dict:
    truth = json.loads((slides / f"{sample_id}_truth.json").read_text())
    labels = tifffile.imread(slides / f"{sample_id}_truth_labels.tif")
    out = pipeline.outputs(cfg, sample_id)
    summary = pd.read_csv(out["summary"], dtype={"her2_score": str}).iloc[0]
    true_class, got_class, matched = matched_classes(out["cells"], sample_id, slides, labels)
    nuclei = io.read_labels(out["zarr"], "nuclei").compute()
    seg_cells = io.read_labels(out["zarr"], "cells").compute()
    return {
        "sample": sample_id,
        "her2_true": truth["her2_score_all"],
        "her2_got": summary["her2_score"],
        "agreement": float(np.mean(true_class == got_class)),
        "kappa": quadratic_kappa(true_class, got_class),
        "matched": matched,
        "nuclei_f1": match_instances(labels[0], nuclei, iou_threshold=0.5)["f1"],
        "cell_f1": match_instances(labels[1], seg_cells, iou_threshold=0.5)["f1"],
    }


def _cached(slides: Path, name: str, kwargs: dict) -> bool:
    """Whether ``slides`` holds slide ``name`` simulated with these arguments (else it is simulated again)."""
    truth = slides / f"{name}_truth.json"
    if not (slides / f"{name}.ome.tif").exists() or not truth.exists():
        return False
    stored = json.loads(truth.read_text()).get("params", {})
    wanted = json.loads(json.dumps(simulate._jsonable(kwargs)))
    return all(stored.get(k) == v for k, v in wanted.items())


def messy_slides(size: int) -> Path:
    """Where the messy cohort of ``size``² slides is simulated to."""
    return Path("test_data/messy_slides" + ("" if size == 512 else f"_{size}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/eval")
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--cohort", choices=["test", "messy"], default="test",
                        help="the bundled test cohort, or the messy one (all four real-slide phenomena)")
    parser.add_argument("--slides", default=None, help="folder of the simulated slides (default per cohort)")
    parser.add_argument("--size", type=int, default=512, help="messy cohort: slide edge, pixels")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML",
                        help="config overrides, e.g. illumination=estimate unmixing.refine_library=false")
    args = parser.parse_args()
    out = Path(args.out)
    cohort = simulate.test_cohort() if args.cohort == "test" else simulate.messy_cohort(args.size)
    slides = Path(args.slides or ("test_data/slides" if args.cohort == "test" else messy_slides(args.size)))
    names = args.only or list(cohort)
    for name in names:
        if not _cached(slides, name, cohort[name]):
            simulate.write_slide(simulate.simulate_slide(**cohort[name]), slides, name)
    raw = yaml.safe_load(Path(args.config).read_text())
    apply_settings(raw, args.set)
    raw["results"] = str(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples.tsv").write_text(
        "sample_id\timage\n" + "".join(f"{n}\t{slides / n}.ome.tif\n" for n in names)
    )
    raw["samples"] = str(out / "samples.tsv")
    (out / "config.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(out / "config.yaml", check_images=True)
    rows = []
    for name in names:
        t0 = time.perf_counter()
        for step in ("unmix", "segment", "quantify", "score"):
            pipeline.STEPS[step](cfg, name)
        rows.append({**evaluate(cfg, name, slides), "seconds": time.perf_counter() - t0})
    table = pd.DataFrame(rows)
    table.to_csv(out / "eval.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"all HER2 scores right: {bool((table.her2_true == table.her2_got).all())}; "
          f"min agreement {table.agreement.min():.3f}; min kappa {table.kappa.min():.3f}; "
          f"min nuclei F1 {table.nuclei_f1.min():.3f}; min cell F1 {table.cell_f1.min():.3f}")


if __name__ == "__main__":
    main()
