"""Instance-segmentation scores: match two label images object by object.

Both functions count one-to-one matches between a reference ("truth") and a
prediction and report precision, recall and F1, the usual figures of the
Data Science Bowl 2018, StarDist and Cellpose papers.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from qdquant.errors import InputError

__all__ = ["match_instances", "match_by_position", "overlap_table"]


def _as_labels(a, name):
    a = np.asarray(a)
    if a.dtype.kind not in "iub":
        raise InputError(f"{name} must be an integer label image, got dtype {a.dtype}")
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise InputError(f"{name} has negative labels (min {a.min()})")
    return a


def overlap_table(truth, pred):
    """Overlap of every (truth, pred) object pair that shares a pixel.

    Parameters
    ----------
    truth, pred : (M, N) ndarrays of int
        Label images of the same shape, 0 = background.

    Returns
    -------
    t_ids, p_ids : (K,) ndarrays of int64
        Ids of the overlapping pairs (both non-zero), sorted by (t_id, p_id).
    iou : (K,) ndarray of float64
        Intersection over union of each pair.
    t_labels, p_labels : ndarrays of int64
        All non-zero ids present in ``truth`` and in ``pred``.
    """
    truth = _as_labels(truth, "truth")
    pred = _as_labels(pred, "pred")
    if truth.shape != pred.shape:
        raise InputError(f"truth and pred shapes differ: {truth.shape} vs {pred.shape}")
    t = truth.ravel().astype(np.int64)
    p = pred.ravel().astype(np.int64)
    t_labels, t_area = np.unique(t[t > 0], return_counts=True)
    p_labels, p_area = np.unique(p[p > 0], return_counts=True)
    both = (t > 0) & (p > 0)
    # Pair key on compact indices so that any id range fits in int64.
    ti = np.searchsorted(t_labels, t[both])
    pi = np.searchsorted(p_labels, p[both])
    key, inter = np.unique(ti * max(len(p_labels), 1) + pi, return_counts=True)
    ti, pi = np.divmod(key, max(len(p_labels), 1))
    union = t_area[ti] + p_area[pi] - inter
    iou = inter / union
    return t_labels[ti], p_labels[pi], iou, t_labels, p_labels


def _one_to_one(rows, cols, score):
    """Indices into (rows, cols, score) of a maximum one-to-one matching.

    Maximises the number of matches first, then the summed score. Candidate
    pairs in which neither member competes are taken directly; only the
    contested remainder goes to the Hungarian solver.
    """
    if len(rows) == 0:
        return np.zeros(0, dtype=np.intp)
    _, r_inv, r_cnt = np.unique(rows, return_inverse=True, return_counts=True)
    _, c_inv, c_cnt = np.unique(cols, return_inverse=True, return_counts=True)
    free = (r_cnt[r_inv] == 1) & (c_cnt[c_inv] == 1)
    keep = [np.flatnonzero(free)]
    rest = np.flatnonzero(~free)
    if len(rest):
        ur, ri = np.unique(rows[rest], return_inverse=True)
        uc, ci = np.unique(cols[rest], return_inverse=True)
        weight = np.zeros((len(ur), len(uc)))
        # Count first (each match is worth more than all scores together).
        weight[ri, ci] = (len(rest) + 1.0) + score[rest]
        r_sel, c_sel = linear_sum_assignment(weight, maximize=True)
        chosen = weight[r_sel, c_sel] > 0
        lookup = np.full((len(ur), len(uc)), -1, dtype=np.intp)
        lookup[ri, ci] = rest
        keep.append(lookup[r_sel[chosen], c_sel[chosen]])
    return np.sort(np.concatenate(keep))


def _scores(n_true, n_pred, n_matched):
    precision = n_matched / n_pred if n_pred else (1.0 if n_true == 0 else 0.0)
    recall = n_matched / n_true if n_true else (1.0 if n_pred == 0 else 0.0)
    denom = n_true + n_pred
    f1 = 2.0 * n_matched / denom if denom else 1.0
    return float(precision), float(recall), float(f1)


def match_instances(truth, pred, *, iou_threshold: float = 0.5) -> dict:
    """One-to-one match of two label images by intersection over union.

    A true and a predicted object match when their IoU is >= ``iou_threshold``;
    among competing candidates (possible only below 0.5, or at exactly 0.5)
    the matching with the most pairs, then the largest summed IoU, wins.

    Parameters
    ----------
    truth, pred : (M, N) ndarrays of int
        Reference and predicted label images, 0 = background. Ids need not be
        consecutive.
    iou_threshold : float, optional
        Minimum IoU of a match, in (0, 1].

    Returns
    -------
    result : dict
        ``precision`` (matched / n_pred), ``recall`` (matched / n_true),
        ``f1``, ``n_true``, ``n_pred``, ``n_matched``, ``mean_iou`` (mean
        IoU of the matched pairs, NaN when none) and ``pairs``, a (K, 2)
        int64 array of matched (truth id, pred id), sorted by truth id.
        With no object in either image precision, recall and F1 are 1.

    Examples
    --------
    >>> t = np.array([[1, 1, 0, 2, 2]])
    >>> p = np.array([[3, 3, 0, 0, 4]])
    >>> r = match_instances(t, p)
    >>> r["n_matched"], r["pairs"].tolist()
    (2, [[1, 3], [2, 4]])
    """
    if not 0 < iou_threshold <= 1:
        raise InputError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    t_ids, p_ids, iou, t_labels, p_labels = overlap_table(truth, pred)
    cand = iou >= iou_threshold
    t_ids, p_ids, iou = t_ids[cand], p_ids[cand], iou[cand]
    sel = _one_to_one(t_ids, p_ids, iou)
    pairs = np.stack([t_ids[sel], p_ids[sel]], axis=1).astype(np.int64)
    n_true, n_pred, n_matched = len(t_labels), len(p_labels), len(sel)
    precision, recall, f1 = _scores(n_true, n_pred, n_matched)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "n_true": int(n_true),
        "n_pred": int(n_pred),
        "n_matched": int(n_matched),
        "mean_iou": float(iou[sel].mean()) if n_matched else float("nan"),
        "pairs": pairs,
    }


def match_by_position(truth_xy, pred_xy, *, max_distance: float) -> dict:
    """One-to-one match of two point sets (e.g. cell centroids) by distance.

    Pairs closer than ``max_distance`` are candidates; the matching with the
    most pairs, then the smallest summed distance, is taken.

    Parameters
    ----------
    truth_xy, pred_xy : (N, D) and (K, D) array_like of float
        Point coordinates, in any unit (the same for both and for
        ``max_distance``); an empty set may be given with shape (0,) too.
    max_distance : float
        Largest distance of a match, same unit as the coordinates.

    Returns
    -------
    result : dict
        ``precision``, ``recall``, ``f1``, ``n_true``, ``n_pred``,
        ``n_matched``, ``mean_distance`` and ``pairs`` ((K, 2) int64 array of
        matched (truth row, pred row) indices).
    """
    from scipy.spatial import cKDTree

    a = np.asarray(truth_xy, dtype=float)
    b = np.asarray(pred_xy, dtype=float)
    if a.size == 0:
        a = a.reshape(0, b.shape[1] if b.ndim == 2 else 2)
    if b.size == 0:
        b = b.reshape(0, a.shape[1])
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InputError(f"truth_xy and pred_xy must be (N, D) and (K, D), got {a.shape} and {b.shape}")
    if not max_distance > 0:
        raise InputError(f"max_distance must be > 0, got {max_distance}")
    rows = cols = np.zeros(0, dtype=np.intp)
    dist = np.zeros(0)
    if len(a) and len(b):
        sdm = cKDTree(a).sparse_distance_matrix(cKDTree(b), max_distance, output_type="ndarray")
        rows, cols, dist = sdm["i"].astype(np.intp), sdm["j"].astype(np.intp), sdm["v"]
    sel = _one_to_one(rows, cols, max_distance - dist)
    pairs = np.stack([rows[sel], cols[sel]], axis=1).astype(np.int64)
    precision, recall, f1 = _scores(len(a), len(b), len(sel))
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "n_true": len(a),
        "n_pred": len(b),
        "n_matched": len(sel),
        "mean_distance": float(dist[sel].mean()) if len(sel) else float("nan"),
        "pairs": pairs,
    }
