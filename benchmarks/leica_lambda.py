"""Unmix a real Leica SP2 excitation/emission ("lambda") stack with qdquant.

Usage::

    python benchmarks/leica_lambda.py [--data DIR] [--figure docs/leica_unmixing.png]
                                      [--no-gain-fit] [--no-refine]

The stack (PoissonNMF example "3dyeLeica", 12 uint8 images 512x512:
excitation 488 / 514 / 561 nm x 4 emission bands of 20 nm) shows cells
stained with ethidium bromide (nuclei), Alexa 532-phalloidin (actin) and an
Alexa 488 antibody (microtubules). The library is predicted from published
dye spectra (PubSpectra) and the channel settings read from the Leica
metadata (:func:`qdquant.library.parse_leica_channels`,
:func:`qdquant.library.mixing_matrix_from_dye_spectra`):

- Ethidium bromide: emission ``Ethidium_bromide.emn``; no excitation table
  is shipped, so the mirror image of the emission with the excitation peak
  of DNA-bound EtBr (518 nm) is used.
- Alexa Fluor 532: ``Alexa_Fluor_532.emn`` in the library is in fact its
  excitation spectrum (400-570 nm, peak 530 nm); the emission is its mirror
  image with the emission peak of 554 nm.
- Alexa Fluor 488: emission ``Alexa_Fluor_488.emn``; excitation the mirror
  image with peak 495 nm (``A488.exc`` is a coarse 7-point sketch).

The dark offset is estimated per channel (1st percentile) and subtracted.
The script prints the relative residual ``||residual|| / ||cube - offset||``
over the tissue (pixels whose offset-removed total is above the image's
median), first with the dye-spectra library as it is, then after fitting
one relative gain per laser line and per detector (PMT) to the image
(7 free parameters: laser power and PMT voltage are not calibrated in the
metadata), then after library refinement on the stack (one emission shift
per dye, at most 6 nm as the pipeline's ``max_shift_nm`` default, the gains
refitted with each trial), and writes a small figure of the three abundance
maps and the residual map.
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import numpy as np
import tifffile

from qdquant.library import (
    mirror_spectrum,
    mixing_matrix_from_dye_spectra,
    parse_leica_channels,
    read_spectrum_table,
)
from qdquant.unmixing import estimate_offset, unmix

DATA = Path("/work/shared/data/poissonnmf_spectra_and_leica_lambda")
NAMES = ("EtBr", "A532", "A488")
TARGETS = ("nuclei (EtBr)", "actin (Alexa 532)", "microtubules (Alexa 488)")


def load_stack(data=DATA):
    """Cube (12, 512, 512) uint8 and the channel table."""
    folder = Path(data) / "3dyeLeica"
    files = sorted(glob.glob(str(folder / "*_ch[0-9][0-9].tif")))
    if len(files) != 12:
        raise FileNotFoundError(f"{folder}: expected 12 *_chNN.tif images, found {len(files)}")
    cube = np.stack([tifffile.imread(f) for f in files])
    channels = parse_leica_channels(folder / "03_metadata_ascii.txt")
    return cube, channels


def dye_tables(data=DATA):
    lib = Path(data) / "SpectraLibrary"
    etbr_em = read_spectrum_table(lib / "Ethidium_bromide.emn")
    a532_ex = read_spectrum_table(lib / "Alexa_Fluor_532.emn")  # an excitation spectrum
    a488_em = read_spectrum_table(lib / "Alexa_Fluor_488.emn")
    return {
        "EtBr": (mirror_spectrum(etbr_em, 518.0), etbr_em),
        "A532": (a532_ex, mirror_spectrum(a532_ex, 554.0)),
        "A488": (mirror_spectrum(a488_em, 495.0), a488_em),
    }


def fit_channel_gains(cube, spectra, offset, laser, pmt, *, n_iter=8, tissue=None):
    """Fit gain[c] = L[laser of c] * D[pmt of c] by alternating NNLS and least squares.

    Returns the (C,) gains (geometric mean 1) and the refitted spectra.
    """
    c = cube.shape[0]
    b = cube.reshape(c, -1).astype(np.float64) - offset[:, None]
    if tissue is not None:
        b = b[:, tissue.ravel()]
    lasers, li = np.unique(laser, return_inverse=True)
    pmts, pi = np.unique(pmt, return_inverse=True)
    log_l, log_d = np.zeros(lasers.size), np.zeros(pmts.size)
    gain = np.ones(c)
    for _ in range(n_iter):
        a = spectra * gain[:, None]
        a = a / a.max(axis=0)
        x, _ = unmix(b[:, None, :], a)
        model = a @ x[:, 0, :].astype(np.float64)
        # per-channel scale that best maps the model onto the data
        s = (b * model).sum(axis=1) / np.maximum((model * model).sum(axis=1), 1e-12)
        # project log(gain * s) onto the separable laser x detector form
        target = np.log(np.maximum(gain * s, 1e-6))
        design = np.zeros((c, lasers.size + pmts.size))
        design[np.arange(c), li] = 1
        design[np.arange(c), lasers.size + pi] = 1
        coef = np.linalg.lstsq(design, target, rcond=None)[0]
        log_l, log_d = coef[: lasers.size], coef[lasers.size:]
        gain = np.exp(log_l[li] + log_d[pi])
        gain /= np.exp(np.log(gain).mean())
    a = spectra * gain[:, None]
    return gain, a / a.max(axis=0)


def shifted_emission(tables, shifts):
    """The dye tables with each dye's emission spectrum moved by its shift (nm)."""
    out = {}
    for name, (exc, emn) in tables.items():
        moved = np.array(emn, dtype=np.float64)
        moved[:, 0] += shifts.get(name, 0.0)
        out[name] = (exc, moved)
    return out


