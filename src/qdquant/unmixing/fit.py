"""The public :func:`unmix`: input checks, the engine, numpy and dask cubes."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import dask.array as da
import numpy as np

from qdquant.errors import InputError
from qdquant.unmixing import kernels, nnls
from qdquant.unmixing.gain import fit_gained_slabs
from qdquant.unmixing.validation import (
    NonFiniteCube,
    as_offset,
    as_spectra,
    check_cube_shape,
    parse_offset,
    raise_if_overflows,
)

ENGINES = ("auto", "numpy", "numba")


@dataclass(frozen=True)
class Tuning:
    """Block sizes and kernel switches of :func:`unmix` (none changes its results beyond rounding).

    Attributes
    ----------
    block_px : int
        Pixels solved together by the numpy engine (memory per block is
        about 60 bytes x bands x this). Default 65536.
    gain_slab_px : int
        Pixels per slab that a gain is applied to before the fit, where the
        kernel does not fold it into its band sums (a float32 slab of 31
        bands: 8 MB, reused). Default 65536.
    strided_slab_px : int
        Pixels per contiguous copy of a cube strided along X, for the numba
        vector kernels (which load 8 neighbouring pixels at once). Default 2**18.
    lh_iter_factor : int
        The numba kernels' Lawson-Hanson outer steps per pixel and start:
        ``lh_iter_factor * K + 1``; pixels that need more are re-solved by
        the numpy engine. Default 3.
    vector_kernels : bool
        Use the numba vector kernels (K <= 12, unweighted) and the table
        path of the scalar one (K <= 8); False runs the scalar kernel's
        Cholesky path for every K. Default True.
    on_fallback : callable, optional
        Called with the (C, n) float64 spectra of the pixels that the numba
        kernel hands to the numpy engine (not converged, or a passive system
        not positive definite), before they are solved. Default None.
    """

    block_px: int = 65536
    gain_slab_px: int = 65536
    strided_slab_px: int = 1 << 18
    lh_iter_factor: int = 3
    vector_kernels: bool = True
    on_fallback: Callable | None = None


def resolve_engine(engine):
    """"numba" or "numpy" for an ``engine`` argument ("auto": numba when it imports)."""
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}")
    if engine == "auto":
        return "numba" if kernels.AVAILABLE else "numpy"
    if engine == "numba" and not kernels.AVAILABLE:
        raise InputError("engine='numba' needs numba, which does not import here")
    return engine


def _unmix_into(cube, a, offset, weights, abund, resid, *, engine, tuning, plan=None, gain=None, gain_offset=None):
    """Unmix a numpy (C, Y, X) cube into preallocated outputs with ``engine`` ("numpy" or "numba").

    numba: the fused kernel, multi-threaded when called from the main thread
    (a dask worker thread runs it single-threaded: dask already works on
    several blocks at once); ``plan`` from
    :func:`qdquant.unmixing.numba_engine.prepare` (made here when None).
    numpy: the FC-NNLS by slabs of rows. ``gain``, ``gain_offset``: fit
    ``apply_gain(cube, gain, gain_offset)``. A numba kernel that fails to
    compile warns and leaves this call to numpy.
    """
    if gain is not None and gain_offset is None:
        gain_offset = np.zeros(cube.shape[0])
    if engine == "numba":
        from qdquant.unmixing import numba_engine

        parallel = threading.current_thread() is threading.main_thread()
        try:
            if plan is None:
                plan = numba_engine.prepare(a, weights, vector_kernels=tuning.vector_kernels,
                                            lh_iter_factor=tuning.lh_iter_factor)
            numba_engine.unmix_into(cube, a, offset, weights, abund, resid, plan=plan, tuning=tuning,
                                    parallel=parallel, gain=gain, gain_offset=gain_offset)
            return
        except numba_engine.numba.core.errors.NumbaError as exc:  # pragma: no cover - a broken numba install
            warnings.warn(f"numba kernel unavailable ({exc.__class__.__name__}: {exc}); using numpy",
                          RuntimeWarning, stacklevel=2)
            engine = "numpy"
    if gain is not None:
        def fit(slab, ab, rs):
            nnls.unmix_into(slab, a, offset, weights, ab, rs, block_px=tuning.block_px)

        fit_gained_slabs(fit, cube, gain, gain_offset, abund, resid, slab_px=tuning.gain_slab_px, engine=engine)
        return
    nnls.unmix_into(cube, a, offset, weights, abund, resid, block_px=tuning.block_px)


def _unmix_block(block, a, offset, weights, engine, tuning, plan, gain=None, gain_offset=None, block_info=None):
    """map_blocks kernel: (C, y, x) -> (K + 1, y, x) float32 (residual last); ``gain``: (1, y, x) or None.

    A NaN or inf is reported at its (band, y, x) in the whole cube (``block_info`` gives the block's origin).
    """
    k = a.shape[1]
    out = np.empty((k + 1,) + block.shape[1:], np.float32)
    if block.size:
        try:
            _unmix_into(block, a, offset, weights, out[:k], out[k], engine=engine, tuning=tuning, plan=plan,
                        gain=None if gain is None else gain[0], gain_offset=gain_offset)
        except NonFiniteCube:
            y0, x0 = (r[0] for r in block_info[0]["array-location"][1:]) if block_info else (0, 0)
            bad = np.argwhere(~np.isfinite(block)) if block.dtype.kind == "f" else ()
            if len(bad):
                b, y, x = bad[0]
                raise InputError(f"cube contains NaN or inf (first at band {b}, y {y0 + y}, x {x0 + x} "
                                 "in this block)") from None
            raise
    return out


def _unmix_dask(cube, a, offset, weights, engine, tuning, gain, gain_offset):
    """:func:`unmix` of a dask cube: lazy (K, Y, X) abundances and (Y, X) residual, a block at a time.

    The numba engine's :class:`~qdquant.unmixing.numba_engine.Plan` is made
    once, here, for every block.
    """
    k = a.shape[1]
    plan = None
    if engine == "numba":
        from qdquant.unmixing import numba_engine

        try:
            plan = numba_engine.prepare(a, weights, vector_kernels=tuning.vector_kernels,
                                        lh_iter_factor=tuning.lh_iter_factor)
        except numba_engine.numba.core.errors.NumbaError as exc:  # pragma: no cover - a broken numba install
            warnings.warn(f"numba kernel unavailable ({exc.__class__.__name__}: {exc}); using numpy",
                          RuntimeWarning, stacklevel=3)
            engine = "numpy"
    cube = cube.rechunk({0: -1})
    if gain is None:
        extra = ()
    else:
        extra = (da.asarray(gain).astype(np.float32)[None].rechunk(((1,),) + cube.chunks[1:]), gain_offset)
    out = da.map_blocks(
        _unmix_block, cube, a, offset, weights, engine, tuning, plan, *extra,
        dtype=np.float32,
        chunks=((k + 1,),) + cube.chunks[1:],
        meta=np.empty((0, 0, 0), np.float32),
    )
    return out[:k], out[k]


def unmix(cube, spectra, *, offset=None, weights=None, gain=None, gain_offset=None, engine="auto", tuning=None):
    """Non-negative least-squares unmixing of a multispectral cube.

    Parameters
    ----------
    cube : (C, Y, X) numpy or dask array, integer or float
        The image, C spectral bands in the row order of ``spectra``, in camera
        counts.
    spectra : (C, K) array_like
        The spectral library, one non-negative column per endmember. A flat
        column (all ones) models a camera dark offset as an endmember.
    offset : None, float, (C,) array_like or "auto", optional
        Dark offset in counts subtracted from every pixel before the fit.
        None: no subtraction (the library may contain a flat endmember
        instead); "auto": :func:`estimate_offset` of ``cube``.
    weights : None or "poisson", optional
        None: ordinary least squares. "poisson": photon-noise-aware fit; the
        unweighted fit gives each band's expected count ``e = A @ x``, then the
        fit is repeated once with each band of each pixel weighted by
        ``1 / max(e, floor)``, ``floor = max(1, 0.01 * max_c e)`` counts, a
        stand-in for the read noise.
    gain : None or (Y, X) array_like, optional
        A per-pixel multiplier of the signal (e.g. the inverse of a field-of-view
        shading profile): the cube fitted is ``gain_offset + gain * (cube -
        gain_offset)`` (:func:`apply_gain`), never as a corrected copy of the
        cube: the 16-lane kernel (9 to 12 endmembers) folds the gain into its
        band sums, the other kernels fit corrected slabs of rows made as the
        fit goes. A dask array for a dask cube is rechunked to the cube's
        chunks.
    gain_offset : None or (C,) array_like, optional
        The part of each band the gain leaves alone (the dark offset, which
        shading does not scale), counts; default zeros.
    engine : {"auto", "numpy", "numba"}, optional
        The solver: "numba", the compiled kernels; "numpy", the fast
        combinatorial NNLS in numpy (same results up to rounding, several
        times slower); "auto" (default), numba when it imports.
    tuning : Tuning, optional
        Block sizes and kernel switches (:class:`Tuning`); the defaults
        suit any cube.

    Returns
    -------
    abundances : (K, Y, X) float32 array
        Non-negative abundances in units of the library's columns.
    residual : (Y, X) float32 array
        Per-pixel root-mean-square residual over the bands, in counts:
        ``sqrt(mean_c (cube - offset - spectra @ abundances)**2)``, unweighted
        also for weighted fits.

    Both outputs are numpy arrays for a numpy cube and lazy dask arrays for a
    dask cube (bands are rechunked into one chunk; compute both together with
    ``dask.compute(abundances, residual)`` to unmix once).

    Raises
    ------
    InputError
        When ``cube`` is not 3-D, ``spectra`` does not match its bands, has
        NaN/inf, negative or all-zero columns, more endmembers than bands or
        linearly dependent columns, or the cube has NaN/inf values (for a dask
        cube, when the offending block is computed).
        Also for an unknown ``engine``, or "numba" without numba.

    Notes
    -----
    The result equals ``scipy.optimize.nnls`` per pixel. With numba (the
    default engine), a compiled kernel reads each pixel once, computes ``A.T @ b``,
    the unconstrained solution and, where that has a negative entry, runs the
    Lawson-Hanson active-set algorithm [2]_ warm-started from its positive
    entries; everything in float64, the residual from the same pass. It runs
    on numba's threads for a numpy cube (on one thread per block for a dask
    cube). The first call for a cube dtype compiles the kernel (seconds;
    cached on disk by numba afterwards). Without numba: the fast combinatorial
    NNLS [1]_ in numpy (all pixels at once, pixels that share a passive set
    solved together; band sums in float32 for a non-float64 cube).
    """
    check_cube_shape(cube)
    c = cube.shape[0]
    a = as_spectra(spectra, c)
    k = a.shape[1]
    offset = parse_offset(offset, cube)
    if weights not in (None, "poisson"):
        raise InputError(f"weights must be None or 'poisson', got {weights!r}")
    if gain is not None:
        if tuple(gain.shape) != tuple(cube.shape[1:]):
            raise InputError(f"gain must have the cube's (Y, X) shape {cube.shape[1:]}, got {gain.shape}")
        gain_offset = np.zeros(c) if gain_offset is None else as_offset(gain_offset, c)
    engine = resolve_engine(engine)
    tuning = Tuning() if tuning is None else tuning
    if isinstance(cube, da.Array):
        return _unmix_dask(cube, a, offset, weights, engine, tuning, gain, gain_offset)
    cube = np.asarray(cube)
    _, h, w = cube.shape
    abund = np.empty((k, h, w), np.float32)
    resid = np.empty((h, w), np.float32)
    try:
        # NaN and inf are found in the pass (a non-finite residual), not by
        # a read of the cube of their own
        _unmix_into(cube, a, offset, weights, abund, resid, engine=engine, tuning=tuning,
                    gain=None if gain is None else np.asarray(gain, dtype=np.float32), gain_offset=gain_offset)
    except NonFiniteCube:
        bad = np.argwhere(~np.isfinite(cube)) if np.issubdtype(cube.dtype, np.floating) else ()
        if len(bad):
            raise InputError(
                f"cube contains NaN or inf (first at band {bad[0][0]}, y {bad[0][1]}, x {bad[0][2]}); "
                f"shape {cube.shape}"
            ) from None
        raise_if_overflows(cube)
        raise
    return abund, resid
