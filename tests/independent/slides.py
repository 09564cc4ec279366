"""An independent slide generator for qdquant, written from the user contract only.

    from slides import make_cohort           # tests/independent on sys.path
    folder = make_cohort("test_data/independent/clean_offset", offset_column=True, messy=False)

writes, into ``out_dir``: ``{sample_id}.ome.tif`` (uint16 raw counts with a dark offset,
CYX, 0.5 um pixels in the OME metadata, 256-px zlib tiles), ``samples.tsv``,
``spectra.csv``, ``panel.tsv``, ``config.yaml`` (the contract's example config with
only the four paths changed), ``cohort.json`` (the arguments), and the truth:
``{sample_id}_truth_nuclei.tif`` / ``_truth_cells.tif`` (int32, a cell and its nucleus
share the id), ``{sample_id}_truth_cells.csv`` and ``truth_samples.csv``.

Nothing here comes from qdquant (no import of it, no reading of its simulator); see
``spectra.py`` and ``tissue.py`` for the conventions. Truth HER2 levels are in the
units of the WRITTEN library column QD655 (counts above the dark offset per unit of
the peak-normalised column), before shading. ``her2_level`` is the level a perfect
measurement of the contract's 2-px ring would read on the blurred slide to within
~sqrt(retention) (0.77-0.95): the membrane is painted at ``her2_level_painted`` =
level / sqrt(r), r = ``ring_retention(psf)`` (0.6-0.9), so an isolated stained cell reads
~sqrt(r) x level and one among equally stained neighbours ~level / sqrt(r). Class
ranges (1+ 30-48, 2+ 80-125, 3+ 200-300) keep both ends inside the class.
``her2_class_oracle``: the contract's rule on the noise-free blurred HER2 map with the
true labels (what perfect unmixing and segmentation would give).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import yaml
from scipy import ndimage as ndi

try:  # works both as a package module and with tests/independent on sys.path
    from . import spectra as sp
    from . import tissue as ts
except ImportError:  # pragma: no cover
    import spectra as sp
    import tissue as ts

PIXEL_UM = 0.5
VERSION = 2
CLASSES = ["0", "1+", "2+", "3+"]
CONFIG = """\
samples: config/samples.tsv     # sample sheet
spectra: config/spectra.csv     # spectral library
panel: config/panel.tsv         # what each endmember means
results: results                # output root
pixel_size_um: 0.5              # default when neither metadata nor sheet give one
chunk_size: 2048                # dask chunk edge in pixels (Y and X)
segmentation:
  nucleus_diameter_um: 8         # or auto (estimated from the image); a number is a hint
  cell_expansion_um: 5          # max growth of a cell beyond its nucleus
  membrane_width_px: 2
her2:
  marker: HER2                  # a marker named in panel.tsv
  t_faint: 20                   # unmixed abundance units (see spectra)
  t_weak: 60
  t_strong: 150
  complete_fraction: 0.9        # completeness >= this counts as complete
  sectors: 36                   # angular sectors used for completeness
  ultralow_min_pct: 1.0         # below this % of stained cells a 0 is HER2-null
