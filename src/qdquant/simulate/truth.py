"""Ground truth of a simulated slide: per-cell HER2 ring scores and sample-level scores."""

from __future__ import annotations

import numpy as np
import pandas as pd

from qdquant.simulate import reference
from qdquant.simulate.reference import contract_defaults, membrane_ring
from qdquant.simulate.spectra import default_panel

_CONTRACT = contract_defaults()
#: The contract's HER2 rule defaults (abundance units, pixels), from the config schema.
HER2_DEFAULTS: dict = {
    k: _CONTRACT[k]
    for k in ("t_faint", "t_weak", "t_strong", "complete_fraction", "sectors",
              "membrane_width_px", "ultralow_min_pct")
}
#: The contract's surrogate-subtype defaults, from the config schema.
SUBTYPE_DEFAULTS: dict = {k: _CONTRACT[k] for k in ("pr_cutoff_pct", "ki67_cutoff_pct")}

__all__ = ["HER2_DEFAULTS", "SUBTYPE_DEFAULTS", "her2_ring_scores", "membrane_ring", "sample_truth"]

# ----------------------------------------------------------------------------
# per-cell truth: the contract's rules as written in qdquant.simulate.reference,
# which shares no code with the pipeline


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


def _her2_geometry(cells: np.ndarray, n: int, cy: np.ndarray, cx: np.ndarray) -> list:
    """Ring pixels and sectors of the labels 1..n (see :func:`reference.ring_sectors`)."""
    ids = np.arange(1, n + 1)
    return reference.ring_sectors(
        cells, ids, np.column_stack([cy[ids], cx[ids]]),
        HER2_DEFAULTS["membrane_width_px"], HER2_DEFAULTS["sectors"],
    )


def _her2_cells(her2: np.ndarray, geometry: list, **rule):
    """The contract's per-cell HER2 rule on the labels 1..n, as arrays indexed by id.

    Parameters
    ----------
    her2 : (Y, X) ndarray
        HER2 abundance.
    geometry : list
        :func:`_her2_geometry` of the cells, one entry per id 1..n.
    **rule
        ``t_faint``, ``t_weak``, ``t_strong``, ``complete_fraction``;
        default :data:`HER2_DEFAULTS`.

    Returns
    -------
    intensity, completeness : (n + 1,) float64
    her2_class : (n + 1,) object (str)
        Index 0 (background) and ids without pixels read 0, 0, "0".
    """
    rule = {**_rule_kw(), **rule}
    sums, npx = reference.sector_sums(her2, geometry, HER2_DEFAULTS["sectors"])
    n = len(geometry)
    intensity, completeness = np.zeros(n + 1), np.zeros(n + 1)
    her2_class = np.full(n + 1, "0", dtype=object)
    for k in range(n):
        intensity[k + 1], completeness[k + 1], her2_class[k + 1] = reference.her2_cell(
            sums[k], npx[k], **rule
        )
    return intensity, completeness, her2_class


def her2_ring_scores(
    her2: np.ndarray,
    cells: np.ndarray,
    *,
    membrane_width_px: float | None = None,
    sectors: int | None = None,
    t_faint: float | None = None,
    t_weak: float | None = None,
    t_strong: float | None = None,
    complete_fraction: float | None = None,
) -> pd.DataFrame:
    """The contract's per-cell HER2 rule applied to an abundance map and cell labels.

    Computed by :mod:`qdquant.simulate.reference` (no pipeline code): the
    ring sectors around each cell's centroid, scored by the contract's table.

    Parameters
    ----------
    her2 : (Y, X) ndarray
        HER2 abundance (library units).
    cells : (Y, X) ndarray of int
        Cell labels, 0 = background.
    membrane_width_px, sectors, t_faint, t_weak, t_strong, complete_fraction
        The contract's ``segmentation.membrane_width_px`` (pixels) and ``her2``
        settings (abundance units; completeness as a fraction); None: the
        default (:data:`HER2_DEFAULTS`).

    Returns
    -------
    pandas.DataFrame
        One row per cell present: ``CellID``, ``her2_membrane_intensity``
        (abundance units), ``her2_completeness`` (0–1), ``her2_class``.
    """
    given = dict(membrane_width_px=membrane_width_px, sectors=sectors, t_faint=t_faint,
                 t_weak=t_weak, t_strong=t_strong, complete_fraction=complete_fraction)
    kw = {k: HER2_DEFAULTS[k] if v is None else v for k, v in given.items()}
    width, n_sectors = kw.pop("membrane_width_px"), kw.pop("sectors")
    cells = np.asarray(cells).astype(np.int64)
    n = int(cells.max(initial=0))
    count, cy, cx = _centroids(cells, n)
    present = np.nonzero(count[1:] > 0)[0] + 1
    geometry = reference.ring_sectors(
        cells, present, np.column_stack([cy[present], cx[present]]), width, n_sectors
    )
    sums, npx = reference.sector_sums(her2, geometry, n_sectors)
    rows = [reference.her2_cell(s_, c_, **kw) for s_, c_ in zip(sums, npx)]
    return pd.DataFrame(
        {
            "CellID": present,
            "her2_membrane_intensity": np.array([r[0] for r in rows], dtype=float),
            "her2_completeness": np.array([r[1] for r in rows], dtype=float),
            "her2_class": np.array([r[2] for r in rows], dtype=object),
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
    are the contract's, as written in :mod:`qdquant.simulate.reference`
    (:func:`~qdquant.simulate.reference.her2_sample`,
    :func:`~qdquant.simulate.reference.marker_sample`,
    :func:`~qdquant.simulate.reference.receptor_status`,
    :func:`~qdquant.simulate.reference.surrogate_subtype`), applied to the
    designed classes and bins.

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
        ``surrogate_subtype``. A scope without cells gets "not assessable"
        values (NaN percentages and scores, ``her2_score`` None).
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
        her2 = reference.her2_sample(
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
            scores = reference.marker_sample(ct[col].to_numpy(float), score=row["score"], marker=marker)
            pos = scores[f"{marker}_pct_positive"]
            pct_pos[marker] = pos
            res[f"{marker}_pct_positive"] = pos
            res[f"{marker}_status"] = reference.receptor_status(pos)
            if row["score"] in ("hscore", "allred"):
                res[f"{marker}_{row['score']}"] = scores[f"{marker}_{row['score']}"]
        if "ER" in pct_pos and "PR" in pct_pos:
            res["surrogate_subtype"] = reference.surrogate_subtype(
                res["her2_score"], pct_pos["ER"], pct_pos["PR"], pct_pos.get("Ki67"),
                **SUBTYPE_DEFAULTS,
            )
        out.update({f"{k}_{scope}": v for k, v in res.items()})
    return out


def _rule_kw() -> dict:
    return {k: HER2_DEFAULTS[k] for k in ("t_faint", "t_weak", "t_strong", "complete_fraction")}
