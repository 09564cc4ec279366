"""QC figures, the one-page sample report and the cohort report.

Figures are drawn from thumbnails (strided reads of the stored images), so a
whole slide costs no more memory than a small one. The HTML pages embed their
images as data URIs: one file, no network.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from qdquant import io  # noqa: E402
from qdquant.colours import HER2_CLASS_COLOURS as CLASS_COLOURS  # noqa: E402

#: median relative residual above which the report warns that the library misfits
RESIDUAL_WARN = 0.10
#: fraction of flagged (poorly fitted) pixels above which the report warns
FLAGGED_WARN = 0.01
#: fewer tumour cells than this and the report warns (CAP asks for >= 100 invasive cells)
MIN_TUMOUR_CELLS = 100


def _stride(shape, target: int = 512) -> int:
    return max(1, int(np.ceil(max(shape) / target)))


def _save(fig, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png")
    plt.close(fig)


def _thumb(image, step: int) -> np.ndarray:
    return np.asarray(image[..., ::step, ::step], dtype=np.float32)


def unmixing_stats(cube, stored, spectra, flagged=None) -> dict:
    """Fit statistics from a strided sample of pixels.

    ``relative_residual``: median over tissue pixels of RMS residual / RMS
    signal (the counts fitted: dark offset subtracted); ``fraction_at_bound``: pixels with at
    least one abundance at 0 (the non-negativity bound active).
    """
    step = _stride(cube.shape[1:], 256)
    raw = _thumb(cube, step).reshape(cube.shape[0], -1)
    fit = _thumb(stored, step).reshape(stored.shape[0], -1)
    abundances, residual = fit[:-1], fit[-1]
    signal = np.sqrt(np.mean(raw.astype(np.float64) ** 2, axis=0))
    tissue = signal > np.percentile(signal, 25)
    rel = residual[tissue] / np.maximum(signal[tissue], 1e-9)
    return {
        "fraction_flagged": float(np.mean(_thumb(flagged, step))) if flagged is not None else 0.0,
        "relative_residual_median": float(np.median(rel)) if rel.size else float("nan"),
        "relative_residual_p99": float(np.percentile(rel, 99)) if rel.size else float("nan"),
        "fraction_at_bound": float(np.mean((abundances <= 0).any(axis=0))),
        "mean_spectrum": raw.mean(axis=1).tolist(),
        "mean_fit": (np.asarray(spectra) @ abundances).mean(axis=1).tolist(),
    }


def plot_unmixing_qc(cube, stored, library, path: Path, *, flagged=None, noise=None, dark_offset=None,
                     warnings=()) -> dict:
    """Library spectra, the tissue's mean spectrum and its fit, and the residual map.

    ``cube``: the counts that were fitted (dark offset subtracted);
    ``dark_offset``: the (C,) counts subtracted, drawn beside the mean
    spectrum; ``warnings``: lines the sample's report shows.
    Also writes the statistics next to the PNG (``unmixing.json``) and returns them.
    """
    stats = unmixing_stats(cube, stored, library.spectra, flagged)
    if noise is not None:
        stats["noise_model_a"], stats["noise_model_b"] = noise
    if dark_offset is not None:
        stats["dark_offset_counts"] = np.asarray(dark_offset, dtype=float).tolist()
    stats["warnings"] = list(warnings)
    wl = library.wavelengths_nm
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for k, name in enumerate(library.names):
        axes[0].plot(wl, library.spectra[:, k], label=name)
    axes[0].set(title="spectral library", xlabel="wavelength (nm)", ylabel="normalised emission")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].plot(wl, stats["mean_spectrum"], "k.-", label="tissue mean")
    axes[1].plot(wl, stats["mean_fit"], "r-", label="fit")
    if dark_offset is not None:
        axes[1].plot(wl, stats["dark_offset_counts"], "--", color="grey", label="dark offset (subtracted)")
    axes[1].set(title=f"mean spectrum; {100 * stats['fraction_at_bound']:.0f}% px at a bound",
                xlabel="wavelength (nm)", ylabel="counts")
    axes[1].legend()
    step = _stride(stored.shape[1:])
    im = axes[2].imshow(_thumb(stored[-1], step), cmap="magma")
    axes[2].set(title=f"RMS residual (median rel. {stats['relative_residual_median']:.3f}; "
                      f"{100 * stats['fraction_flagged']:.1f}% flagged)")
    axes[2].axis("off")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    _save(fig, path)
    with io.atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(stats, indent=1))
    return stats


def plot_library_refinement(library, refined, shifts, path: Path) -> None:
    """Library vs slide-refined spectra, with each endmember's shift."""
    refined = np.asarray(refined)
    fig, ax = plt.subplots(figsize=(9, 4))
    for k, name in enumerate(library.names):
        line, = ax.plot(library.wavelengths_nm, library.spectra[:, k], ls=":")
        row = shifts[shifts["endmember"] == name]
        shift = float(row["shift_nm"].iloc[0]) if len(row) else 0.0
        ax.plot(library.wavelengths_nm, refined[:, k], color=line.get_color(), label=f"{name} {shift:+.1f} nm")
    kept = bool(shifts["kept"].iloc[0]) if len(shifts) else False
    ax.set(xlabel="wavelength (nm)", ylabel="normalised emission",
           title=f"library (dotted) vs refined on the slide; residual {shifts.attrs.get('residual_before', np.nan):.2f}"
                 f" -> {shifts.attrs.get('residual_after', np.nan):.2f} counts ({'kept' if kept else 'not kept'})")
    ax.legend(fontsize=7, ncol=3)
    _save(fig, path)