"""
THRESHOLDS = yaml.safe_load(CONFIG)["her2"]
PANEL = [  # endmember, marker, role, compartment, score, t1, t2, t3
    ("DAPI", "DAPI", "nuclear_stain", "", "none", "", "", ""),
    ("QD525", "Ki67", "marker", "nucleus", "percent_positive", 40, "", ""),
    ("QD565", "ER", "marker", "nucleus", "hscore", 30, 80, 150),
    ("QD605", "PR", "marker", "nucleus", "allred", 30, 80, 150),
    ("QD655", "HER2", "marker", "membrane", "her2", "", "", ""),
    ("QD705", "ECAD", "membrane_stain", "membrane", "none", "", "", ""),
    ("AF", "AF", "autofluorescence", "", "none", "", "", ""),
]

# HER2 case compositions: fraction of ALL cells (stroma included) per non-zero class,
# assigned as exact counts to tumour cells ("2+s" = strong but incomplete 2+)
CASES = {
    "her2_null": {},
    "ultralow": {"1+": 0.05},
    "1+": {"1+": 0.28, "2+": 0.03},
    "2+": {"2+": 0.25, "1+": 0.15, "3+": 0.03},
    "2+incomplete": {"2+s": 0.25, "1+": 0.10, "3+": 0.03},
    "3+": {"3+": 0.30, "2+": 0.10, "1+": 0.10},
}
# sample_id -> (case, layout overrides)
SLIDES = {
    "ind_null_a": ("her2_null", {}),
    "ind_null_b": ("her2_null", {"coverage": 1.0, "nest_fraction": 0.35}),
    "ind_ultralow": ("ultralow", {}),
    "ind_1plus": ("1+", {}),
    "ind_2plus": ("2+", {}),
    "ind_2plus_incomplete": ("2+incomplete", {"nest_fraction": 0.6}),
    "ind_3plus": ("3+", {"nest_fraction": 0.6}),
}


def slide_score(classes) -> tuple[str, str, dict]:
    """The contract's per-sample rule over all cells: (score, category, percentages)."""
    c = np.asarray(classes, dtype=object)
    n = max(len(c), 1)
    pct = {k: 100.0 * np.sum(c == k) / n for k in CLASSES}
    p3, p23, p123 = pct["3+"], pct["2+"] + pct["3+"], pct["1+"] + pct["2+"] + pct["3+"]
    if p3 > 10:
        return "3+", "HER2-positive", pct
    if p23 > 10:
        return "2+", "HER2-equivocal", pct
    if p123 > 10:
        return "1+", "HER2-low", pct
    if p123 >= THRESHOLDS["ultralow_min_pct"]:
        return "0", "HER2-ultralow", pct
    return "0", "HER2-null", pct


