"""Tissue layout of the independent slides: nests of packed polygonal tumour cells, stroma
with elongated fibroblasts and small round lymphocytes, optional glass and red blood cells.

Written from the user contract only (nothing from qdquant). Everything is driven by the
``rng`` passed in, so a slide is a function of its seed.

Conventions (the truth's, stated here once)
------------------------------------------
- Labels: int32, 0 = background; a cell and its nucleus share the id; tumour
  (epithelial) cells have the lowest ids, then fibroblasts, then lymphocytes.
- Membrane ring of a cell: its pixels whose Euclidean distance to the nearest pixel
  outside the cell is <= ``ring_px`` (the contract's definition, ring_px = 2).
- Angles: ``arctan2(y - cy, x - cx)`` around the cell's label centroid, in [0, 2 pi).
  A cell's HER2 stain covers the contiguous arc ``[theta0, theta0 + 2 pi c)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

EPI, FIBRO, LYMPH = 1, 2, 3


def smooth_field(rng, shape, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field of correlation length ~ ``sigma`` px."""
    f = max(1, int(sigma // 4))
    small = rng.standard_normal((shape[0] // f + 3, shape[1] // f + 3))
    small = ndi.gaussian_filter(small, sigma / f, mode="wrap")
    big = ndi.zoom(small, f, order=1)[: shape[0], : shape[1]] if f > 1 else small[: shape[0], : shape[1]]
    return ((big - big.mean()) / (big.std() + 1e-12)).astype(np.float32)


def hex_points(rng, shape, spacing: float, jitter: float) -> np.ndarray:
    """Jittered hexagonal lattice points (N, 2) as (y, x) floats inside ``shape``."""
    dy = spacing * np.sqrt(3) / 2
    ys = np.arange(rng.uniform(0, dy), shape[0], dy)
    xs = np.arange(rng.uniform(0, spacing), shape[1] + spacing, spacing)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    xx = xx - (np.arange(len(ys))[:, None] % 2) * spacing / 2
    pts = np.stack([yy.ravel(), xx.ravel()], 1) + rng.normal(0, jitter * spacing, (yy.size, 2))
    keep = (pts[:, 0] >= 0) & (pts[:, 0] <= shape[0] - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= shape[1] - 1)
    return pts[keep]


def ellipse_mask(cy, cx, a, b, theta, shape):
    """Bounding slices and boolean mask of a filled ellipse (semi-axes a along theta, b)."""
    r = int(np.ceil(max(a, b))) + 1
    y0, y1 = max(0, int(cy) - r), min(shape[0], int(cy) + r + 2)
    x0, x1 = max(0, int(cx) - r), min(shape[1], int(cx) + r + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(theta), np.sin(theta)
    u, v = dx * c + dy * s, -dx * s + dy * c
    return (slice(y0, y1), slice(x0, x1)), (u / a) ** 2 + (v / b) ** 2 <= 1.0


def boundary_band(labels: np.ndarray) -> np.ndarray:
    """Pixels that have a 4-neighbour with another label (both sides of every border)."""
    b = np.zeros(labels.shape, bool)
    dy = labels[1:, :] != labels[:-1, :]
    dx = labels[:, 1:] != labels[:, :-1]
    b[1:, :] |= dy
    b[:-1, :] |= dy
    b[:, 1:] |= dx
    b[:, :-1] |= dx
    return b & (labels > 0)


def cell_rings(labels: np.ndarray, ring_px: float = 2.0):
    """Per cell id: (slices, in-cell mask, ring mask, angles) in the cell's bounding box."""
    out = {}
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in sl)
        cell = labels[sl] == i
        d = ndi.distance_transform_edt(np.pad(cell, 1))[1:-1, 1:-1]
        yy, xx = np.nonzero(cell)
        cy, cx = yy.mean(), xx.mean()
        gy, gx = np.mgrid[0 : cell.shape[0], 0 : cell.shape[1]]
        ang = np.mod(np.arctan2(gy - cy, gx - cx), 2 * np.pi)
        out[i] = (sl, cell, cell & (d <= ring_px), ang, (cy + sl[0].start, cx + sl[1].start))
    return out


@dataclass
class Tissue:
    shape: tuple
    tissue: np.ndarray            # bool, tissue (not glass)
    nest: np.ndarray              # bool, epithelial compartment
    nuclei: np.ndarray            # int32 labels
    cells: np.ndarray             # int32 labels
    kind: dict = field(default_factory=dict)   # id -> EPI / FIBRO / LYMPH
    rings: dict = field(default_factory=dict)  # id -> cell_rings entry
    nuc_diam_um: dict = field(default_factory=dict)
    cluster: np.ndarray | None = None           # smooth field used to cluster HER2 classes


def build_tissue(rng, size: int, *, nucleus_um: float, spacing_factor: float, coverage: float,
                 nest_fraction: float, pixel_um: float = 0.5, ring_px: float = 2.0) -> Tissue:
    shape = (size, size)
    d_px = nucleus_um / pixel_um
    # tissue outline and nests
    if coverage >= 1.0:
        tissue = np.ones(shape, bool)
    else:
        f = smooth_field(rng, shape, size / 6) + 0.6 * smooth_field(rng, shape, size / 20)
        tissue = f > np.quantile(f, 1 - coverage)
        tissue = ndi.binary_fill_holes(ndi.binary_opening(tissue, iterations=3))
    g = smooth_field(rng, shape, max(20.0, 2.5 * d_px * spacing_factor))
    g_t = g[tissue]
    nest = tissue & (g > np.quantile(g_t, 1 - nest_fraction))
    nest = ndi.binary_opening(nest, iterations=max(2, int(d_px / 3)))

    # epithelial cells: Voronoi of a jittered hex lattice inside the nests
    spacing = d_px * spacing_factor
    pts = hex_points(rng, shape, spacing, 0.12)
    pts = pts[nest[np.round(pts[:, 0]).astype(int), np.round(pts[:, 1]).astype(int)]]
    seed_img = np.zeros(shape, np.int32)
    iy, ix = np.round(pts[:, 0]).astype(int), np.round(pts[:, 1]).astype(int)
    seed_img[iy, ix] = np.arange(1, len(pts) + 1)
    dist, (ny, nx) = ndi.distance_transform_edt(seed_img == 0, return_indices=True)
    vor = seed_img[ny, nx]
    cells = np.where(nest & (dist <= 0.75 * spacing), vor, 0).astype(np.int32)
    # keep each cell's component holding its seed; drop slivers at nest borders
    min_area = 0.35 * 0.866 * spacing ** 2
    keep_ids = []
    for i, sl in enumerate(ndi.find_objects(cells), start=1):
        if sl is None:
            continue
        crop = cells[sl] == i
        lab, n = ndi.label(crop)
        if n > 1:
            sy, sx = iy[i - 1] - sl[0].start, ix[i - 1] - sl[1].start
            main = lab == lab[sy, sx] if lab[sy, sx] else lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1
            cells[sl][crop & ~main] = 0
            crop = main
        if crop.sum() < min_area:
            cells[sl][crop] = 0
        else:
            keep_ids.append(i)
    # relabel epithelial cells 1..n
    lut = np.zeros(len(pts) + 1, np.int32)
    lut[keep_ids] = np.arange(1, len(keep_ids) + 1)
    cells = lut[cells]
    centres = pts[np.array(keep_ids, int) - 1] if keep_ids else np.zeros((0, 2))
    n_epi = len(keep_ids)

    nuclei = np.zeros(shape, np.int32)
    band = boundary_band(cells)
    kind, diam = {}, {}
    for k, (cy, cx) in enumerate(centres, start=1):
        di = d_px * np.exp(rng.normal(0, 0.12))
        r = rng.uniform(1.0, 1.35)
        a, b = di / 2 * np.sqrt(r), di / 2 / np.sqrt(r)
        jy, jx = rng.normal(0, 0.06 * spacing, 2)
        sl, m = ellipse_mask(cy + jy, cx + jx, a, b, rng.uniform(0, np.pi), shape)
        m &= (cells[sl] == k) & ~band[sl]
        nuclei[sl][m] = k
        kind[k] = EPI

    # stroma: fibroblasts along a flow field, lymphocytes in clusters
    stroma = tissue & (ndi.distance_transform_edt(cells == 0) > 3)
    flow = np.pi * smooth_field(rng, shape, size / 5)
    lymph_field = smooth_field(rng, shape, 40)
    area = stroma.sum()
    n_f = int(area / (3.2 * d_px) ** 2)
    n_l = int(area / (28.0 / pixel_um * 0.5) ** 2)  # one per ~ (14 um)^2 on average
    cand_f = rng.uniform(0, size - 1, (n_f * 2, 2))
    cand_l = rng.uniform(0, size - 1, (n_l * 4, 2))
    lf = lymph_field[cand_l[:, 0].astype(int), cand_l[:, 1].astype(int)]
    cand_l = cand_l[lf > 0.4][:n_l]
    next_id = n_epi + 1
    occupied = cells > 0
    for typ, cand in ((FIBRO, cand_f[:n_f]), (LYMPH, cand_l)):
        for cy, cx in cand:
            if not stroma[int(cy), int(cx)]:
                continue
            if typ == FIBRO:
                ln = d_px * rng.uniform(0.8, 1.1)
                a, b = ln, d_px * rng.uniform(0.18, 0.25)
                th = flow[int(cy), int(cx)] + rng.normal(0, 0.2)
            else:
                a = b = 6.0 / pixel_um / 2 * rng.uniform(0.9, 1.1)
                th = 0.0
            sl, m = ellipse_mask(cy, cx, a, b, th, shape)
            m &= stroma[sl]
            if m.sum() < 8 or (m & occupied[sl]).sum() > 0:
                continue
            nuclei[sl][m] = next_id
            # keep a 3-px guard around it free for its own cytoplasm rim
            sl2, m2 = ellipse_mask(cy, cx, a + 3, b + 3, th, shape)
            occupied[sl2] |= m2
            kind[next_id] = typ
            next_id += 1
    # stromal cell bodies: nucleus + rim of <= 3 px, nearest-nucleus split
    stromal_nuc = np.where(nuclei > n_epi, nuclei, 0)
    dist, (ny, nx) = ndi.distance_transform_edt(stromal_nuc == 0, return_indices=True)
    rim = (dist <= 3.0) & (cells == 0) & tissue
    cells[rim] = stromal_nuc[ny, nx][rim]
    cells[stromal_nuc > 0] = stromal_nuc[stromal_nuc > 0]
    areas = np.bincount(nuclei.ravel(), minlength=next_id)
    for i in range(1, next_id):
        diam[i] = float(2 * np.sqrt(areas[i] / np.pi) * pixel_um)
    t = Tissue(shape, tissue, nest, nuclei, cells, kind, cell_rings(cells, ring_px), diam)
    t.cluster = smooth_field(rng, shape, size / 8)
    return t


def texture(rng, shape, sigma: float, amount: float) -> np.ndarray:
    return np.clip(1.0 + amount * smooth_field(rng, shape, sigma), 0.2, None).astype(np.float32)


def paint_membranes(t: Tissue, levels: np.ndarray, completeness: np.ndarray, theta0: np.ndarray,
                    tex: np.ndarray | None = None) -> np.ndarray:
    """Abundance map: each cell's ring on its arc at its level (arrays indexed by cell id)."""
    out = np.zeros(t.shape, np.float32)
    for i, (sl, _cell, ring, ang, _c) in t.rings.items():
        if levels[i] <= 0:
            continue
        on = ring & (np.mod(ang - theta0[i], 2 * np.pi) < 2 * np.pi * completeness[i] + 1e-9)
        out[sl][on] = levels[i]
    return out if tex is None else out * tex


def paint_nuclei(t: Tissue, levels: np.ndarray, tex: np.ndarray | None = None) -> np.ndarray:
    m = levels.astype(np.float32)[t.nuclei]
    return m if tex is None else m * tex


def red_blood_cells(rng, t: Tissue, *, n_vessels: int, pixel_um: float = 0.5) -> np.ndarray:
    """Off-library red blood cells (abundance in RBC-spectrum peak units) in stroma, strung
    along short vessel-like lines; biconcave discs of ~7 um, never over a nucleus."""
    out = np.zeros(t.shape, np.float32)
    free = t.tissue & (t.nuclei == 0) & ~t.nest
    ys, xs = np.nonzero(free)
    if len(ys) == 0:
        return out
    r = 3.5 / pixel_um
    for _ in range(n_vessels):
        k = rng.integers(len(ys))
        cy, cx = float(ys[k]), float(xs[k])
        direction = rng.uniform(0, 2 * np.pi)
        for _j in range(int(rng.integers(6, 18))):
            sl, m = ellipse_mask(cy, cx, r, r * rng.uniform(0.8, 1.0), rng.uniform(0, np.pi), t.shape)
            yy, xx = np.mgrid[sl[0], sl[1]]
            rr = np.hypot(yy - cy, xx - cx) / r
            m &= free[sl]
            out[sl][m] = (rng.uniform(60, 160) * (0.65 + 0.35 * rr ** 2))[m]
            direction += rng.normal(0, 0.3)
            cy += 1.7 * r * np.sin(direction) + rng.normal(0, 1)
            cx += 1.7 * r * np.cos(direction) + rng.normal(0, 1)
            if not (0 <= cy < t.shape[0] and 0 <= cx < t.shape[1]):
                break
    return out


def contract_her2(t: Tissue, her2: np.ndarray, *, sectors: int = 36, t_faint: float = 20,
                  t_weak: float = 60, t_strong: float = 150, complete_fraction: float = 0.9):
    """The contract's per-cell HER2 rule applied to an abundance map with the TRUE labels
    (an oracle: what a perfect unmixer + segmenter would measure). Returns per-id arrays
    (class strings, intensity, completeness)."""
    n = max(t.rings) + 1 if t.rings else 1
    cls = np.array(["0"] * n, dtype=object)
    inten = np.zeros(n)
    comp = np.zeros(n)
    for i, (sl, _cell, ring, ang, _c) in t.rings.items():
        v = her2[sl][ring]
        s = np.minimum((ang[ring] / (2 * np.pi / sectors)).astype(int), sectors - 1)
        cnt = np.bincount(s, minlength=sectors)
        mean = np.bincount(s, v, minlength=sectors) / np.maximum(cnt, 1)
        stained = (cnt > 0) & (mean >= t_faint)
        comp[i] = stained.sum() / sectors
        sel = stained[s]
        inten[i] = v[sel].mean() if sel.any() else 0.0
        I = inten[i]
        if not stained.any() or I < t_faint:
            c = "0"
        elif I < t_weak:
            c = "1+"
        elif I < t_strong:
            c = "2+"
        else:
            c = "3+" if comp[i] >= complete_fraction else "2+"
        cls[i] = c
    return cls, inten, comp