def plot_shading(shading, brightness, path: Path) -> None:
    """The field-of-view shading found on the slide, and the nuclear brightness it was fitted on.

    Also writes ``illumination.json`` next to the PNG: the FOV size, whether
    a correction was applied, the profile's darkest point and the held-out
    explained variance.
    """
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.2))
    with np.errstate(all="ignore"):
        shown = np.log(np.where(brightness > 0, brightness, np.nan))
    im = ax0.imshow(shown, cmap="magma")
    fig.colorbar(im, ax=ax0, label="log nuclear brightness")
    ax0.set_title("nuclear-stain brightness per block")
    ax0.axis("off")
    if shading.is_flat:
        ax1.text(0.5, 0.5, "no field-of-view shading found:\nnone applied", ha="center", va="center")
        ax1.axis("off")
    else:
        im = ax1.imshow(shading.profile, cmap="viridis", vmax=1.0)
        fig.colorbar(im, ax=ax1, label="relative sensitivity")
        ax1.set_title(f"shading of one FOV ({shading.fov_px[0]} x {shading.fov_px[1]} px), "
                      f"min {shading.profile.min():.2f}")
    _save(fig, path)
    stats = {"fov_px": list(shading.fov_px), "applied": not shading.is_flat,
             "profile_min": float(shading.profile.min()), "explained_heldout": float(shading.explained)}
    with io.atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(stats, indent=1))


def _outline(labels: np.ndarray) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    return find_boundaries(labels, mode="inner")


