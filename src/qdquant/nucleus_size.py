"""The typical nucleus diameter, estimated from the nuclear-stain image.

:func:`estimate_nucleus_diameter` looks at a few evenly spaced windows of the
image (never the whole slide) in two stages:

1. Scale space: the scale-normalised Laplacian of Gaussian over a geometric
   range of scales; its maxima in (y, x, scale) are the blobs, and a disc of
   diameter ``D`` answers most strongly at ``sigma = D / (2 sqrt 2)``. Of
   two nested blobs (one centred within the other's disc: a chromatin spot
   in its nucleus, a nucleus in a blob of its nest) only the stronger is
   kept; without that, textured nuclei's spots (several per nucleus, at the
   smallest scales) outweighed the nuclei (3.9 um on the simulated messy
   slides, true 7.8 um). The first estimate is the *largest* scale whose
   blobs, summed, answer at least a tenth of the strongest scale: in a nest
   of touching nuclei the nuclear scale answers weakly (the LoG's negative
   surround lies on the bright neighbours), below the chromatin spots and
   isolated bright lymphocytes, so the strongest scale was theirs (4.6-7.5
   um for 10-12 um nuclei on the independent generator's slides).
2. Refinement from above: the nuclei are segmented at 1.3 times that size
   (:func:`qdquant.segmentation.segment_nuclei`'s algorithm, on the windows)
   and the median equivalent diameter of those not cut by a window edge is
   the estimate. Segmenting at too large a size still returns nuclei near
   their own size; segmenting at too small a size splits textured nuclei
   into pieces of about that size, so a fixed point is no test and rounds
   from below drift down. A further round follows only while the median
   is under 3/4 of the size segmented at (a start far above, e.g. at the
   scale of whole nests), at most ``refine`` rounds.

The windows are those with the most stained area (above the midpoint of
the pooled 10th-99th percentiles), not the most contrast, which preferred
bright lymphocyte clusters next to glass over nests of dimmer, larger nuclei.

:func:`resolve_nucleus_diameter` turns the user's setting (``"auto"``, a
number used as given, or a number used as a hint) into the diameter used.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
from scipy import fft
from scipy import ndimage as ndi

from qdquant.errors import InputError

__all__ = ["estimate_nucleus_diameter", "resolve_nucleus_diameter"]

log = logging.getLogger("qdquant")

#: Search range of ``"auto"`` (no hint), micrometres.
AUTO_RANGE_UM = (3.0, 40.0)
#: Search range around a hint, as factors of the hint.
HINT_RANGE = (1 / 3, 3.0)
#: Diameter used when nothing can be estimated and no hint was given, micrometres.
FALLBACK_UM = 8.0
#: A hint up to this factor above the estimate is used itself: the segmentation
#: tolerates a size somewhat too large far better than one too small (the
#: independent generator's 3+ slide, true 12.1 um: nuclei F1 0.80 at 10 um,
#: 0.97 at 14 um), and the simulated messy slides (true 7.8 um, estimate
#: 7.1 um) segment best at 8 um.
AGREE = 1.2
#: ... and a hint up to this factor below it (the estimate is good to about
#: -6 to +7 %; a hint of 8 um kept for 9.7 um nuclei gave F1 0.77).
AGREE_BELOW = 1.1
#: Estimate / hint ratio beyond which the disagreement is logged as a warning.
DISAGREE = 1.5

_SCALES_PER_OCTAVE = 6  # scale-space sampling (factor 2 ** (1/6) ~ 1.12)
_MIN_RESPONSE = 0.1  # smallest blob response kept, units of the window's contrast
_SQRT8 = 2 * math.sqrt(2)  # diameter / sigma of a disc's strongest LoG response
_START = 1.3  # the refinement starts at this multiple of the scale-space estimate
_CANDIDATE = 0.1  # a scale is a candidate with at least this fraction of the strongest summed response
_NEAR = 0.75  # refinement stops once the segmented median is at least this fraction of the size used


def _windows(shape, edge: int, count: int):
    """Up to ``count`` x ``count`` evenly spaced (y0, x0) corners of ``edge``-sized windows."""
    corners = []
    for n in shape:
        k = max(1, min(count, math.ceil(n / edge)))
        corners.append(np.unique(np.linspace(0, max(n - edge, 0), k).round().astype(int)))
    return [(int(y), int(x)) for y in corners[0] for x in corners[1]]


def _read_windows(image, edge: int, grid: int, keep: int) -> list[np.ndarray]:
    """The ``keep`` windows with the most stained area among a ``grid`` x ``grid`` even spread."""
    corners = _windows(tuple(int(v) for v in image.shape), edge, grid)
    parts = [image[y : y + edge, x : x + edge] for y, x in corners]
    if type(image).__module__.startswith("dask"):
        import dask

        parts = dask.compute(*parts, scheduler="threads")
    wins = []
    for p in parts:
        w = np.asarray(p, dtype=np.float32)
        wins.append(np.where(np.isfinite(w), w, 0).astype(np.float32))
    # The most stained area (above the pooled 10th-99th percentile midpoint),
    # not the most contrast: that chose bright lymphocyte clusters next to
    # glass over nests of larger, dimmer nuclei (6 um for 11 um).
    pooled = np.concatenate([w.ravel()[:: max(1, w.size // 20000)] for w in wins if w.size])
    if pooled.size == 0:
        return []
    lo, hi = np.percentile(pooled, [10, 99])
    if not hi > lo:
        return []
    mid = (lo + hi) / 2
    stained = [float(np.mean(w > mid)) if w.size else 0.0 for w in wins]
    order = np.argsort(stained, kind="stable")[::-1][:keep]
    return [wins[i] for i in sorted(order) if stained[i] > 0]


def _log_blobs(window: np.ndarray, sigmas: np.ndarray):
    """Scale-space maxima of the scale-normalised LoG: (index into ``sigmas``, response) per blob.

    The window is normalised by its contrast (99th minus 10th percentile),
    mirrored at its edges (by 3 of the largest sigmas) and filtered in the
    Fourier domain, so every scale costs the same.
    """
    lo, hi = np.percentile(window, [10, 99])
    x = ((window - lo) / max(hi - lo, 1e-12)).astype(np.float32)
    pad = min(int(math.ceil(3 * sigmas[-1])), *(n - 1 for n in x.shape))
    xp = np.pad(x, pad, mode="reflect") if pad > 0 else x
    shape = [fft.next_fast_len(n, real=True) for n in xp.shape]
    spec = fft.rfft2(xp, shape)
    ky = (2 * np.pi * fft.fftfreq(shape[0])[:, None]).astype(np.float32)
    kx = (2 * np.pi * fft.rfftfreq(shape[1])[None, :]).astype(np.float32)
    k2 = ky * ky + kx * kx
    ny, nx = x.shape
    stack = np.empty((len(sigmas), ny, nx), dtype=np.float32)
    for i, s in enumerate(sigmas):  # -s^2 LoG = s^2 k^2 exp(-s^2 k^2 / 2) in Fourier space
        t = np.float32(s * s) * k2
        resp = fft.irfft2(spec * (t * np.exp(-t / 2)), shape)
        stack[i] = resp[pad : pad + ny, pad : pad + nx]
    # A blob: the largest response within +-1 scale and a disc of ~its own
    # radius (sigma * sqrt 2), and above the smallest response kept.
    peak = np.zeros(stack.shape, dtype=bool)
    for i, s in enumerate(sigmas[1:-1], start=1):
        across = np.maximum(np.maximum(stack[i - 1], stack[i]), stack[i + 1])
        size = 2 * max(1, int(round(math.sqrt(2) * s))) + 1
        peak[i] = (stack[i] >= ndi.maximum_filter(across, size=size, mode="nearest")) & (
            stack[i] > _MIN_RESPONSE
        )
    peak[0] = peak[-1] = False  # a maximum at the end of the range is no maximum
    si, yy, xx = np.nonzero(peak)
    # Blobs centred within a radius of the window edge see a mirrored half.
    rad = _SQRT8 * sigmas[si] / 2
    inside = (yy >= rad) & (yy < ny - rad) & (xx >= rad) & (xx < nx - rad)
    si, yy, xx = si[inside], yy[inside], xx[inside]
    keep = _strongest_of_nested(yy, xx, _SQRT8 * sigmas[si] / 2, stack[si, yy, xx])
    return si[keep], stack[si, yy, xx][keep]


def _strongest_of_nested(yy, xx, rad, resp) -> np.ndarray:
    """Which blobs answer more strongly than every blob they are nested with.

    Two blobs are nested when the centre of one lies within the disc
    (radius ``rad``, the diameter of the scale over 2) of the other: a
    chromatin spot inside its nucleus, or a nucleus inside a blob of its
    whole nest. Of such a pair only the stronger one is a nucleus
    candidate; textured nuclei otherwise add a crowd of small blobs (several
    per nucleus) that outweighs the nuclei themselves. Greedy, strongest first.
    """
    from scipy.spatial import cKDTree

    order = np.argsort(resp, kind="stable")[::-1]
    keep = np.zeros(resp.size, dtype=bool)
    if resp.size == 0:
        return keep
    pts = np.column_stack([yy, xx]).astype(np.float64)
    tree = cKDTree(pts)
    taken = np.zeros(resp.size, dtype=bool)  # suppressed by a stronger kept blob
    rmax = float(rad.max())
    for i in order:
        if taken[i]:
            continue
        keep[i] = True
        near = np.asarray(tree.query_ball_point(pts[i], rad[i] + rmax), dtype=np.intp)
        if near.size:
            dist = np.hypot(*(pts[near] - pts[i]).T)
            taken[near[(dist < rad[i]) | (dist < rad[near])]] = True
    return keep


def _segmented_diameters(window: np.ndarray, d_px: float) -> np.ndarray:
    """Equivalent diameters (px) of the nuclei segmented at ``d_px``, edge-cut ones left out."""
    from qdquant import segmentation as seg

    r = d_px / 2
    stats = seg._image_stats(window, r, max(seg._SMOOTH_Q * r, 0.7))
    lab = seg._nuclei_tile(window, stats, r)
    n = int(lab.max())
    if n == 0:
        return np.empty(0)
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    area = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
    area[edge] = 0
    area[0] = 0
    return 2 * np.sqrt(area[area > 0] / np.pi)


def estimate_nucleus_diameter(
    image,
    pixel_size_um: float,
    *,
    hint_um: float | None = None,
    range_um: tuple[float, float] | None = None,
    window_px: int | None = None,
    windows: int = 4,
    refine: int = 6,
) -> float:
    """Estimate the typical nucleus diameter of a nuclear-stain image.

    Parameters
    ----------
    image : (M, N) array_like of float
        Nuclear-stain abundance (DAPI, Hoechst, histone...), arbitrary units;
        NumPy or dask array (a dask slide is read only at the sampled
        windows). Smooth background, shading and noise are tolerated.
    pixel_size_um : float
        Pixel edge, micrometres.
    hint_um : float, optional
        A guess of the diameter, micrometres: the search covers
        ``HINT_RANGE`` (1/3 to 3 times) around it. Without a hint the search
        covers ``AUTO_RANGE_UM`` (3 to 40 um).
    range_um : (float, float), optional
        Search range, micrometres; overrides both of the above.
    window_px : int, optional
        Edge of the sampled windows, pixels. Default: 8 times the largest
        diameter searched, at least 384 px. An image of at most ``windows``
        such windows is used whole.
    windows : int, optional
        How many windows are used: those with the most stained area among ``windows`` x ``windows`` evenly spaced ones
        (fewer on a small image).
    refine : int, optional
        Most refinement rounds (segmentation at the current estimate; they
        stop once the median segmented size is at least 3/4 of the size
        segmented at); 0 gives 1.3 times the scale-space estimate.

    Returns
    -------
    diameter_um : float
        Median equivalent diameter (of a disc of the same area) of the
        nuclei, micrometres, within the search range; NaN, with a
        :class:`UserWarning`, when the windows show no blobs (an empty or
        flat image).

    Raises
    ------
    InputError
        If ``image`` is not 2-D, or a length is not a positive number.
    """
    from qdquant import segmentation as seg

    image = seg._check_image(image)
    lengths = {} if hint_um is None else {"hint_um": hint_um}
    ps, vals = seg._check_scale(pixel_size_um, **lengths)
    if range_um is None:
        range_um = AUTO_RANGE_UM if hint_um is None else (vals[0] * HINT_RANGE[0], vals[0] * HINT_RANGE[1])
    lo_um, hi_um = (float(v) for v in range_um)
    if not (np.isfinite(lo_um) and np.isfinite(hi_um) and 0 < lo_um < hi_um):
        raise InputError(f"range_um must be two increasing positive lengths, got {range_um!r}")
    lo_px, hi_px = max(lo_um / ps, 3.0), hi_um / ps
    edge = int(window_px) if window_px is not None else max(384, int(math.ceil(8 * hi_px)))
    if image.shape[0] * image.shape[1] <= int(windows) * edge * edge:
        edge = max(int(v) for v in image.shape)  # small image: all of it, once
    hi_px = min(hi_px, edge / 3)
    if not lo_px < hi_px:
        warnings.warn(
            f"estimate_nucleus_diameter: search range {lo_um:g}-{hi_um:g} um is under 3 px or over a third "
            f"of the {edge} px window at pixel_size_um={ps:g}; no estimate", UserWarning, stacklevel=2,
        )
        return math.nan
    wins = _read_windows(image, edge, int(windows), int(windows))
    octaves = math.log2(hi_px / lo_px)
    sigmas = np.geomspace(lo_px, hi_px, max(3, int(math.ceil(octaves * _SCALES_PER_OCTAVE)) + 1)) / _SQRT8
    # One scale beyond each end, so that the ends themselves can be maxima.
    step = sigmas[1] / sigmas[0]
    sigmas = np.concatenate([[sigmas[0] / step], sigmas, [sigmas[-1] * step]])
    found = [_log_blobs(w, sigmas) for w in wins]
    scale = np.concatenate([f[0] for f in found]) if found else np.empty(0, dtype=np.intp)
    resp = np.concatenate([f[1] for f in found]) if found else np.empty(0)
    if scale.size == 0:
        warnings.warn(
            f"estimate_nucleus_diameter: no nuclei-like blobs in image of shape {tuple(image.shape)}; no estimate",
            UserWarning, stacklevel=2,
        )
        return math.nan
    # The largest scale whose blobs answer, summed, at least _CANDIDATE of the
    # strongest scale: in crowded nests the nuclear scale answers weakly
    # (the LoG's negative surround lies on the neighbours), below chromatin
    # spots and isolated small nuclei; starting too high costs only rounds.
    summed = np.bincount(scale, weights=resp, minlength=len(sigmas))
    d_px = _SQRT8 * float(sigmas[np.nonzero(summed >= _CANDIDATE * summed.max())[0][-1]])
    # Refinement from above: segmenting at too small a size splits textured
    # nuclei into pieces of about that size (no pull back up), while too
    # large a size still returns nuclei near their own size.
    d_px = float(np.clip(_START * d_px, lo_px, hi_px))
    for _ in range(int(refine)):
        sizes = np.concatenate([_segmented_diameters(w, d_px) for w in wins])
        if sizes.size == 0:
            break
        new = float(np.clip(np.median(sizes), lo_px, hi_px))
        done = new >= _NEAR * d_px  # d_px was within 1 / _NEAR of the nuclei's own size
        d_px = new
        if done:
            break
    return d_px * ps


def resolve_nucleus_diameter(image, pixel_size_um: float, nucleus_diameter_um, *, hint: bool = False):
    """The nucleus diameter to segment with, from the user's setting.

    Parameters
    ----------
    image : (M, N) array_like of float
        Nuclear-stain abundance (NumPy or dask; read only at a few windows).
    pixel_size_um : float
        Pixel edge, micrometres.
    nucleus_diameter_um : float or "auto"
        ``"auto"``: estimated from the image (3 to 40 um). A number: used as
        given, or with ``hint=True`` the estimate searched within 1/3 to 3
        times it (the number itself where it is at most 1.2 times above or
        1.1 times below the estimate).
    hint : bool, optional
        Whether a number is a hint rather than the diameter itself.

    Returns
    -------
    used_um : float
        The diameter to use, micrometres. Where nothing can be estimated
        (an empty image) it is the hint, or 8 um without one (with a
        :class:`UserWarning` from the estimate).
    estimate_um : float
        The estimate (NaN when not estimated or nothing was found).

    Raises
    ------
    InputError
        If the setting is neither ``"auto"`` nor a positive number.

    Notes
    -----
    A hint at most ``AGREE`` (1.2) times above the estimate or
    ``AGREE_BELOW`` (1.1) times below it is used as it is: the estimate is
    good to about -6 to +7 %, and the segmentation suffers far more from a
    size too small than too large (the simulated messy slides: nuclei F1
    0.94-0.97 at 8 um, 0.85-0.90 at the estimate of 7.1 um; true 7.8 um).
    An estimate more than 1.5 times off its hint is logged as a warning on
    the ``qdquant`` logger.
    """
    if isinstance(nucleus_diameter_um, str):
        if nucleus_diameter_um != "auto":
            raise InputError(f"nucleus_diameter_um must be 'auto' or a number, got {nucleus_diameter_um!r}")
        est = estimate_nucleus_diameter(image, pixel_size_um)
        return (FALLBACK_UM if math.isnan(est) else est), est
    from qdquant import segmentation as seg

    _, (d,) = seg._check_scale(pixel_size_um, nucleus_diameter_um=nucleus_diameter_um)
    if not hint:
        return d, math.nan
    est = estimate_nucleus_diameter(image, pixel_size_um, hint_um=d)
    if math.isnan(est):
        return d, est
    if 1 / AGREE <= est / d <= AGREE_BELOW:
        return d, est  # the estimate does not contradict the hint
    if not 1 / DISAGREE <= est / d <= DISAGREE:
        log.warning(
            "nucleus diameter: estimated %.1f um from the image, %.1f times the hint of %g um; using %.1f um",
            est, est / d, d, est,
        )
    return est, est
