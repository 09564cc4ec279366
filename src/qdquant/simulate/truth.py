"""Ground truth of a simulated slide: per-cell HER2 ring scores and sample-level scores."""

from __future__ import annotations

import numpy as np
import pandas as pd

from qdquant.quantification import membrane_sectors
from qdquant.scoring import her2_cell_scores, her2_sample_score, marker_sample_scores, receptor_status, surrogate_subtype
from qdquant.simulate.spectra import default_panel


#: Contract defaults of the HER2 rule (abundance units, pixels).
HER2_DEFAULTS: dict = {
    "t_faint": 20.0,
    "t_weak": 60.0,
    "t_strong": 150.0,
    "complete_fraction": 0.9,
    "sectors": 36,
    "membrane_width_px": 2,
    "ultralow_min_pct": 1.0,
}
#: Contract defaults of the surrogate-subtype section (passed to
#: :func:`qdquant.scoring.surrogate_subtype`).
SUBTYPE_DEFAULTS: dict = {"pr_cutoff_pct": 20.0, "ki67_cutoff_pct": 20.0}

# ----------------------------------------------------------------------------
# per-cell measurements: the contract's rules live in the core package
# (qdquant.segmentation, qdquant.quantification, qdquant.scoring); the
# simulator only calls them


def _centroids(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel count, row and column centroid of labels 0..n (NaN where empty)."""
    flat = labels.ravel()
    yy, xx = np.indices(labels.shape)
    count = np.bincount(flat, minlength=n + 1).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, weights=yy.ravel(), minlength=n + 1) / count
        cx = np.bincount(flat, weights=xx.ravel(), minlength=n + 1) / count
    return count, cy, cx


def _label_means(image: np.ndarray, labels: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Mean of ``image`` over each label's pixels inside ``mask`` (NaN where none); index = id."""
    ids = labels[mask]
    total = np.bincount(ids, weights=image[mask].astype(float), minlength=n + 1)
    count = np.bincount(ids, minlength=n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _her2_cells(her2: np.ndarray, cells: np.ndarray, n: int, cy: np.ndarray, cx: np.ndarray):
    """The contract's per-cell HER2 rule on the labels 1..n, as arrays indexed by id.

    Sector sums from :func:`qdquant.quantification.membrane_sectors` (around
    the centroids ``cy``, ``cx``), scored by
    :func:`qdquant.scoring.her2_cell_scores` with :data:`HER2_DEFAULTS`.

    Returns
    -------
    intensity, completeness : (n + 1,) float64
    her2_class : (n + 1,) object (str)
        Index 0 (background) and ids without pixels read 0, 0, "0".
    """
    ids = np.arange(1, n + 1)
    sums, npx = membrane_sectors(
        cells, np.asarray(her2), ids, np.column_stack([cy[ids], cx[ids]]),
        HER2_DEFAULTS["membrane_width_px"], sectors=HER2_DEFAULTS["sectors"],
    )
    inten, comp, cls = her2_cell_scores(sums, npx, **_rule_kw())
    return (
        np.concatenate([[0.0], inten]),
        np.concatenate([[0.0], comp]),
        np.concatenate([np.array(["0"], dtype=object), cls]),
    )


def her2_ring_scores(
    her2: np.ndarray,
    cells: np.ndarray,
    *,
    membrane_width_px: float = 2,
    sectors: int = 36,
    t_faint: float = 20.0,
    t_weak: float = 60.0,
    t_strong: float = 150.0,
    complete_fraction: float = 0.9,
) -> pd.DataFrame:
    """The contract's per-cell HER2 rule applied to an abundance map and cell labels.

    A thin wrapper: sector sums from
    :func:`qdquant.quantification.membrane_sectors` around each cell's
    centroid, scored by :func:`qdquant.scoring.her2_cell_scores`. Used to
    verify the simulator's truth (on the true abundance and the TRUE cells).

    Parameters
    ----------
    her2 : (Y, X) ndarray
        HER2 abundance (library units).
    cells : (Y, X) ndarray of int
        Cell labels, 0 = background.
    membrane_width_px, sectors, t_faint, t_weak, t_strong, complete_fraction
        The contract's ``segmentation.membrane_width_px`` (pixels) and ``her2``
        settings (abundance units; completeness as a fraction).

    Returns
    -------
    pandas.DataFrame
        One row per cell present: ``CellID``, ``her2_membrane_intensity``
        (abundance units), ``her2_completeness`` (0–1), ``her2_class``.
    """
    cells = np.asarray(cells).astype(np.int64)
    n = int(cells.max(initial=0))
    count, cy, cx = _centroids(cells, n)
    present = np.nonzero(count[1:] > 0)[0] + 1
    sums, npx = membrane_sectors(
        cells, np.asarray(her2, dtype=float), present, np.column_stack([cy[present], cx[present]]),
        membrane_width_px, sectors=sectors,
    )
    intensity, completeness, her2_class = her2_cell_scores(
        sums, npx, t_faint=t_faint, t_weak=t_weak, t_strong=t_strong,
        complete_fraction=complete_fraction,
    )
    return pd.DataFrame(
        {
            "CellID": present,
            "her2_membrane_intensity": intensity,
            "her2_completeness": completeness,
            "her2_class": her2_class,
        }
    )


# ----------------------------------------------------------------------------
# sample-level truth (the contract's rules applied to the designed classes)


#: cells_truth column holding each scored marker's designed bin (0..3; -1 not evaluable).
_MARKER_BIN_COLUMN = {"ER": "er_bin", "PR": "pr_bin", "Ki67": "ki67_bin", "mTOR": "mtor_bin"}


def sample_truth(cells_truth: pd.DataFrame, panel: pd.DataFrame | None = None) -> dict:
    """Sample-level scores from per-cell truth classes, by the contract's rules.

    Computed twice: over all cells (keys suffixed ``_all``) and over the
    tumour cells (``cell_type == "tumour"``, suffix ``_tumour``). The rules
    are those of :mod:`qdquant.scoring` (:func:`~qdquant.scoring.her2_sample_score`,
    :func:`~qdquant.scoring.marker_sample_scores`,
    :func:`~qdquant.scoring.receptor_status`,
    :func:`~qdquant.scoring.surrogate_subtype`), applied to the designed
    classes: a cell's designed bin b (0..3) is scored as the value b against
    thresholds 1, 2, 3, which puts it back in bin b.

    Parameters
    ----------
    cells_truth : pandas.DataFrame
        Needs ``cell_type``, ``her2_class`` and the bin columns ``er_bin``,
        ``pr_bin``, ``ki67_bin``, ``mtor_bin`` (0..3; a negative bin marks a
        cell that is not evaluable, left out of the denominators) of the
        panel's scored markers.
    panel : pandas.DataFrame, optional
        Default :func:`default_panel`.

    Returns
    -------
    dict
        ``n_cells``, ``n_tumour_cells``, ``n_stroma_cells``,
        ``n_immune_cells`` and, per scope: ``n_cells_{scope}``,
        ``her2_score``, ``her2_category``, ``her2_pct_0/1plus/2plus/3plus``
        (percent), ``{marker}_pct_positive`` and ``{marker}_status`` for every
        marker scored hscore/allred/percent_positive, ``{marker}_hscore``
        (0–300) or ``{marker}_allred`` (0–8) as scored, and
        ``surrogate_subtype``. A scope without cells gets the core's "not
        assessable" values (NaN percentages and scores, ``her2_score`` None).
    """
    panel = default_panel() if panel is None else panel
    out: dict = {
        "n_cells": int(len(cells_truth)),
        "n_tumour_cells": int((cells_truth["cell_type"] == "tumour").sum()),
        "n_stroma_cells": int((cells_truth["cell_type"] == "stroma").sum()),
        "n_immune_cells": int((cells_truth["cell_type"] == "immune").sum()),
    }
    scored = panel[panel["score"].isin(["hscore", "allred", "percent_positive"])]
    for scope in ("all", "tumour"):
        ct = cells_truth if scope == "all" else cells_truth[cells_truth["cell_type"] == "tumour"]
        res = {"n_cells": int(len(ct))}
        her2 = her2_sample_score(
            ct["her2_class"].to_numpy(object), ultralow_min_pct=HER2_DEFAULTS["ultralow_min_pct"]
        )
        for k in ("her2_score", "her2_category", "her2_pct_0", "her2_pct_1plus",
                  "her2_pct_2plus", "her2_pct_3plus"):
            res[k] = her2[k]
        pct_pos = {}
        for _, row in scored.iterrows():
            marker = row["marker"]
            col = _MARKER_BIN_COLUMN.get(marker)
            if col is None or col not in ct:
                continue
            bins = ct[col].to_numpy(float)
            bins[bins < 0] = np.nan  # not evaluable
            scores = marker_sample_scores(bins, score=row["score"], t1=1, t2=2, t3=3, marker=marker)
            pos = scores[f"{marker}_pct_positive"]
            pct_pos[marker] = pos
            res[f"{marker}_pct_positive"] = pos
            res[f"{marker}_status"] = receptor_status(pos)
            if row["score"] in ("hscore", "allred"):
                res[f"{marker}_{row['score']}"] = scores[f"{marker}_{row['score']}"]
        if "ER" in pct_pos and "PR" in pct_pos:
            res["surrogate_subtype"] = surrogate_subtype(
                res["her2_score"], pct_pos["ER"], pct_pos["PR"], pct_pos.get("Ki67"),
                **SUBTYPE_DEFAULTS,
            )
        out.update({f"{k}_{scope}": v for k, v in res.items()})
    return out


def _rule_kw() -> dict:
    return {k: HER2_DEFAULTS[k] for k in ("t_faint", "t_weak", "t_strong", "complete_fraction")}