def plot_segmentation_qc(nuclear, nuclei, cells, path: Path, crop: int = 512) -> None:
    """Full-resolution crop (centre of the slide) with nucleus and cell outlines."""
    h, w = nuclear.shape
    y0, x0 = max(0, h // 2 - crop // 2), max(0, w // 2 - crop // 2)
    window = (slice(y0, y0 + crop), slice(x0, x0 + crop))
    img = np.asarray(nuclear[window], dtype=np.float32)
    nuc, cel = np.asarray(nuclei[window]), np.asarray(cells[window])
    hi = np.percentile(img, 99.5) if img.size else 1.0
    rgb = np.dstack([np.clip(img / max(hi, 1e-9), 0, 1)] * 3) * 0.8
    rgb[_outline(cel)] = (0.2, 1.0, 0.2)
    rgb[_outline(nuc)] = (1.0, 0.3, 0.3)
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(rgb)
    ax.set_title(f"nuclei (red) and cells (green); {len(np.unique(cel)) - 1} cells in this crop")
    ax.axis("off")
    _save(fig, path)


def plot_calibration(controls, fitted: dict, path: Path) -> None:
    """Membrane intensity distribution of each control slide with the fitted thresholds."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for sums, npx, known in controls:
        with np.errstate(invalid="ignore", divide="ignore"):
            ring_mean = sums.sum(axis=1) / np.maximum(npx.sum(axis=1), 1)
        ax.hist(np.log10(1 + ring_mean), bins=40, histtype="step", label=f"control {known}")
    for name in ("t_faint", "t_weak", "t_strong"):
        ax.axvline(np.log10(1 + fitted[name]), color="k", ls="--")
        ax.text(np.log10(1 + fitted[name]), ax.get_ylim()[1] * 0.9, f" {name}={fitted[name]:.0f}", fontsize=8)
    ax.set(xlabel="log10(1 + membrane ring mean HER2)", ylabel="cells", title="HER2 calibration on control slides")
    ax.legend()
    _save(fig, path)


# ----------------------------------------------------------------------------
# per-sample figures and page


#: Most points a scatter plot draws (a random subset beyond; counts stay exact).
MAX_POINTS = 100_000


def _drawn(selected: np.ndarray) -> np.ndarray:
    """``selected`` thinned at random to :data:`MAX_POINTS` of the table's rows, reproducibly."""
    n = len(selected)
    if n <= MAX_POINTS:
        return selected
    keep = np.zeros(n, dtype=bool)
    keep[np.random.default_rng(0).choice(n, MAX_POINTS, replace=False)] = True
    return selected & keep


def _class_map(cells: pd.DataFrame, background, path: Path, *, column: str, colours: dict, title: str) -> None:
    step = _stride(background.shape)
    fig, ax = plt.subplots(figsize=(7, 7))
    thumb = _thumb(background, step)
    ax.imshow(thumb, cmap="gray", vmax=np.percentile(thumb, 99.5) if thumb.size else 1)
    for value, colour in colours.items():
        sel = (cells[column].astype(str) == value).to_numpy()
        drawn = _drawn(sel)
        ax.scatter(cells.loc[drawn, "X_centroid"] / step, cells.loc[drawn, "Y_centroid"] / step,
                   s=6, c=colour, label=f"{value} ({int(sel.sum())})")
    ax.legend(loc="upper right", fontsize=8, markerscale=2)
    ax.set_title(title)
    ax.axis("off")
    _save(fig, path)


def _her2_figures(cells: pd.DataFrame, marker: str, thresholds: dict, complete_fraction: float, qc: Path) -> list[Path]:
    hist, scatter = qc / "her2_intensity_histogram.png", qc / "her2_completeness_vs_intensity.png"
    fig, ax = plt.subplots(figsize=(7, 4))
    values = cells["her2_membrane_intensity"].to_numpy(dtype=float)
    ring_mean = cells[f"{marker}_membrane_mean"].to_numpy(dtype=float)
    bins = np.linspace(0, np.log10(1 + max(np.nanmax(ring_mean, initial=1), max(thresholds.values()) * 2)), 60)
    ax.hist(np.log10(1 + ring_mean[np.isfinite(ring_mean)]), bins=bins, color="0.6", label="membrane ring mean")
    ax.hist(np.log10(1 + values[values > 0]), bins=bins, histtype="step", color="k",
            label="intensity of stained sectors")
    for name, value in thresholds.items():
        ax.axvline(np.log10(1 + value), color="k", ls="--")
        ax.text(np.log10(1 + value), ax.get_ylim()[1] * 0.9, f" {name}={value:g}", fontsize=8)
    ax.set(xlabel="log10(1 + HER2 abundance)", ylabel="cells", title="HER2 membrane intensity per cell")
    ax.legend(loc="center right", fontsize=8)
    _save(fig, hist)
    fig, ax = plt.subplots(figsize=(7, 4))
    for klass, colour in CLASS_COLOURS.items():
        drawn = _drawn((cells["her2_class"].astype(str) == klass).to_numpy())
        ax.scatter(values[drawn], cells.loc[drawn, "her2_completeness"], s=5, c=colour, label=klass)
    ax.set_xscale("symlog", linthresh=10)
    ax.axhline(complete_fraction, color="k", ls=":")
    for value in thresholds.values():
        ax.axvline(value, color="k", ls="--", lw=0.8)
    ax.set(xlabel="HER2 membrane intensity", ylabel="completeness", title="per-cell HER2 class")
    ax.legend()
    _save(fig, scatter)
    return [hist, scatter]


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.1f}"
    return html.escape(str(value))