def refine_emission_shifts(cube, channels, tables, offset, tissue, *, max_shift_nm=6.0, n_rounds=2,
                           n_pixels=20000):
    """Library refinement on the stack: one emission shift per dye, with the channel gains refitted.

    Each dye's emission spectrum is moved by ``s`` nm (``|s| <= max_shift_nm``;
    mounting, binding and the mirrored guesses move it), in turn, by a
    coarse grid then a bounded scalar search that minimises the relative
    residual over a subsample of tissue pixels, the laser x detector gains
    being refitted for every trial. Returns the shifts (nm) and the final
    (gains included) mixing matrix.
    """
    from scipy.optimize import minimize_scalar

    bands = channels[["band_low_nm", "band_high_nm"]].to_numpy()
    laser, pmt = channels["excitation_nm"].to_numpy(), channels["pmt"].to_numpy()
    idx = np.flatnonzero(tissue.ravel())
    idx = idx[:: max(1, idx.size // n_pixels)]
    sample = cube.reshape(cube.shape[0], -1)[:, idx].reshape(cube.shape[0], 1, -1)
    keep = np.ones(sample.shape[1:], bool)

    def fitted(shifts):
        spectra = mixing_matrix_from_dye_spectra(laser, bands, shifted_emission(tables, shifts))
        return fit_channel_gains(sample, spectra, offset, laser, pmt, n_iter=4, tissue=keep)[1]

    def cost(shifts):
        _, resid = unmix(sample, fitted(shifts), offset=offset)
        return relative_residual(resid, sample, offset, keep)

    shifts = {name: 0.0 for name in tables}
    for _ in range(n_rounds):
        for name in tables:
            def trial(v, name=name):
                return cost({**shifts, name: v})

            grid = np.linspace(-max_shift_nm, max_shift_nm, 11)
            costs = [trial(v) for v in grid]
            i = int(np.argmin(costs))
            step = grid[1] - grid[0]
            res = minimize_scalar(trial, bounds=(max(-max_shift_nm, grid[i] - step), min(max_shift_nm, grid[i] + step)),
                                  method="bounded", options={"xatol": 0.05})
            shifts[name] = float(res.x) if res.fun <= costs[i] else float(grid[i])
    bands_all = mixing_matrix_from_dye_spectra(laser, bands, shifted_emission(tables, shifts))
    return shifts, fit_channel_gains(cube, bands_all, offset, laser, pmt, tissue=tissue)[1]


def relative_residual(residual, cube, offset, tissue):
    b = cube.astype(np.float64) - offset[:, None, None]
    num = (residual[tissue].astype(np.float64) ** 2).sum() * cube.shape[0]
    return float(np.sqrt(num / (b[:, tissue] ** 2).sum()))


def save_figure(path, abund, residual, names=TARGETS):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.3), dpi=90)
    FigureCanvasAgg(fig)
    panels = list(zip(abund, names)) + [(residual, "RMS residual (counts)")]
    for i, (img, title) in enumerate(panels):
        ax = fig.add_subplot(1, 4, i + 1)
        hi = np.percentile(img, 99.5)
        im = ax.imshow(img[::2, ::2], cmap="magma" if i < 3 else "viridis", vmin=0, vmax=hi)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    fig.tight_layout(pad=0.3)
    fig.savefig(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--figure", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "leica_unmixing.png")
    ap.add_argument("--no-gain-fit", action="store_true", help="skip the laser x detector gain fit")
    ap.add_argument("--no-refine", action="store_true", help="skip the emission-shift refinement")
    args = ap.parse_args(argv)

    cube, channels = load_stack(args.data)
    bands = channels[["band_low_nm", "band_high_nm"]].to_numpy()
    spectra = mixing_matrix_from_dye_spectra(channels["excitation_nm"], bands, dye_tables(args.data))
    offset = estimate_offset(cube)
    total = (cube.astype(np.float64) - offset[:, None, None]).sum(axis=0)
    tissue = total > np.median(total)
    print("channels:")
    print(channels.to_string(index=False))
    print("offset (counts):", np.round(offset, 1))

    abund, resid = unmix(cube, spectra, offset=offset)
    rel = relative_residual(resid, cube, offset, tissue)
    print(f"dye-spectra library: relative residual over tissue {rel:.4f}")
    if not args.no_gain_fit:
        gain, spectra = fit_channel_gains(
            cube, spectra, offset, channels["excitation_nm"].to_numpy(), channels["pmt"].to_numpy(),
            tissue=tissue,
        )
        abund, resid = unmix(cube, spectra, offset=offset)
        rel = relative_residual(resid, cube, offset, tissue)
        print("fitted channel gains:", np.round(gain, 3))
        print(f"with fitted laser x detector gains: relative residual over tissue {rel:.4f}")
        if not args.no_refine:
            shifts, spectra = refine_emission_shifts(cube, channels, dye_tables(args.data), offset, tissue)
            abund, resid = unmix(cube, spectra, offset=offset)
            rel = relative_residual(resid, cube, offset, tissue)
            print("refined emission shifts (nm):", {k: round(v, 1) for k, v in shifts.items()})
            print(f"with refined emission spectra and gains: relative residual over tissue {rel:.4f}")
    print("library used (columns", ", ".join(NAMES), "):")
    print(np.round(spectra, 3))
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    save_figure(args.figure, abund, resid)
    print(f"figure: {args.figure} ({args.figure.stat().st_size / 1024:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
