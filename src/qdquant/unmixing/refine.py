"""Library refinement on the slide: each endmember's spectrum shifted (and widened) to fit."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np

from qdquant.config.defaults import default
from qdquant.errors import InputError
from qdquant.unmixing.fit import unmix
from qdquant.unmixing.spectra import flat_columns
from qdquant.unmixing.validation import as_spectra, check_cube_shape, parse_offset


def _shifted_many(spectrum, wl, shifts, widen=1.0, spline=None):
    """:func:`_shifted` for several shifts (and widening factors) at once, (T, C).

    One spline for all of them (``spline``: the spectrum's ``CubicSpline``
    over ``wl``, when the caller keeps one); a row with shift 0 and
    widening 1 is the spectrum itself.
    """
    if spline is None:
        from scipy.interpolate import CubicSpline

        spline = CubicSpline(wl, spectrum)
    shifts = np.atleast_1d(np.asarray(shifts, dtype=np.float64))
    widen = np.broadcast_to(np.asarray(widen, dtype=np.float64), shifts.shape)
    peak = wl[np.argmax(spectrum)]
    src = peak + (wl[None, :] - peak - shifts[:, None]) / widen[:, None]
    out = spline(np.clip(src, wl[0], wl[-1]))
    # beyond the band grid the end bands' slope continues (see _shifted)
    lo = spectrum[0] + (src - wl[0]) * (spectrum[1] - spectrum[0]) / (wl[1] - wl[0])
    hi = spectrum[-1] + (src - wl[-1]) * (spectrum[-1] - spectrum[-2]) / (wl[-1] - wl[-2])
    out = np.clip(np.where(src < wl[0], lo, np.where(src > wl[-1], hi, out)), 0.0, None)
    m = out.max(axis=1, keepdims=True)
    out = np.where(m > 0, out * (spectrum.max() / np.where(m > 0, m, 1.0)), spectrum[None, :])
    out[(shifts == 0) & (widen == 1.0)] = spectrum
    return out


def _shifted(spectrum, wl, shift, widen=1.0):
    """``spectrum`` (sampled at ``wl``) moved by ``shift`` nm and widened about its peak.

    Cubic-spline interpolation inside the band grid; beyond it (light that
    a shift brings in from outside the first or last band) the end bands'
    slope is continued linearly, since holding the edge value would make a
    steep edge, such as DAPI's at the blue end, several per cent too bright
    in the end band. Negative values are clipped; the column keeps its
    original maximum.
    """
    return _shifted_many(spectrum, wl, [shift], widen)[0]


class _OneColumnResidual:
    """Residual of pixels as one library column varies, their passive sets held.

    For pixels ``pixels`` (n, C), pixel-major, unmixed with library ``a``
    (C, K) into ``x`` (K, n), every pixel keeps its passive set P (its nonzero abundances,
    which include column ``j``) and is fitted by least squares on P. With
    Q = P without j, the residual of a pixel is its residual on Q less
    ``(y . a_perp)^2 / |a_perp|^2``, where ``a_perp`` is the trial column's
    part orthogonal to the other passive columns (Gram-Schmidt). Summed
    over the pixels sharing a passive set, that takes their scatter matrix
    ``S`` alone: ``a_perp' S a_perp``. So a trial costs O(groups x C^2),
    whatever the number of pixels. Near the NNLS solution the passive sets
    do not change with a small move of one column, and this is the NNLS
    residual; :func:`refine_library` re-solves NNLS between rounds.
    """

    def __init__(self, pixels, x, a, j):
        c, k = a.shape
        bits = np.int64(1) << np.arange(k, dtype=np.int64)
        code = bits @ (x > 0)
        if k <= 16:  # a radix sort
            code = code.astype(np.uint16)
        order = np.argsort(code, kind="stable")
        sorted_code = code[order]
        edges = np.flatnonzero(np.r_[True, sorted_code[1:] != sorted_code[:-1], True])
        codes = sorted_code[edges[:-1]]
        rows = pixels[order]  # a group's pixels: consecutive rows
        scatter = np.stack([rows[e0:e1].T @ rows[e0:e1] for e0, e1 in zip(edges[:-1], edges[1:])])
        others = (codes.astype(np.int64)[:, None] & bits) != 0  # (G, K): the passive set without j
        others[:, j] = False
        aq = a[None, :, :] * others[:, None, :]  # (G, C, K), columns outside Q zeroed
        gram = (a.T @ a) * (others[:, :, None] & others[:, None, :]) + np.eye(k) * ~others[:, None, :]
        # the projector on the complement of span(A_Q), per group
        self._proj = np.eye(c) - aq @ np.linalg.solve(gram, aq.transpose(0, 2, 1))
        self._scatter = scatter

    def __call__(self, columns):
        """Change of the summed residual for each trial column (T, C): a (T,) array, up to a constant."""
        perp = self._proj @ np.ascontiguousarray(columns.T)  # (G, C, T): M a
        explained = np.einsum("gct,gct->gt", perp, self._scatter @ perp)  # a' M S M a
        norm = np.einsum("gct,gct->gt", perp, perp)  # |M a|^2
        return -(explained / np.maximum(norm, 1e-300)).sum(axis=0)


def _argmin_fine(cost, lo, hi, n=41):
    """The minimiser of ``cost`` (vectorised over trial points) on [lo, hi]: a grid, then a parabola."""
    grid = np.linspace(lo, hi, n)
    values = cost(grid)
    i = int(np.argmin(values))
    if 0 < i < n - 1:  # vertex of the parabola through the best point and its neighbours
        y0, y1, y2 = values[i - 1 : i + 2]
        curv = y0 - 2 * y1 + y2
        if curv > 0:
            step = grid[1] - grid[0]
            return float(grid[i] + 0.5 * step * (y0 - y2) / curv)
    return float(grid[i])


def _best_shift(cost, max_shift_nm):
    """The shift in ``[-max_shift_nm, max_shift_nm]`` that minimises ``cost`` (vectorised over shifts).

    A 13-point grid over the bound finds the basin, a fine grid and a
    parabola about its best point the minimum.
    """
    grid = np.linspace(-max_shift_nm, max_shift_nm, 13)
    i = int(np.argmin(cost(grid)))
    step = grid[1] - grid[0]
    lo, hi = max(-max_shift_nm, grid[i] - step), min(max_shift_nm, grid[i] + step)
    return min(max(_argmin_fine(cost, lo, hi), lo), hi)


def _dominance(x, spectra, flat, min_share):
    """(K, n) bool: endmember k gives at least ``min_share`` of the pixel's stain signal.

    ``x`` (K, n) abundances with library ``spectra`` (C, K); ``flat`` (K,)
    marks the flat (dark-offset) endmembers, which are not signal.
    """
    contrib = x * np.where(flat, 0.0, spectra.sum(axis=0))[:, None]
    return (contrib >= min_share * np.maximum(contrib.sum(axis=0), 1e-300)) & (x > 0)


def _sample_pixels(cube, n_pixels):
    """A strided subsample of at most about ``n_pixels`` pixels, (C, n) float64."""
    c, h, w = cube.shape
    stride = max(1, int(math.ceil(math.sqrt(h * w / n_pixels))))
    sub = cube[:, ::stride, ::stride]
    if isinstance(sub, da.Array):
        sub = sub.compute()
    return np.asarray(sub, dtype=np.float64).reshape(c, -1)


def _report(names, shift, widen, at_bound, shares, sq0, sq1, c):
    """:func:`refine_library`'s report from each pixel's squared residual sum with the library
    (``sq0``) and the refined one (``sq1``), and the pixels each endmember dominates (``shares``, (K, n))."""
    import pandas as pd

    rows = []
    for j, name in enumerate(names):
        sel = np.flatnonzero(shares[j])
        if sel.size:
            before = math.sqrt(sq0[sel].sum() / (c * sel.size))
            after = math.sqrt(sq1[sel].sum() / (c * sel.size))
        else:
            before = after = float("nan")
        rows.append(dict(endmember=name, shift_nm=float(shift[j]), widen=float(widen[j]),
                         at_bound=bool(at_bound[j]), n_pixels=int(sel.size), residual_before=before,
                         residual_after=after))
    report = pd.DataFrame(rows)
    n = sq0.size
    report.attrs["residual_before"] = math.sqrt(sq0.sum() / (c * n))
    report.attrs["residual_after"] = math.sqrt(sq1.sum() / (c * n))
    return report


def _checked_inputs(cube_sample, spectra, wavelengths_nm, max_shift_nm, max_widen, offset):
    """:func:`refine_library`'s library (C, K) float64, its names, the wavelengths and the offset, checked."""
    import pandas as pd

    names = None
    if isinstance(spectra, pd.DataFrame):
        names = [c for c in spectra.columns if c != "wavelength_nm"]
        a0 = spectra[names].to_numpy(dtype=np.float64)
    else:
        a0 = np.array(spectra, dtype=np.float64)
    check_cube_shape(cube_sample)
    c = cube_sample.shape[0]
    a0 = as_spectra(a0, c)
    names = names or [str(i) for i in range(a0.shape[1])]
    wl = np.asarray(wavelengths_nm, dtype=np.float64)
    if wl.shape != (c,) or not np.isfinite(wl).all() or (np.diff(wl) <= 0).any():
        raise InputError(f"wavelengths_nm must be ({c},) increasing finite values, got shape {wl.shape}")
    if not max_shift_nm >= 0 or not 0 <= max_widen < 1:
        raise InputError(f"max_shift_nm must be >= 0 and max_widen in [0, 1); got {max_shift_nm}, {max_widen}")
    return a0, names, wl, parse_offset(offset, cube_sample)