_CSS = """
body{font-family:sans-serif;max-width:1100px;margin:1em auto;color:#222}
h1{margin-bottom:0} .score{font-size:2em;font-weight:bold}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}
.warn{background:#fff3cd;border:1px solid #e0b000;padding:.5em;margin:.3em 0}
figure{display:inline-block;margin:.5em;vertical-align:top} img{max-width:520px}
figcaption{font-size:.85em;color:#555}
"""


def sample_warnings(summary: dict, stats: dict | None, cfg) -> list[str]:
    """What a pathologist must see before trusting the numbers."""
    out = []
    if summary.get("n_cells", 0) == 0:
        out.append("No cells were found: the scores are not assessable.")
    if cfg.tumour is not None:
        n = summary.get("n_tumour_cells", 0)
        if n == 0:
            out.append("No tumour cells passed the gate: the scores are not assessable.")
        elif n < MIN_TUMOUR_CELLS:
            out.append(f"Only {n} tumour cells (fewer than {MIN_TUMOUR_CELLS}): interpret the scores with care.")
    if summary.get("her2_score") == "2+":
        out.append("HER2 2+ (equivocal): reflex in-situ hybridisation (ISH) is needed.")
    if stats and stats.get("fraction_flagged", 0) > FLAGGED_WARN:
        out.append(
            f"{100 * stats['fraction_flagged']:.1f}% of pixels fit the spectral library poorly (off-library "
            "autofluorescence?); they are left out of every measurement."
        )
    if stats:
        out += stats.get("warnings", [])
    if stats and stats.get("relative_residual_median", 0) > RESIDUAL_WARN:
        out.append(
            f"High unmixing residual (median {100 * stats['relative_residual_median']:.0f}% of the signal): "
            "the spectral library may not match this slide."
        )
    return out


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("qdquant")
    except Exception:  # not installed (run from a source tree)
        from qdquant import __version__

        return __version__


def provenance(cfg, sample_id: str, paths: dict[str, Path]) -> list[tuple[str, str]]:
    """What the numbers were made from: image, pixel size, library (refined or not), the
    endmembers the fit used, qdquant's version and the date; rows of the report's table."""
    import datetime

    sample = cfg.sample(sample_id)
    rows = [("image", str(sample.image))]
    if sample.unstained is not None:
        rows.append(("unstained control (autofluorescence)", str(sample.unstained)))
    try:
        rows.append(("pixel size (µm)", f"{io.read_pixel_size_um(paths['zarr']):g}"))
    except Exception:  # an image without the scale: said, not fatal to the report
        rows.append(("pixel size (µm)", "unknown"))
    rows.append(("spectral library", str(cfg.raw.get("spectra", "–"))))
    refinement = paths["unmixing_qc"].parent / "library_refinement.csv"
    if refinement.is_file():
        shifts = pd.read_csv(refinement)
        kept = bool(shifts["kept"].iloc[0]) if len(shifts) else False
        moved = shifts.loc[shifts["shift_nm"].abs() >= 0.05] if "shift_nm" in shifts else shifts.iloc[:0]
        detail = ", ".join(f"{r.endmember} {r.shift_nm:+.1f} nm" for r in moved.itertuples()) or "no shift"
        rows.append(("library refined on the slide",
                     f"yes ({detail})" if kept else f"no: refinement did not lower the residual ({detail})"))
    else:
        rows.append(("library refined on the slide", "no (refine_library: false)"))
    if paths["spectra_used"].is_file():
        used = [c for c in pd.read_csv(paths["spectra_used"], nrows=0).columns if c != "wavelength_nm"]
        added = [c for c in used if c not in cfg.library.names]
        text = ", ".join(used)
        if added:
            text += f" ({', '.join(added)} added: autofluorescence found on the slide)"
        af = cfg.panel_row(role="autofluorescence")
        if af is not None and af.endmember in used:
            source = ("the unstained control" if sample.unstained is not None else
                      "the slide's stain-free pixels, where enough" if cfg.unmixing.autofluorescence == "slide"
                      else "the library")
            text += f"; {af.endmember} from {source}"
        rows.append(("endmembers fitted (spectra_used.csv)", text))
    rows += [("qdquant version", _version()),
             ("report written", datetime.datetime.now().astimezone().isoformat(timespec="seconds"))]
    return rows


