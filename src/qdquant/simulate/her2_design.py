"""HER2 design of a simulated slide: clustered classes, ring patterns and calibration."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from qdquant.simulate.rendering import _render_cells
from qdquant.simulate.tissue import _smooth_noise
from qdquant.simulate.reference import HER2_CLASSES
from qdquant.simulate.truth import _her2_cells, _her2_geometry, _label_means


#: Fractions of TUMOUR cells in HER2 classes (0, 1+, 2+, 3+) for each designed score.
HER2_MIX_PRESETS: dict[str, tuple[float, float, float, float]] = {
    "null": (1.0, 0.0, 0.0, 0.0),
    "0": (1.0, 0.0, 0.0, 0.0),
    "ultralow": (0.94, 0.06, 0.0, 0.0),
    "1+": (0.57, 0.37, 0.06, 0.0),
    "2+": (0.26, 0.40, 0.30, 0.04),
    "3+": (0.05, 0.20, 0.30, 0.45),
}

def _values_at(img: np.ndarray, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    y = np.clip(np.rint(np.nan_to_num(cy)).astype(int), 0, img.shape[0] - 1)
    x = np.clip(np.rint(np.nan_to_num(cx)).astype(int), 0, img.shape[1] - 1)
    return img[y, x]


def _neighbour_lists(pairs: np.ndarray, n: int):
    """CSR-like neighbour lists of labels 0..n from unordered pairs."""
    both = np.concatenate([pairs, pairs[:, ::-1]]) if len(pairs) else np.zeros((0, 2), np.int64)
    order = np.argsort(both[:, 0], kind="stable")
    both = both[order]
    start = np.searchsorted(both[:, 0], np.arange(n + 2))
    return both[:, 1], start


def _repair_level_jumps(cls, pairs, is_tumour, field_value, max_steps: int = 2000) -> None:
    """Swap HER2 classes so that touching tumour cells differ by at most one class.

    A 0 cell touching a 2+/3+ cell (or a 1+ touching a 3+) would read
    stained through the PSF blur of its neighbour's membrane. For each such
    contact, either the lower cell moves up one class while a cell of that
    class elsewhere moves down, or the upper cell moves down while one
    elsewhere moves up; a swap is kept only when it lowers the number of
    jumps, so the class counts never change and the loop ends.
    """
    if len(pairs) == 0:
        return
    n = len(cls) - 1
    tp = pairs[is_tumour[pairs[:, 0]] & is_tumour[pairs[:, 1]]]
    if len(tp) == 0:
        return
    nb, start = _neighbour_lists(tp, n)

    def jumps(c):
        return int((np.abs(c[tp[:, 0]].astype(int) - c[tp[:, 1]]) >= 2).sum())

    def local_ok(c, cell, new):
        ns = nb[start[cell] : start[cell + 1]]
        return bool(np.all(np.abs(c[ns].astype(int) - new) <= 1))

    total = jumps(cls)
    tried = set()
    for _ in range(max_steps):
        if total == 0:
            return
        viol = tp[np.abs(cls[tp[:, 0]].astype(int) - cls[tp[:, 1]]) >= 2]
        viol = [tuple(v) for v in viol if tuple(v) not in tried]
        if not viol:
            return
        a, b = viol[0]
        lo, hi = (a, b) if cls[a] < cls[b] else (b, a)
        improved = False
        for mover, step in ((lo, 1), (hi, -1)):
            old = int(cls[mover])
            new = old + step
            # partners: cells of class `new` that can take class `old` without a jump
            cand = np.nonzero((cls == new) & is_tumour)[0]
            cand = cand[cand != mover]
            if len(cand) == 0:
                continue
            # prefer partners far along the clustering field (deep in their class zone)
            cand = cand[np.argsort(field_value[cand] * (1 if step > 0 else -1), kind="stable")]
            for c in cand[:40]:
                if not local_ok(cls, c, old):
                    continue
                trial = cls.copy()
                trial[mover], trial[c] = new, old
                t = jumps(trial)
                if t < total:
                    cls[:] = trial
                    total = t
                    improved = True
                    break
            if improved:
                break
        if not improved:
            tried.add((a, b))


#: Designed HER2 stained-sector intensity of each class (abundance units; t_faint 20,
#: t_weak 60, t_strong 150): well inside each bin, or across it as on real slides.
HER2_LEVELS = {
    "separated": {"1+": (30.0, 42.0), "2+": (85.0, 115.0), "3+": (230.0, 300.0)},
    "continuous": {"1+": (23.0, 55.0), "2+": (66.0, 140.0), "3+": (165.0, 300.0)},
}


def _design_her2(
    rng, cls, pairs, is_tum, cells, ring_m, cy, cx, yy, xx, *, incomplete_fraction, psf_sigma_px,
    levels=None,
) -> dict:
    """Design and render the HER2 membrane of every cell from its class.

    Class 0 tumour cells get a faint ring (0–2.5 units, below t_faint), 1+ a
    ring measuring 30–42 (60 % complete, the rest 60–85 % of the ring), 2+
    either moderate and complete (85–115) or, for up to
    ``incomplete_fraction`` of them, strong (250–320) on 40–60 % of the ring,
    the missing arc facing away from bright neighbours (only 2+ cells whose
    tumour neighbours are all 2+/3+ qualify), 3+ strong and complete
    (230–300); ``levels`` (one of :data:`HER2_LEVELS`, default "separated",
    whose ranges these are) sets the 1+, moderate 2+ and 3+ ranges. The
    drawn amplitude of each cell is calibrated so that the
    contract's stained-sector intensity measured on the blurred image over
    the true cell lands on its target.

    Returns
    -------
    dict
        ``image`` (Y, X) float32 HER2 abundance; per-cell arrays (index = id)
        ``intensity``, ``completeness`` (designed values of the contract's
        measurements; 0 for class 0), ``pattern`` and ``ring_level`` (mean
        drawn HER2 over the ring, before blur).
    """
    n = len(cls) - 1
    shape = cells.shape
    target = np.zeros(n + 1)
    compl = np.zeros(n + 1)
    faint = np.zeros(n + 1)
    pattern = np.full(n + 1, "none", dtype=object)
    ids = np.arange(n + 1)
    i0 = ids[(cls == 0) & is_tum]
    faint[i0] = rng.uniform(0.0, 2.5, len(i0))
    pattern[i0] = "faint"
    i1 = ids[cls == 1]
    levels = levels or HER2_LEVELS["separated"]
    target[i1] = rng.uniform(*levels["1+"], len(i1))
    compl[i1] = np.where(rng.random(len(i1)) < 0.6, 1.0, rng.uniform(0.6, 0.85, len(i1)))
    i3 = ids[cls == 3]
    target[i3] = rng.uniform(*levels["3+"], len(i3))
    compl[i3] = 1.0
    i2 = ids[cls == 2]
    # strong-incomplete 2+: only cells whose tumour neighbours are all 2+/3+, preferring
    # those with most background around them (their missing arc can face it)
    low_nb = np.zeros(n + 1, int)
    np.add.at(low_nb, pairs[:, 0], (cls[pairs[:, 1]] <= 1) & is_tum[pairs[:, 1]])
    np.add.at(low_nb, pairs[:, 1], (cls[pairs[:, 0]] <= 1) & is_tum[pairs[:, 0]])
    d_bg = ndi.distance_transform_edt(cells > 0)
    bg_frac = _label_means((d_bg <= 3).astype(float), cells, ring_m, n)
    eligible = i2[low_nb[i2] == 0]
    n_inc = min(int(round(incomplete_fraction * len(i2))), len(eligible))
    order = eligible[np.lexsort((rng.random(len(eligible)), -np.nan_to_num(bg_frac[eligible])))]
    inc = np.zeros(n + 1, bool)
    inc[order[:n_inc]] = True
    mod = i2[~inc[i2]]
    target[mod] = rng.uniform(*levels["2+"], len(mod))
    compl[mod] = 1.0
    i2i = ids[inc]
    target[i2i] = rng.uniform(250.0, 320.0, len(i2i))
    compl[i2i] = rng.uniform(0.4, 0.6, len(i2i))
    pattern[cls >= 1] = np.where(compl[cls >= 1] >= 1.0, "complete", "incomplete")

    # the missing arc of each cell faces away from its HER2-bright neighbours
    wgt = target.copy()
    vy = np.zeros(n + 1)
    vx = np.zeros(n + 1)
    for s_, t_ in ((0, 1), (1, 0)):
        i, j = pairs[:, s_], pairs[:, t_]
        ddy, ddx = cy[j] - cy[i], cx[j] - cx[i]
        norm = np.maximum(np.hypot(ddy, ddx), 1e-9)
        np.add.at(vy, i, wgt[j] * ddy / norm)
        np.add.at(vx, i, wgt[j] * ddx / norm)
    rand_dir = rng.uniform(0, 2 * np.pi, n + 1)
    arc_dir = np.where(np.hypot(vy, vx) > 1e-6, np.arctan2(-vy, -vx), rand_dir)

    texture = np.clip(1.0 + 0.18 * _smooth_noise(rng, shape, 1.0), 0.5, 1.5)
    ring_ids = np.where(ring_m, cells, 0)
    ang = np.arctan2(yy - cy[cells], xx - cx[cells])
    in_gap = np.abs(np.angle(np.exp(1j * (ang - arc_dir[cells])))) < (1.0 - compl[cells]) * np.pi
    faint_img = ndi.gaussian_filter((faint[ring_ids] * texture * ring_m).astype(np.float32),
                                    psf_sigma_px)
    want = np.array(HER2_CLASSES, dtype=object)[cls]

    geometry = _her2_geometry(cells, n, cy, cx)

    def measure(img):
        return _her2_cells(img + faint_img, geometry)[0]

    # 1+ cells keep enough of their own ring stained (>= ~25 after blur)
    amp_min = np.where(cls == 1, 25.0 / 0.75, 0.0)
    rounds = 4
    for round_ in range(rounds):
        pattern_px = np.where(ring_m & ~((compl[cells] < 1.0) & in_gap), texture, 0.0)
        img, amp = _render_cells(target, ring_ids, pattern_px, measure, psf_sigma_px,
                                 iterations=4, amp_min=amp_min)
        img = img + faint_img
        meas = _her2_cells(img, geometry)[2]
        bad = inc & (meas != want)
        if not bad.any() or round_ == rounds - 1:
            break
        # a strong-incomplete 2+ that does not read 2+ becomes a moderate complete 2+
        inc[bad] = False
        target[bad] = rng.uniform(*levels["2+"], bad.sum())
        compl[bad] = 1.0
        pattern[bad] = "complete"
    drawn = np.where(ring_m, amp[cells] * pattern_px + faint[cells] * texture, 0.0)
    ring_level = _label_means(drawn, cells, ring_m, n)
    return {
        "image": img.astype(np.float32),
        "intensity": np.where(cls >= 1, target, 0.0),
        "completeness": np.where(cls >= 1, compl, 0.0),
        "pattern": pattern,
        "ring_level": ring_level,
    }