#: A fitted shift within this of ``max_shift_nm`` counts as on the bound, nm.
_AT_BOUND_NM = 0.05
#: Most pixels an endmember's shift is fitted on, per round.
_FIT_PIXELS = 8000


def _fit_endmember(residual, moved, shift, widen, max_shift_nm, max_widen):
    """One endmember's shift, then widening, that minimise ``residual`` of the pixels it dominates.

    ``moved(shifts, widens)`` gives its library spectrum moved and widened;
    ``shift`` and ``widen`` are its current values. Returns ``(shift, widen,
    at_bound)``; an endmember whose best shift lies on the bound keeps its
    library spectrum: ``(0.0, 1.0, True)``.
    """
    at_bound = False
    if max_shift_nm > 0:
        shift = _best_shift(lambda s: residual(moved(s, widen)), max_shift_nm)
        # A best fit on the bound is not a drift the bound allows: the
        # spectrum is absorbing light of another kind (leakage on a
        # slide without the stain, off-library emitters), so keep the
        # library's.
        at_bound = abs(shift) >= max_shift_nm - min(_AT_BOUND_NM, 0.1 * max_shift_nm)
        if at_bound:
            return 0.0, 1.0, True
    if max_widen > 0:
        w = _argmin_fine(lambda w: residual(moved(np.full(len(w), shift), w)), 1 - max_widen, 1 + max_widen)
        widen = min(max(w, 1 - max_widen), 1 + max_widen)
    return shift, widen, at_bound