def report_figures(cfg) -> list[str]:
    """The QC figures (``qc/{name}.png``) the report step draws for this config, by name."""
    names = ["her2_class_map", "her2_intensity_histogram", "her2_completeness_vs_intensity"] if cfg.her2 else []
    return names + (["tumour_gate_map"] if cfg.tumour is not None else [])


def write_sample_report(cfg, sample_id: str, paths: dict[str, Path]) -> None:
    """Draw the per-sample QC figures and write the one-page ``report.html``."""
    qc = paths["report"].parent / "qc"
    # Only the columns the figures draw: the report's memory then grows by
    # ~50 bytes per cell, not by the whole table.
    columns = ["X_centroid", "Y_centroid"]
    if cfg.her2 is not None:
        columns += ["her2_class", "her2_membrane_intensity", "her2_completeness", f"{cfg.her2.marker}_membrane_mean"]
    if cfg.tumour is not None:
        columns += ["is_tumour"]
    cells = io.read_csv(paths["cells"], "cells table", usecols=columns)
    summary = io.read_csv(paths["summary"], "summary").iloc[0].to_dict()
    stats_path = paths["unmixing_qc"].with_suffix(".json")
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
    abundances, names = io.read_ome_zarr(paths["zarr"], cfg.chunk_size)
    nuclear = abundances[names.index(cfg.panel_row(role="nuclear_stain").endmember)]

    figures = [(paths["unmixing_qc"], "unmixing: library, mean spectrum and fit, residual map"),
               (paths["segmentation_qc"], "segmentation: nuclei and cell outlines")]
    # drawn even for a sample without cells (empty figures): the workflow declares them as outputs
    if cfg.her2 is not None:
        class_map = qc / "her2_class_map.png"
        _class_map(cells, nuclear, class_map, column="her2_class", colours=CLASS_COLOURS,
                   title="HER2 class per cell")
        thresholds = {k: summary[f"her2_{k}"] for k in ("t_faint", "t_weak", "t_strong")}
        hist, scatter = _her2_figures(cells, cfg.her2.marker, thresholds, cfg.her2.complete_fraction, qc)
        figures[:0] = [(class_map, "HER2 class map"), (hist, "HER2 membrane intensity with thresholds"),
                       (scatter, "completeness vs intensity, coloured by class")]
    if cfg.tumour is not None:
        gate = qc / "tumour_gate_map.png"
        _class_map(cells, nuclear, gate, column="is_tumour", colours={"True": "#d73027", "False": "#4575b4"},
                   title=f"tumour gate on {cfg.tumour.marker} (threshold {summary['tumour_threshold']:.1f})")
        figures.insert(1, (gate, "tumour-cell gate (red: tumour)"))

    rows = [("cells", summary.get("n_cells"))]
    if cfg.tumour is not None:
        rows += [("tumour cells", summary.get("n_tumour_cells")),
                 (f"tumour threshold ({cfg.tumour.marker}, membrane)", summary.get("tumour_threshold"))]
    if cfg.her2 is not None:
        rows += [(f"HER2 {k.replace('plus', '+')} cells (%)", summary.get(f"her2_pct_{k}"))
                 for k in ("0", "1plus", "2plus", "3plus")]
        rows += [(f"HER2 {k}", summary.get(f"her2_{k}")) for k in ("t_faint", "t_weak", "t_strong")]
        rows += [("HER2 thresholds from", summary.get("her2_thresholds_source"))]
    for row in cfg.scored:
        m = row.marker
        rows += [(f"{m} % positive", summary.get(f"{m}_pct_positive")), (f"{m} status", summary.get(f"{m}_status"))]
        if row.score in ("hscore", "allred"):
            rows += [(f"{m} {row.score}", summary.get(f"{m}_{row.score}"))]
        rows += [(f"{m} thresholds t1/t2/t3", "/".join(_fmt(t) for t in (row.t1, row.t2, row.t3)))]
    if "surrogate_subtype" in summary:
        rows += [("surrogate subtype (St Gallen 2013)", summary["surrogate_subtype"])]
    population = "tumour cells" if cfg.tumour is not None else "all cells"

    body = [f"<h1>qdquant report: {html.escape(sample_id)}</h1>"]
    if cfg.her2 is not None:
        body.append(
            f'<p class="score">HER2 {_fmt(summary.get("her2_score"))} '
            f'<span id="her2-category">({_fmt(summary.get("her2_category"))})</span></p>'
        )
    body += [f'<div class="warn">⚠ {html.escape(w)}</div>' for w in sample_warnings(summary, stats, cfg)]
    body.append(f"<p>Percentages and scores are over {population}.</p><table>")
    body += [f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows]
    body.append("</table><h2>Quality control</h2>")
    body += [_img_tag(p, alt) for p, alt in figures if Path(p).is_file()]
    body.append('<h2>Provenance</h2><table id="provenance">')
    body += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
             for k, v in provenance(cfg, sample_id, paths)]
    body.append("</table>")
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>qdquant {html.escape(sample_id)}</title>"
        f"<style>{_CSS}</style></head><body id='sample-{html.escape(sample_id)}'>{''.join(body)}</body></html>"
    )
    with io.atomic_path(paths["report"]) as tmp:
        tmp.write_text(page, encoding="utf-8")


