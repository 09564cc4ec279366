"""Calibration of the HER2 thresholds on control slides of known score.

A fitted threshold triple is judged by the very rules used to score a slide
(:mod:`qdquant.scoring.her2`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from qdquant.errors import InputError
from qdquant.scoring._common import (
    HER2_CLASSES, ULTRALOW_MIN_PCT, _complete_fraction, _percent, _sector_arrays, _ultralow_min_pct,
)
from qdquant.scoring.her2 import (
    _her2_class_codes, _her2_sample_code, _membrane_features, _sector_means, _stained_sectors, her2_cell_scores,
    her2_sample_score,
)


def _control_tables(controls):
    """Validate controls; return [(sums, npx, means, known_code)]."""
    try:
        items = list(controls)
    except TypeError:
        raise InputError("controls must be a list of (sector_sum, sector_npx, known_score)") from None
    if not items:
        raise InputError("calibration needs at least one control slide")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise InputError(f"control {i}: expected (sector_sum, sector_npx, known_score)")
        sector_sum, sector_npx, known = item
        if known not in HER2_CLASSES:
            raise InputError(
                f"control {i}: unknown HER2 score {known!r}; expected one of {', '.join(HER2_CLASSES)}"
            )
        sums, npx = _sector_arrays(sector_sum, sector_npx, name=f"control {i} sector_sum")
        if sums.shape[0] == 0:
            raise InputError(f"control {i} (score {known}) has no cells")
        out.append((sums, npx, _sector_means(sums, npx), HER2_CLASSES.index(known)))
    missing = [c for k, c in enumerate(HER2_CLASSES) if k not in {t[3] for t in out}]
    if missing:
        raise InputError(
            "calibration needs control slides of every HER2 score (0, 1+, 2+, 3+) so that each "
            f"threshold is bounded from both sides; missing {', '.join(missing)}"
        )
    return out


def _feasible(tables, complete_fraction, gf, gw, gs, *, cell_chunk=4096):
    """Boolean (len(gf), len(gw), len(gs)): the triples scoring every control as known.

    Per t_faint the cells' stained sectors, completeness and intensity come
    from :func:`_stained_sectors` / :func:`_membrane_features`. Then, by the
    table in :func:`_her2_class_codes`, "class >= 2+" depends on t_weak only
    (as t_strong >= t_weak) and "class 3+" on t_strong only (as t_weak <=
    t_strong), so both are counted on their own axis by broadcasting the
    class rule over the grid, and the sample rule
    :func:`_her2_sample_code` is broadcast over the (t_weak, t_strong) plane.
    """
    ok = np.ones((gf.size, gw.size, gs.size), dtype=bool)
    # the contract needs t_faint < t_weak < t_strong
    ok &= gf[:, None, None] < gw[None, :, None]
    ok &= gw[None, :, None] < gs[None, None, :]
    for sums, npx, means, known in tables:
        n = sums.shape[0]
        for i, tf in enumerate(gf):
            if not ok[i].any():
                continue
            stained = _stained_sectors(means, tf)
            completeness, intensity, any_st = _membrane_features(sums, npx, stained)
            complete = completeness >= complete_fraction
            n_ge1 = int(any_st.sum())
            n_ge2 = np.zeros(gw.size, np.int64)
            n_3 = np.zeros(gs.size, np.int64)
            # only cells with a stained sector can reach 2+ / 3+
            idx = np.flatnonzero(any_st)
            for start in range(0, idx.size, cell_chunk):
                j = idx[start : start + cell_chunk]
                a, inten, comp = any_st[j], intensity[j], complete[j]
                n_ge2 += (
                    _her2_class_codes(a, inten, comp, gw[:, None], np.inf) >= 2
                ).sum(axis=1)
                n_3 += (
                    _her2_class_codes(a, inten, comp, gs[:, None], gs[:, None]) == 3
                ).sum(axis=1)
            code = _her2_sample_code(
                _percent(n_ge1, n),
                _percent(n_ge2, n)[:, None],
                _percent(n_3, n)[None, :],
            )
            ok[i] &= code == known
    return ok


def _most_robust(ok, axes):
    """Grid point deepest inside the feasible set (Euclidean, in log space).

    The region outside the grid counts as infeasible. Ties are broken by
    the point nearest to the centroid of the tied points.
    """
    steps = [float(np.diff(np.log(a)).mean()) if a.size > 1 else 1.0 for a in axes]
    padded = np.pad(ok, 1, constant_values=False)
    depth = ndi.distance_transform_edt(padded, sampling=steps)[1:-1, 1:-1, 1:-1]
    best = depth.max()
    tied = np.argwhere(depth >= best * (1 - 1e-9))
    centre = tied.mean(axis=0)
    pick = tied[np.argmin((((tied - centre) * steps) ** 2).sum(axis=1))]
    return tuple(int(k) for k in pick), best


def calibrate_her2_thresholds(
    controls, *, complete_fraction, ultralow_min_pct=ULTRALOW_MIN_PCT, grid_size=64
) -> dict:
    """Fit ``t_faint < t_weak < t_strong`` to control slides of known HER2 score.

    Parameters
    ----------
    controls : sequence of (sector_sum, sector_npx, known_score)
        One tuple per control slide: the (n_cells, S) sector arrays of
        :func:`her2_cell_scores` and the slide's known score (``'0'``,
        ``'1+'``, ``'2+'`` or ``'3+'``). Every score must be present at least
        once: each threshold is only bounded from both sides by a pair of
        neighbouring scores (t_faint by 0 and 1+, t_weak by 1+ and 2+,
        t_strong by 2+ and 3+).
    complete_fraction : float
        As in :func:`her2_cell_scores` (not fitted).
    ultralow_min_pct : float, optional
        Validated and passed to :func:`her2_sample_score`; controls are
        matched on their score, which does not depend on it.
    grid_size : int, optional
        Grid points per threshold axis in each of the two search passes.

    Returns
    -------
    dict
        ``t_faint``, ``t_weak``, ``t_strong`` (floats).

    Raises
    ------
    InputError
        Bad controls, a missing score, or no threshold triple that scores
        every control as known.

    Notes
    -----
    The search runs over a log-spaced grid of threshold triples spanning
    the controls' positive sector means (thresholds outside that span
    behave like its ends). A triple is feasible when every control scores
    as known by the contract's rules (:func:`her2_cell_scores` then
    :func:`her2_sample_score`). The most robust feasible triple is the one
    farthest (Euclidean distance in log-threshold space) from any
    infeasible one: the centre of the largest ball inside the feasible
    region, i.e. the widest safety margin on every threshold at once. A
    second pass repeats the search on a finer grid over the bounding box of
    the feasible component found first. The result is checked by scoring
    every control with the public functions.
    """
    complete_fraction = _complete_fraction(complete_fraction)
    ultralow_min_pct = _ultralow_min_pct(ultralow_min_pct)
    if isinstance(grid_size, (bool, np.bool_)) or not isinstance(grid_size, (int, np.integer)) or grid_size < 8:
        raise InputError(f"grid_size must be an integer >= 8, got {grid_size!r}")
    tables = _control_tables(controls)

    finite = np.concatenate([m[np.isfinite(m)] for _, _, m, _ in tables])
    positive = finite[finite > 0]
    if positive.size == 0:
        raise InputError("calibration: no control has a sector with positive HER2 abundance")
    hi = positive.max() * 1.05
    lo = max(positive.min(), hi * 1e-5) / 1.05

    # pass 1: the whole span, one common log grid for the three thresholds
    grid = np.geomspace(lo, hi, grid_size)
    ok = _feasible(tables, complete_fraction, grid, grid, grid)
    if not ok.any():
        raise InputError(
            "calibration: no thresholds t_faint < t_weak < t_strong score every control slide "
            "as its known HER2 score"
        )
    pick, _ = _most_robust(ok, (grid, grid, grid))

    # pass 2: finer grid over the feasible component holding that point
    labels, _ = ndi.label(ok, structure=np.ones((3, 3, 3), bool))
    comp = np.argwhere(labels == labels[pick])
    first = np.maximum(comp.min(axis=0) - 1, 0)
    last = np.minimum(comp.max(axis=0) + 1, grid_size - 1)
    axes = tuple(np.geomspace(grid[a], grid[b], grid_size) for a, b in zip(first, last))
    ok2 = _feasible(tables, complete_fraction, *axes)
    if ok2.any():
        pick2, _ = _most_robust(ok2, axes)
        fitted = tuple(float(ax[k]) for ax, k in zip(axes, pick2))
    else:  # cannot happen (the box holds pass-1 feasible points); be safe
        fitted = tuple(float(grid[k]) for k in pick)

    result = dict(zip(("t_faint", "t_weak", "t_strong"), fitted))
    for i, (sums, npx, _, known) in enumerate(tables):
        _, _, classes = her2_cell_scores(sums, npx, complete_fraction=complete_fraction, **result)
        got = her2_sample_score(classes, ultralow_min_pct=ultralow_min_pct)["her2_score"]
        if got != HER2_CLASSES[known]:  # pragma: no cover - guards the search itself
            raise InputError(
                f"calibration: fitted thresholds score control {i} as {got}, not {HER2_CLASSES[known]}"
            )
    return result