def refine_library(
    cube_sample,
    spectra,
    wavelengths_nm,
    *,
    max_shift_nm=float(default("unmixing.max_shift_nm")),
    max_widen=0.0,
    n_iter=2,
    offset=None,
    n_pixels=20000,
    min_share=0.5,
    min_pixels=200,
):
    """Adjust each endmember's spectrum to the slide, within a small shift.

    Each (non-flat) endmember k is modelled as its library spectrum moved by
    ``s_k`` nm (``|s_k| <= max_shift_nm``) and, optionally, widened by a
    factor ``w_k`` (``|w_k - 1| <= max_widen``) about its peak. The fit
    alternates NNLS unmixing of a subsample of pixels with, for each
    endmember in turn, a search of ``s_k`` (then ``w_k``) that minimises
    the residual of the pixels that endmember dominates: a 13-point grid
    over the bound (1 nm apart at 6 nm), then a fine grid and a parabola about its best point. Each
    trial keeps the pixels' passive sets from the round's NNLS, so its
    residual comes from the pixels' scatter matrices alone
    (:class:`_OneColumnResidual`, microseconds a trial), and the next
    round's NNLS updates them. An
    endmember whose best shift lies on the bound keeps its library spectrum:
    a real drift lies within the bound, and a fit pressed against it is the
    spectrum absorbing other light (a stain absent from the slide fitting
    leakage, an autofluorescence unlike the library's).

    Parameters
    ----------
    cube_sample : (C, Y, X) numpy or dask array
        The slide, or a part of it, in counts.
    spectra : (C, K) array_like or pandas.DataFrame
        The library; a DataFrame in the ``config/spectra.csv`` format
        (``wavelength_nm`` then endmember columns) is accepted and returned
        in kind.
    wavelengths_nm : (C,) array_like
        Band centres, nm, increasing.
    max_shift_nm : float, optional
        Bound on each endmember's shift, nm. Default: the config schema's
        ``unmixing.max_shift_nm``.
    max_widen : float, optional
        Bound on the relative change of width (0: no widening, the default).
    n_iter : int, optional
        Alternations of unmixing and per-endmember fits. Default 2 (a third
        moves no shift by more than ~0.1 nm on the messy cohort).
    offset : None, float, (C,) array or "auto", optional
        Dark offset, as for :func:`unmix`.
    n_pixels : int, optional
        Pixels in the (strided) subsample. Default 20000.
    min_share : float, optional
        A pixel is dominated by endmember k when k's share of its modelled
        signal is at least this. Default 0.5.
    min_pixels : int, optional
        An endmember is refined only when it dominates at least this many
        pixels of the subsample (default 200): a shift fitted on a handful
        of pixels (a HER2-null slide's few HER2-dominated pixels are noise
        and stray objects) moves the spectrum anywhere within the bound.

    Returns
    -------
    refined : (C, K) array or DataFrame
        The refined library, same kind as ``spectra``; flat endmembers and
        endmembers that dominate fewer than ``min_pixels`` pixels are unchanged.
    report : pandas.DataFrame
        Per endmember: ``endmember``, ``shift_nm``, ``widen``, ``at_bound``
        (its best shift was on the bound, so it kept the library's), ``n_pixels``
        (dominated pixels used), ``residual_before`` and ``residual_after``
        (RMS residual over those pixels, counts, with the library and with
        the refined spectra). ``report.attrs`` has ``residual_before`` and
        ``residual_after`` over the whole subsample.
    """
    import pandas as pd
    from scipy.interpolate import CubicSpline

    a0, names, wl, offset = _checked_inputs(cube_sample, spectra, wavelengths_nm, max_shift_nm, max_widen, offset)
    c, k = a0.shape

    b = _sample_pixels(cube_sample, n_pixels)
    if offset is not None:
        b = b - offset[:, None]
    pixels = np.ascontiguousarray(b.T)  # pixel-major: the pixels of a fit are gathered as rows
    flat = flat_columns(a0)
    shift, widen, at_bound = np.zeros(k), np.ones(k), np.zeros(k, dtype=bool)
    a = a0.copy()
    splines = [CubicSpline(wl, a0[:, j]) for j in range(k)]

    def moved(j, shifts, widens):
        return _shifted_many(a0[:, j], wl, shifts, widens, spline=splines[j])

    for it in range(max(1, int(n_iter))):
        x, r = unmix(b[:, None, :], a)
        x = x[:, 0, :].astype(np.float64)
        if it == 0:  # the library's own fit, for the report
            x0, sq0 = x, r[0].astype(np.float64) ** 2 * c
        shares = _dominance(x, a, flat, min_share)
        for j in np.flatnonzero(~flat):
            sel = np.flatnonzero(shares[j])
            if sel.size < min_pixels:
                continue
            # A regular subset is enough to place the minimum (the residual is a
            # smooth function of the shift).
            sel = sel[:: -(-sel.size // _FIT_PIXELS)]
            residual = _OneColumnResidual(pixels[sel], x[:, sel], a, j)
            shift[j], widen[j], at_bound[j] = _fit_endmember(
                residual, lambda s, w, j=j: moved(j, s, w), shift[j], widen[j], max_shift_nm, max_widen)
            a[:, j] = a0[:, j] if at_bound[j] else moved(j, shift[j], widen[j])[0]

    # report: the NNLS residual of every pixel with either library
    sq1 = unmix(b[:, None, :], a)[1][0].astype(np.float64) ** 2 * c
    report = _report(names, shift, widen, at_bound, _dominance(x0, a0, flat, min_share), sq0, sq1, c)
    if isinstance(spectra, pd.DataFrame):
        refined = spectra.copy()
        refined[names] = a
        return refined, report
    return a, report