def cohort_columns(cfg, table: pd.DataFrame) -> list[tuple[str, str]]:
    """The cohort page's columns: (summary column, heading), those the table has."""
    columns = [("sample_id", "sample"), ("n_cells", "cells"), ("n_tumour_cells", "tumour cells")]
    if cfg.her2 is not None:
        columns += [(f"her2_pct_{k}", f"HER2 {k.replace('plus', '+')} (%)") for k in ("0", "1plus", "2plus", "3plus")]
        columns += [("her2_score", "HER2 score"), ("her2_category", "HER2 category")]
    for row in cfg.scored:
        m = row.marker
        columns.append((f"{m}_pct_positive", f"{m} % positive"))
        if row.score == "hscore":
            columns.append((f"{m}_hscore", f"{m} H-score"))
        elif row.score == "allred":
            columns.append((f"{m}_allred", f"{m} Allred"))
        columns.append((f"{m}_status", f"{m} status"))
    columns.append(("surrogate_subtype", "surrogate subtype"))
    return [(c, h) for c, h in columns if c in table.columns]


def write_cohort_report(cfg, table: pd.DataFrame, path: Path, warnings: dict[str, list[str]] | None = None) -> None:
    """One row per sample, each linking to its own report: HER2 class percentages, score and
    category, each scored marker's % positive, H-score or Allred and status, and the sample's
    warnings (``warnings``: sample id -> :func:`sample_warnings`)."""
    warnings = warnings or {}
    columns = cohort_columns(cfg, table)
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in columns) + "<th>warnings</th>"
    rows = []
    for _, rec in table.iterrows():
        cells = []
        for c, _ in columns:
            value = _fmt(rec[c])
            if c == "sample_id":
                value = f'<a href="{html.escape(str(rec[c]))}/report.html">{value}</a>'
            cells.append(f"<td>{value}</td>")
        notes = warnings.get(str(rec["sample_id"]), [])
        cells.append(f"<td class='warnings'>{'<br>'.join('⚠ ' + html.escape(w) for w in notes)}</td>")
        rows.append(f"<tr id='cohort-{html.escape(str(rec['sample_id']))}'>{''.join(cells)}</tr>")
    population = "tumour cells" if cfg.tumour is not None else "all cells"
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>qdquant cohort</title><style>{_CSS}</style>"
        f"</head><body><h1>qdquant cohort report</h1><p>{len(table)} samples; percentages and scores over "
        f"{population}; qdquant {html.escape(_version())}</p>"
        f"<table><tr>{head}</tr>{''.join(rows)}</table></body></html>"
    )
    with io.atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