def slide_params(rng, index: int, *, messy: bool, size: int) -> dict:
    """Per-slide acquisition and layout parameters (drawn from the cohort's rng)."""
    diam = [7.0, 12.5, 9.0, 6.5, 10.5, 8.0, 13.5][index % 7] + rng.uniform(-0.4, 0.4)
    per_band = index % 2 == 1
    n_bands = len(sp.band_edges()) - 1
    offset = rng.uniform(90, 115, n_bands) if per_band else np.full(n_bands, rng.uniform(95, 105))
    p = {
        "nucleus_um": float(diam),
        "spacing_factor": float(rng.uniform(1.12, 1.3) if messy else rng.uniform(1.55, 1.8)),
        "coverage": float(rng.uniform(0.65, 0.85)),
        "nest_fraction": float(rng.uniform(0.45, 0.55)),
        "psf_sigma_px": float(rng.uniform(0.8, 1.6)),
        "gain": float(rng.uniform(0.7, 1.0) if messy else rng.uniform(0.2, 0.3)),
        "read_noise": float(rng.uniform(3, 5) if messy else rng.uniform(1.5, 2.5)),
        "offset": offset.round(2).tolist(),
        "per_band_offset": bool(per_band),
        "af_level": float(rng.uniform(40, 70) if messy else rng.uniform(25, 40)),
        "shading_fovs": int(rng.integers(1, 4)) if messy else 0,
        "shading_depth": float(rng.uniform(0.15, 0.25)) if messy else 0.0,
        "rbc_vessels": int(rng.integers(3, 7) * max(1, size // 512)) if messy else 0,
        "qd_shift_nm": ({q: float(rng.choice([-1, 1]) * rng.uniform(2, 4)) for q in sp.QDOTS}
                        if messy else {}),
        "af_stroma": (dict(peak_nm=float(rng.uniform(505, 520)), width=0.13, shoulder_nm=590.0, shoulder=0.25)
                      if messy else None),
        "af_epithelium": (dict(peak_nm=float(rng.uniform(545, 560)), width=0.10, shoulder_nm=610.0,
                               shoulder=0.45) if messy else None),
    }
    return p


def library_af(messy: bool) -> dict:
    """The AF the written library assumes; on messy slides it is between the two tissue AFs
    but shifted ~12 nm from their mean peak and narrower."""
    return dict(sp.AF_LIBRARY) if not messy else dict(peak_nm=547.0, width=0.095, shoulder_nm=605.0,
                                                      shoulder=0.3)


def assign_her2(rng, t: ts.Tissue, case: str, n_all: int):
    """Per-cell HER2 class, level (library units), completeness, arc start (arrays by id)."""
    n = n_all + 1
    cls = np.array(["0"] * n, dtype=object)
    level = np.zeros(n)
    comp = np.ones(n)
    theta0 = rng.uniform(0, 2 * np.pi, n)
    strong_incomplete = np.zeros(n, bool)
    tumour = np.array([i for i, k in t.kind.items() if k == ts.EPI], int)
    # clustered heterogeneity: high classes where the smooth field is high
    cy = np.array([t.rings[i][4][0] for i in tumour]) if len(tumour) else np.zeros(0)
    cx = np.array([t.rings[i][4][1] for i in tumour]) if len(tumour) else np.zeros(0)
    rank_key = (t.cluster[cy.astype(int), cx.astype(int)] + rng.normal(0, 0.7, len(tumour))
                if len(tumour) else np.zeros(0))
    order = tumour[np.argsort(-rank_key)]
    pos = 0
    for key in ("3+", "2+s", "2+", "1+"):
        frac = CASES[case].get(key, 0.0)
        k = int(round(frac * n_all))
        if frac > 0:
            k = max(k, 1)
        ids = order[pos: pos + k]
        pos += len(ids)
        cls[ids] = "2+" if key == "2+s" else key
        if key == "3+":
            level[ids] = rng.uniform(200, 300, len(ids))
        elif key == "2+s":
            level[ids] = rng.uniform(200, 280, len(ids))
            comp[ids] = rng.uniform(0.3, 0.7, len(ids))
            strong_incomplete[ids] = True
        else:
            lo, hi = (80, 125) if key == "2+" else (30, 48)
            level[ids] = rng.uniform(lo, hi, len(ids))
            half = rng.random(len(ids)) < 0.5
            comp[ids[half]] = rng.uniform(0.3, 0.7, half.sum())
    zero = np.setdiff1d(tumour, order[:pos])
    faint = zero[rng.random(len(zero)) < 0.15]
    level[faint] = rng.uniform(2, 8, len(faint))
    return cls, level, comp, theta0, strong_incomplete


def ring_retention(sigma_px: float, ring_px: int = 2) -> float:
    """Mean over a ``ring_px``-wide membrane band, after a Gaussian blur, of a unit band
    whose outer neighbour is unstained (1-D; 1 without blur)."""
    if sigma_px <= 0:
        return 1.0
    x = np.zeros(81)
    x[40: 40 + ring_px] = 1.0
    return float(ndi.gaussian_filter1d(x, sigma_px)[40: 40 + ring_px].mean())


def shading_map(shape, fovs: int, depth: float) -> np.ndarray:
    """Vignetting: in each of fovs x fovs fields, 1 - depth * (r / r_corner)^2."""
    if fovs <= 0 or depth <= 0:
        return np.ones(shape, np.float32)
    out = np.empty(shape, np.float32)
    ey = np.linspace(0, shape[0], fovs + 1).astype(int)
    ex = np.linspace(0, shape[1], fovs + 1).astype(int)
    for a in range(fovs):
        for b in range(fovs):
            h, w = ey[a + 1] - ey[a], ex[b + 1] - ex[b]
            yy, xx = np.mgrid[0:h, 0:w]
            cy, cx = 0.52 * h, 0.47 * w  # optical centre a little off the field centre
            r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / ((h / 2) ** 2 + (w / 2) ** 2)
            out[ey[a]: ey[a + 1], ex[b]: ex[b + 1]] = 1 - depth * np.minimum(r2, 1.0)
    return out


def render(maps: dict, specs: dict, edges, *, psf_sigma_px: float = 0.0, shading=None,
           gain: float = 1.0, read_noise: float = 0.0, offset=None, rng=None, noise: bool = True):
    """Counts cube (C, Y, X) float32: offset + gain * Poisson(shading * blur(sum_k a_k S_k) / gain)
    + read noise. ``noise=False``: the expectation, offset included, no rounding."""
    names = list(maps)
    S = np.stack([specs[k] for k in names], 1).astype(np.float32)  # (C, K)
    A = np.stack([maps[k] for k in names], 0)
    K, Y, X = A.shape
    cube = (S @ A.reshape(K, -1)).reshape(-1, Y, X)
    if psf_sigma_px > 0:
        centres = sp.band_centres(edges)
        for c in range(cube.shape[0]):  # PSF grows with wavelength
            cube[c] = ndi.gaussian_filter(cube[c], psf_sigma_px * centres[c] / 600.0)
    if shading is not None:
        cube *= shading[None]
    if noise:  # Poisson photon noise (exact below 10 photons, Gaussian above) + read noise
        lam = np.maximum(cube, 0, out=cube) / np.float32(gain)
        small = (lam > 0) & (lam < 10)
        photons = lam + np.sqrt(lam) * rng.standard_normal(lam.shape, dtype=np.float32)
        photons[small] = rng.poisson(lam[small])
        cube = np.float32(gain) * photons
        cube += np.float32(read_noise) * rng.standard_normal(cube.shape, dtype=np.float32)
    if offset is not None:
        cube += np.asarray(offset, np.float32)[:, None, None]
    return cube


def make_slide(rng, sample_id: str, case: str, p: dict, size: int, lib: pd.DataFrame, edges):
    t = ts.build_tissue(rng, size, nucleus_um=p["nucleus_um"], spacing_factor=p["spacing_factor"],
                        coverage=p["coverage"], nest_fraction=p["nest_fraction"], pixel_um=PIXEL_UM)
    ids = np.array(sorted(t.rings), int)
    n_all = len(ids)
    n = (ids.max() + 1) if n_all else 1
    kind = np.zeros(n, int)
    for i, k in t.kind.items():
        kind[i] = k
    tum = kind == ts.EPI
    cls, her2_level, comp, theta0, strong_inc = assign_her2(rng, t, case, n_all)
    # nuclear markers (tumour cells; a few stromal Ki67)
    er_pos, pr_pos, ki_pos = rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.7), rng.uniform(0.1, 0.4)
    er = np.where(tum & (rng.random(n) < er_pos), rng.uniform(40, 250, n), 0.0)
    pr = np.where(tum & (rng.random(n) < pr_pos), rng.uniform(40, 220, n), 0.0)
    ki = np.where((tum & (rng.random(n) < ki_pos)) | ((kind > 1) & (rng.random(n) < 0.05)),
                  rng.uniform(70, 220, n), 0.0)
    dapi = np.select([kind == ts.EPI, kind == ts.FIBRO, kind == ts.LYMPH],
                     [rng.uniform(250, 450, n), rng.uniform(300, 500, n), rng.uniform(500, 800, n)], 0.0)
    ecad = np.where(tum, rng.uniform(120, 220, n), 0.0)
    shape = t.shape
    retention = ring_retention(p["psf_sigma_px"] * 655 / 600)
    chrom = ts.texture(rng, shape, 1.5, 0.18)
    maps = {
        "DAPI": ts.paint_nuclei(t, dapi, chrom),
        "QD525": ts.paint_nuclei(t, ki, chrom),
        "QD565": ts.paint_nuclei(t, er),
        "QD605": ts.paint_nuclei(t, pr),
        # the membrane is painted at level / sqrt(retention): after the PSF the ring mean of an
        # isolated stained cell is ~ sqrt(r) * level, of one among stained neighbours ~ level / sqrt(r)
        "QD655": ts.paint_membranes(t, her2_level / np.sqrt(retention), comp, theta0,
                                    ts.texture(rng, shape, 2.0, 0.1)),
        "QD705": ts.paint_membranes(t, ecad, np.ones(n), theta0, ts.texture(rng, shape, 2.0, 0.1)),
    }
    af = p["af_level"] * t.tissue * ts.texture(rng, shape, 5.0, 0.3) * ts.texture(rng, shape, 1.5, 0.1)
    epi = t.nest | (t.cells > 0) & tum[t.cells]
    maps["AF_epithelium"] = (af * epi).astype(np.float32)
    maps["AF_stroma"] = (1.3 * af * ~epi).astype(np.float32)
    maps["RBC"] = (ts.red_blood_cells(rng, t, n_vessels=p["rbc_vessels"], pixel_um=PIXEL_UM)
                   if p["rbc_vessels"] else np.zeros(shape, np.float32))
    specs = sp.true_spectra(edges, lib, qd_shift_nm=p["qd_shift_nm"], af_stroma=p["af_stroma"],
                            af_epithelium=p["af_epithelium"])
    shading = shading_map(shape, p["shading_fovs"], p["shading_depth"])
    cube = render(maps, specs, edges, psf_sigma_px=p["psf_sigma_px"], shading=shading, gain=p["gain"],
                  read_noise=p["read_noise"], offset=p["offset"], rng=rng)
    counts = np.clip(np.round(cube), 0, 65535).astype(np.uint16)
    # oracle: the contract's rule on the noise-free, unshaded, blurred HER2 map, true labels
    blurred = ndi.gaussian_filter(maps["QD655"] * specs["QD655"].max() / lib["QD655"].max(),
                                  p["psf_sigma_px"] * 655 / 600)
    o_cls, o_int, o_comp = ts.contract_her2(t, blurred, **{k: THRESHOLDS[k] for k in (
        "sectors", "t_faint", "t_weak", "t_strong", "complete_fraction")})
    rows = []
    for i in ids:
        cyx = t.rings[i][4]
        rows.append({
            "cell_id": int(i), "y": round(cyx[0], 2), "x": round(cyx[1], 2),
            "cell_type": {1: "tumour", 2: "fibroblast", 3: "lymphocyte"}[kind[i]],
            "is_tumour": bool(tum[i]), "her2_class": cls[i], "her2_level": round(float(her2_level[i]), 3),
            "her2_level_painted": round(float(her2_level[i] / np.sqrt(retention)), 3),
            "her2_completeness": round(float(comp[i]), 4), "her2_strong_incomplete": bool(strong_inc[i]),
            "nucleus_diameter_um": round(t.nuc_diam_um.get(int(i), 0.0), 3),
            "area_px": int(t.rings[i][1].sum()), "ecad_level": round(float(ecad[i]), 2),
            "er_level": round(float(er[i]), 2), "pr_level": round(float(pr[i]), 2),
            "ki67_level": round(float(ki[i]), 2),
            "her2_class_oracle": o_cls[i], "her2_intensity_oracle": round(float(o_int[i]), 3),
            "her2_completeness_oracle": round(float(o_comp[i]), 4),
        })
    cells = pd.DataFrame(rows)
    score, category, pct = slide_score(cells["her2_class"])
    o_score, o_cat, _ = slide_score(cells["her2_class_oracle"])
    p123 = pct["1+"] + pct["2+"] + pct["3+"]
    margins = [abs(v - 10) for v in (pct["3+"], pct["2+"] + pct["3+"], p123)]
    phenomena = [name for name, on in (
        ("per_band_offset", p["per_band_offset"]), ("glass", p["coverage"] < 1), ("crowded", p["spacing_factor"] < 1.4),
        ("shading", p["shading_fovs"] > 0), ("qd_drift", bool(p["qd_shift_nm"])),
        ("af_mismatch", p["af_stroma"] is not None), ("rbc", p["rbc_vessels"] > 0),
        ("large_nuclei", p["nucleus_um"] >= 11), ("small_nuclei", p["nucleus_um"] <= 7.5)) if on]
    summary = {
        "sample_id": sample_id, "case": case, "her2_score": score, "her2_category": category,
        "her2_pct_0": pct["0"], "her2_pct_1plus": pct["1+"], "her2_pct_2plus": pct["2+"],
        "her2_pct_3plus": pct["3+"], "n_cells": n_all, "n_tumour": int(tum.sum()),
        "min_margin_to_10pct": round(min(margins), 2),
        "her2_score_oracle": o_score, "her2_category_oracle": o_cat,
        "offset_mean": float(np.mean(p["offset"])), "offset_per_band": ";".join(f"{v:.2f}" for v in p["offset"]),
        "psf_sigma_px": p["psf_sigma_px"], "her2_ring_retention": retention, "gain_counts_per_photon": p["gain"],
        "photons_per_unit": 1.0 / p["gain"], "read_noise_counts": p["read_noise"],
        "nucleus_diameter_um": p["nucleus_um"], "spacing_factor": p["spacing_factor"],
        "tissue_coverage": float(t.tissue.mean()), "shading_fovs": p["shading_fovs"],
        "shading_depth": p["shading_depth"], "phenomena": ";".join(phenomena),
    }
    return counts, t, cells, summary, maps, specs


def write_ome(path: Path, counts: np.ndarray, channel_names) -> None:
    tifffile.imwrite(
        path, counts, ome=True, tile=(256, 256), compression="zlib", compressionargs={"level": 1}, photometric="minisblack",
        metadata={"axes": "CYX", "PhysicalSizeX": PIXEL_UM, "PhysicalSizeY": PIXEL_UM,
                  "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm",
                  "Channel": {"Name": [f"{w:.1f}nm" for w in channel_names]}},
    )


def make_cohort(out_dir, *, offset_column: bool, messy: bool, size: int = 1024, seed: int = 0,
                only=None) -> Path:
    """Write a cohort of the 7 slides of ``SLIDES`` (or those in ``only``) into ``out_dir``."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    edges = sp.band_edges()
    lib = sp.library(edges, af=library_af(messy), offset_column=offset_column)
    lib.to_csv(out / "spectra.csv", index=False, float_format="%.6f")
    panel = list(PANEL) + ([("Offset", "Offset", "background", "", "none", "", "", "")] if offset_column else [])
    pd.DataFrame(panel, columns=["endmember", "marker", "role", "compartment", "score", "t1", "t2", "t3"]).to_csv(
        out / "panel.tsv", sep="\t", index=False)
    cfg = CONFIG.replace("config/samples.tsv", str(out / "samples.tsv")).replace(
        "config/spectra.csv", str(out / "spectra.csv")).replace("config/panel.tsv", str(out / "panel.tsv")).replace(
        "results: results ", f"results: {out / 'results'} ")
    (out / "config.yaml").write_text(cfg)
    names = [n for n in SLIDES if only is None or n in only]
    (out / "samples.tsv").write_text(
        "sample_id\timage\n" + "".join(f"{n}\t{out / n}.ome.tif\n" for n in names))
    summaries = []
    for index, name in enumerate(SLIDES):
        # one rng per slide: a slide does not depend on which others are made
        rng = np.random.default_rng([seed, index, int(messy), size])
        p = slide_params(rng, index, messy=messy, size=size)
        if name not in names:
            continue
        case, overrides = SLIDES[name]
        p.update(overrides)
        counts, t, cells, summary, _maps, _specs = make_slide(rng, name, case, p, size, lib, edges)
        write_ome(out / f"{name}.ome.tif", counts, lib["wavelength_nm"])
        tifffile.imwrite(out / f"{name}_truth_nuclei.tif", t.nuclei.astype(np.int32), compression="zlib")
        tifffile.imwrite(out / f"{name}_truth_cells.tif", t.cells.astype(np.int32), compression="zlib")
        cells.to_csv(out / f"{name}_truth_cells.csv", index=False)
        summaries.append({**summary, "params": json.dumps(p)})
    pd.DataFrame(summaries).to_csv(out / "truth_samples.csv", index=False)
    (out / "cohort.json").write_text(json.dumps(
        {"offset_column": offset_column, "messy": messy, "size": size, "seed": seed, "version": VERSION,
         "slides": names}, indent=1))
    return out
