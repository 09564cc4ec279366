"""Tissue geometry: smooth fields, Poisson-disc packing, nuclei, cells and cell types."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from qdquant.errors import InputError
from qdquant.simulate.spectra import ENDMEMBERS, _IDX

# ----------------------------------------------------------------------------
# geometry helpers


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, zero mean and unit standard deviation (float32).

    Wide filters (sigma >= 8 px) are computed on a coarser grid and
    interpolated back (the field is smooth there anyway), which is much
    faster.
    """
    factor = int(sigma // 4) if sigma >= 8 else 1
    if factor > 1:
        small = tuple(-(-s // factor) + 2 for s in shape)
        f = ndi.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma / factor)
        f = ndi.zoom(f, factor, order=1)[: shape[0], : shape[1]]
    else:
        f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (f - f.mean()) / max(float(f.std()), 1e-12)


def _abundance_stack(shape, offset_counts: float, **maps: np.ndarray) -> np.ndarray:
    """(K, Y, X) float32 abundances in ENDMEMBERS order: the given maps (>= 0), 0 elsewhere, the offset flat."""
    abund = np.zeros((len(ENDMEMBERS),) + tuple(shape), np.float32)
    for name, image in maps.items():
        abund[_IDX[name]] = image
    abund[_IDX["Offset"]] = offset_counts
    return np.maximum(abund, 0.0, out=abund)


def _autofluorescence(rng: np.random.Generator, stroma: np.ndarray, px_per_um: float) -> np.ndarray:
    """Tissue autofluorescence abundance: smooth, ~10-40 units, stronger in stroma."""
    stroma_w = ndi.gaussian_filter(stroma.astype(np.float32), 6 * px_per_um)
    n01 = 1.0 / (1.0 + np.exp(-_smooth_noise(rng, stroma.shape, 10 * px_per_um)))
    return (10.0 + 24.0 * stroma_w * (0.6 + 0.4 * n01) + 6.0 * n01).astype(np.float32)


def _poisson_disc(rng: np.random.Generator, points: np.ndarray, radius: float) -> np.ndarray:
    """A maximal subset of ``points`` no two closer than ``radius`` (Luby's parallel MIS).

    Points win by random priority, so the result is a random packing
    (deterministic given ``rng``), vectorised over rounds.
    """
    n = len(points)
    if n == 0:
        return points
    pairs = cKDTree(points).query_pairs(radius, output_type="ndarray")
    prio = rng.random(n)
    state = np.zeros(n, dtype=np.int8)  # 0 undecided, 1 kept, -1 dropped
    while (state == 0).any():
        und = state == 0
        p = pairs[und[pairs[:, 0]] & und[pairs[:, 1]]]
        best = np.full(n, -1.0)
        np.maximum.at(best, p[:, 0], prio[p[:, 1]])
        np.maximum.at(best, p[:, 1], prio[p[:, 0]])
        win = und & (prio > best)
        state[win] = 1
        state[np.concatenate([p[win[p[:, 0]], 1], p[win[p[:, 1]], 0]])] = -1
    return points[state == 1]


def _candidates(rng, mask: np.ndarray, pitch: float) -> np.ndarray:
    """Jittered-grid sub-pixel positions (y, x) inside a boolean mask, one per ``pitch``² cell."""
    pitch = max(float(pitch), 1.0)
    gy = np.arange(0.0, mask.shape[0], pitch)
    gx = np.arange(0.0, mask.shape[1], pitch)
    pts = np.stack(np.meshgrid(gy, gx, indexing="ij"), axis=-1).reshape(-1, 2)
    pts = pts + rng.uniform(0.0, pitch, pts.shape)
    pts = pts[(pts[:, 0] <= mask.shape[0] - 1) & (pts[:, 1] <= mask.shape[1] - 1)]
    keep = mask[np.rint(pts[:, 0]).astype(int), np.rint(pts[:, 1]).astype(int)]
    return pts[keep]


def _pairs_within(labels: np.ndarray, radius: float) -> np.ndarray:
    """Unique unordered pairs (i < j) of different nonzero labels within ``radius`` pixels."""
    r = int(np.ceil(radius))
    m, n = labels.shape
    codes = []
    for dy in range(0, r + 1):
        for dx in range(-r, r + 1):
            if (dy == 0 and dx <= 0) or dy * dy + dx * dx > radius * radius:
                continue
            a = labels[0 : m - dy, max(0, -dx) : n - max(0, dx)]
            b = labels[dy:m, max(0, dx) : n - max(0, -dx)]
            sel = (a > 0) & (b > 0) & (a != b)
            lo = np.minimum(a[sel], b[sel]).astype(np.int64)
            hi = np.maximum(a[sel], b[sel]).astype(np.int64)
            codes.append(lo * (1 << 32) + hi)
    if not codes:
        return np.zeros((0, 2), dtype=np.int64)
    u = np.unique(np.concatenate(codes))
    return np.column_stack([u >> 32, u & ((1 << 32) - 1)])


def _exact_counts(fractions, n: int) -> np.ndarray:
    """Integer counts summing to ``n`` closest to ``fractions * n`` (largest remainder)."""
    f = np.asarray(fractions, dtype=float)
    f = f / f.sum()
    raw = f * n
    counts = np.floor(raw).astype(int)
    rest = n - counts.sum()
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


def _shading_map(shape, amount: float, fov_px: int) -> np.ndarray:
    """Per-field-of-view vignetting: 1 at each FOV centre, 1 - amount at its corners."""
    yy, xx = np.indices(shape, dtype=np.float32)
    c = (fov_px - 1) / 2.0
    r2 = ((yy % fov_px - c) ** 2 + (xx % fov_px - c) ** 2) / (2 * c * c)
    return (1.0 - amount * r2).astype(np.float32)



def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise InputError(msg)


def _build_tissue(rng, shape, um, *, crowded, nest_fraction, stroma_fraction, immune_fraction):
    """Nests, nuclei and cells of a synthetic breast carcinoma field.

    Returns
    -------
    nuclei, cells : (Y, X) int32
        Labels 1..n (a cell and its nucleus share the id).
    ctype : (n,) int8
        0 tumour, 1 stroma (fibroblast), 2 immune, for ids 1..n.
    nest : (Y, X) bool
        Tumour nests.
    inner : (Y, X) bool
        The image minus an 11 µm frame.
    """
    yy, xx = np.indices(shape)
    field_big = _smooth_noise(rng, shape, 12 * um)
    field_small = _smooth_noise(rng, shape, 3 * um)
    nest_field = field_big + 0.25 * field_small
    nest = nest_field > np.quantile(nest_field, 1 - nest_fraction)
    nest = ndi.binary_opening(nest, iterations=2)
    d_in = ndi.distance_transform_edt(nest)
    d_out = ndi.distance_transform_edt(~nest)
    margin = 11 * um
    inner = np.zeros(shape, bool)
    inner[int(margin) : shape[0] - int(margin), int(margin) : shape[1] - int(margin)] = True

    spacing = (7.2 if crowded else 10.0) * um
    t_pts = _poisson_disc(rng, _candidates(rng, nest & inner & (d_in >= 1.5 * um), spacing / 4),
                          spacing)
    n_t = len(t_pts)
    n_s = int(round(n_t * stroma_fraction / (1 - stroma_fraction)))
    s_region = (~nest) & inner & (d_out >= 8 * um)
    s_pts = _poisson_disc(rng, _candidates(rng, s_region, 13 * um / 3), 13 * um)
    s_pts = s_pts[rng.permutation(len(s_pts))[:n_s]]
    n_i = int(round(len(s_pts) * immune_fraction))
    pts = np.concatenate([t_pts, s_pts]) if len(s_pts) else t_pts
    ctype = np.array([0] * n_t + [2] * n_i + [1] * (len(s_pts) - n_i), dtype=np.int8)  # 0 t, 1 s, 2 i
    # one centre per pixel (matters only for very coarse pixels)
    _, first = np.unique(np.rint(pts).astype(np.int64) @ np.array([shape[1], 1]), return_index=True)
    first = np.sort(first)
    pts, ctype = pts[first], ctype[first]
    n0 = len(pts)

    # nucleus ellipses (semi-axes in pixels, orientation in radians)
    r_eq = np.where(ctype == 0, np.clip(rng.normal(4.0, 0.45, n0), 3.2, 5.0),
                    rng.uniform(2.6, 3.2, n0)) * um
    q = np.where(ctype == 0, rng.uniform(0.72, 0.95, n0), rng.uniform(0.85, 1.0, n0))
    a = r_eq / np.sqrt(q)
    b = r_eq * np.sqrt(q)
    fib = ctype == 1
    a[fib] = rng.uniform(5.0, 7.0, fib.sum()) * um
    b[fib] = rng.uniform(1.4, 2.0, fib.sum()) * um
    theta = rng.uniform(0, np.pi, n0)
    gy, gx = np.gradient(ndi.gaussian_filter(nest_field, 4 * um))
    py, px = np.clip(np.rint(pts[:, 0]).astype(int), 0, shape[0] - 1), np.clip(
        np.rint(pts[:, 1]).astype(int), 0, shape[1] - 1)
    tangent = np.arctan2(gy[py, px], gx[py, px]) + np.pi / 2
    theta[fib] = tangent[fib] + rng.normal(0, 0.25, fib.sum())
    max_exp = np.select(
        [ctype == 0, ctype == 1],
        [rng.uniform(1.0, 2.0, n0) if crowded else rng.uniform(3.5, 5.0, n0),
         rng.uniform(1.0, 1.5, n0)],
        rng.uniform(0.5, 1.0, n0),
    ) * um

    # rasterise nuclei: Voronoi of the centres, inside each (noisy-edged) ellipse
    seeds = np.zeros(shape, np.int32)
    seeds[py, px] = np.arange(1, n0 + 1)
    _, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    near = seeds[iy, ix] - 1
    dy, dx = yy - pts[near, 0], xx - pts[near, 1]
    ct, st = np.cos(theta[near]), np.sin(theta[near])
    u = (dx * ct + dy * st) / a[near]
    v = (-dx * st + dy * ct) / b[near]
    rough = 1.0 + 0.07 * _smooth_noise(rng, shape, 1.5)
    nuclei = np.where(u * u + v * v <= rough * rough, near + 1, 0).astype(np.int32)

    # grow cells from their nucleus, limited per cell
    ext = np.concatenate([[0.0], max_exp])
    is_t = np.concatenate([[False], ctype == 0])
    dist, (iy, ix) = ndi.distance_transform_edt(nuclei == 0, return_indices=True)
    grown = nuclei[iy, ix]
    cells = np.where(dist <= ext[grown], grown, 0).astype(np.int32)
    outside_nest = (d_out > 1.5 * um) & (nuclei == 0)
    cells[is_t[cells] & outside_nest] = 0
    d_tum = ndi.distance_transform_edt(~is_t[cells])
    cells[(cells > 0) & ~is_t[cells] & (d_tum <= 1.5 * um) & (nuclei == 0)] = 0

    # keep cells away from the image border and with a real nucleus; relabel 1..n
    border = np.unique(np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]]))
    nuc_area = np.bincount(nuclei.ravel(), minlength=n0 + 1)
    keep = nuc_area >= np.where(is_t, 20 * um * um / 4, 8 * um * um / 4)
    keep[border] = False
    keep[0] = False
    new_id = np.zeros(n0 + 1, np.int32)
    new_id[keep] = np.arange(1, keep.sum() + 1)
    cells = new_id[cells]
    nuclei = new_id[nuclei]
    kept = np.nonzero(keep[1:])[0]
    ctype = ctype[kept]
    n = len(kept)
    _check(n > 0, "shape: too small to hold any cell")

    return nuclei, cells, ctype, nest, inner
