"""Tests of qdquant.unmixing: NNLS against scipy, offsets, weights, validation.

The solver tests run with each engine of ``unmix``: the numba kernel (its
table-driven vector kernels, 8 lanes for K <= 8 and 16 for K = 9..12, and the
Cholesky path used beyond), and the pure-numpy FC-NNLS that ``unmix`` uses
when numba cannot be imported.
"""

from __future__ import annotations

import warnings
from functools import partial

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import nnls

from conftest import REPO
from qdquant.errors import InputError
from qdquant.unmixing import (
    CONDITION_LIMIT,
    LibraryCheck,
    Tuning,
    check_library,
    estimate_offset,
    refine_library,
    unmix,
)
from qdquant.unmixing import kernels
from qdquant.unmixing.fit import resolve_engine

if kernels.AVAILABLE:
    from qdquant.unmixing.kernels.lanes import lane_kernel

HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ENGINES = ["numpy"] + (["numba", "numba-cholesky"] if kernels.AVAILABLE else [])
with_engines = pytest.mark.parametrize("engine_name", ENGINES)


def engine(name, **tuning):
    """``unmix`` with one engine: "numpy", "numba" or "numba-cholesky" (the scalar
    kernel's Cholesky path for every K), and ``tuning`` (:class:`Tuning` fields)."""
    return partial(unmix, engine="numpy" if name == "numpy" else "numba",
                   tuning=Tuning(vector_kernels=name != "numba-cholesky", **tuning))

WL = np.arange(500.0, 700.0, 10.0)  # 20 bands


def gaussians(centres, widths, wl=WL):
    a = np.stack([np.exp(-0.5 * ((wl - c) / w) ** 2) for c, w in zip(centres, widths)], axis=1)
    return a / a.max(axis=0)


def scipy_unmix(cube, a, offset=None):
    c, h, w = cube.shape
    px = cube.reshape(c, -1).astype(np.float64)
    if offset is not None:
        px = px - np.asarray(offset, dtype=np.float64).reshape(-1, 1)
    x = np.stack([nnls(a, px[:, i], maxiter=100 * a.shape[1])[0] for i in range(px.shape[1])], axis=1)
    return x.reshape(-1, h, w)


def assert_close_per_pixel(x, x_ref, rtol=1e-4):
    """||x - x_ref|| <= rtol * max(1, ||x_ref||) for every pixel (norm over endmembers)."""
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    x_ref = x_ref.reshape(x_ref.shape[0], -1)
    err = np.linalg.norm(x - x_ref, axis=0)
    bound = rtol * np.maximum(1.0, np.linalg.norm(x_ref, axis=0))
    worst = np.argmax(err / bound)
    assert (err <= bound).all(), (
        f"pixel {worst}: |x - x_ref| = {err[worst]:.3g} > {bound[worst]:.3g}; "
        f"x {x[:, worst]}, ref {x_ref[:, worst]}"
    )


def cond(a):
    u = a / np.linalg.norm(a, axis=0)
    s = np.linalg.svd(u, compute_uv=False)
    return s[0] / s[-1]


@st.composite
def problems(draw, ill=False, k_range=None):
    """A random NNLS problem: spectra (C, K) and a float64 cube (C, Y, X).

    ``k_range``: (min, max) endmembers; default 1 (2 when ill) to 6.
    """
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    k = draw(st.integers(*(k_range or (2 if ill else 1, 6))))
    c = draw(st.integers(max(k + int(ill), 3), 24 if k_range is None else 40))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 7 if k_range is None else 40))
    a = rng.uniform(0.0, 1.0, (c, k))
    if ill:
        # two near-collinear columns, tuned to a condition number of 1e3..1e4
        target = 10 ** draw(st.floats(3.0, 4.0))
        i, j = rng.choice(k, 2, replace=False)
        base, bump = a[:, i].copy(), rng.uniform(0.0, 1.0, c)
        eps = 1e-3
        for _ in range(6):
            a[:, j] = base + eps * bump
            eps *= cond(a) / target
    x = rng.gamma(1.0, 50.0, (k, h * w)) * (rng.random((k, h * w)) < 0.6)
    scale = draw(st.sampled_from([0.0, 1.0, 10.0]))
    cube = a @ x + scale * rng.normal(size=(c, h * w))
    return a, cube.reshape(c, h, w)


# --------------------------------------------------------------------------
# equality with scipy.optimize.nnls
# --------------------------------------------------------------------------


@with_engines
@HYP
@given(problems())
def test_matches_scipy_well_conditioned(engine_name, problem):
    a, cube = problem
    fit = engine(engine_name)
    abund, resid = fit(cube, a)
    assert abund.shape == (a.shape[1],) + cube.shape[1:] and abund.dtype == np.float32
    assert resid.shape == cube.shape[1:] and resid.dtype == np.float32
    assert (abund >= 0).all()
    assert_close_per_pixel(abund, scipy_unmix(cube, a))


@with_engines
@HYP
@given(problems(ill=True))
def test_matches_scipy_ill_conditioned(engine_name, problem):
    a, cube = problem
    assert 5e2 < cond(a) < 2e4
    fit = engine(engine_name)
    abund, _ = fit(cube, a)
    ref = scipy_unmix(cube, a)
    assert_close_per_pixel(abund, ref)
    # and the objective is at least as good as scipy's
    px = cube.reshape(cube.shape[0], -1)
    ours = np.linalg.norm(px - a @ abund.reshape(a.shape[1], -1).astype(np.float64), axis=0)
    theirs = np.linalg.norm(px - a @ ref.reshape(a.shape[1], -1), axis=0)
    assert (ours <= theirs * (1 + 1e-6) + 1e-6 * np.linalg.norm(px, axis=0)).all()


@with_engines
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(k_range=(9, 12)), st.booleans())
def test_nine_to_twelve_endmembers_match_scipy(engine_name, problem, ill):
    # the numba kernel's 16-lane vectors (K = 9..12); rows up to 40 pixels
    # (full and short blocks of 8); near-collinear columns when ill
    a, cube = problem
    if ill:
        a = a.copy()
        rng = np.random.default_rng(int(cube.size))
        bump = rng.uniform(0.0, 1.0, a.shape[0])
        eps = 1e-2
        for _ in range(6):
            a[:, 1] = a[:, 0] + eps * bump
            eps *= cond(a) / 3e3
        assert 5e2 < cond(a) < 2e4
    fit = engine(engine_name)
    abund, resid = fit(cube, a)
    assert (abund >= 0).all()
    ref = scipy_unmix(cube, a)
    assert_close_per_pixel(abund, ref)
    px = cube.reshape(cube.shape[0], -1)
    expected = np.sqrt(((px - a @ abund.reshape(a.shape[1], -1).astype(np.float64)) ** 2).mean(axis=0))
    np.testing.assert_allclose(resid.ravel(), expected, rtol=1e-5, atol=1e-4)


@with_engines
@HYP
@given(problems(), st.data())
def test_dask_matches_scipy(engine_name, problem, data):
    a, cube = problem
    c, h, w = cube.shape
    chunks = (data.draw(st.integers(1, c)), data.draw(st.integers(1, h)), data.draw(st.integers(1, w)))
    d = da.from_array(cube, chunks=chunks)
    fit = engine(engine_name)
    abund, resid = fit(d, a)
    assert isinstance(abund, da.Array) and isinstance(resid, da.Array)
    abund, resid = da.compute(abund, resid)
    np.testing.assert_allclose(resid, fit(cube, a)[1], rtol=1e-5, atol=1e-5)
    assert_close_per_pixel(abund, scipy_unmix(cube, a))


@with_engines
@settings(max_examples=30, deadline=None)
@given(problems(ill=True), st.data())
def test_dask_matches_scipy_ill_conditioned(engine_name, problem, data):
    a, cube = problem
    c, h, w = cube.shape
    d = da.from_array(cube, chunks=(data.draw(st.integers(1, c)), data.draw(st.integers(1, h)), w))
    fit = engine(engine_name)
    abund = fit(d, a)[0].compute()
    assert_close_per_pixel(abund, scipy_unmix(cube, a))


@with_engines
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32])
def test_input_dtypes(engine_name, dtype):
    rng = np.random.default_rng(1)
    a = gaussians([520, 560, 600, 650], [15, 20, 15, 30])
    x = rng.gamma(1.0, 30.0, (4, 12, 9)) * (rng.random((4, 12, 9)) < 0.5)
    cube = np.clip(np.einsum("ck,kyx->cyx", a, x) + rng.normal(0, 2, (20, 12, 9)) + 5, 0, 250)
    cube = cube.astype(dtype)
    fit = engine(engine_name)
    abund, resid = fit(cube, a)
    assert abund.dtype == np.float32 and resid.dtype == np.float32
    assert_close_per_pixel(abund, scipy_unmix(cube, a))


@with_engines
def test_many_endmembers_matches_scipy(engine_name):
    # K >= 16 uses the wide passive-set codes
    rng = np.random.default_rng(2)
    wl = np.linspace(450, 750, 40)
    a = gaussians(np.linspace(460, 740, 17), [12.0] * 17, wl)
    x = rng.gamma(1.0, 20.0, (17, 5, 8)) * (rng.random((17, 5, 8)) < 0.4)
    cube = np.einsum("ck,kyx->cyx", a, x) + rng.normal(0, 1.0, (40, 5, 8))
    fit = engine(engine_name)
    abund = fit(cube, a)[0]
    assert_close_per_pixel(abund, scipy_unmix(cube, a))


@with_engines
def test_residual_is_rms_over_bands(engine_name):
    rng = np.random.default_rng(3)
    a = gaussians([530, 600], [20, 25])
    cube = rng.uniform(0, 50, (20, 6, 5))
    fit = engine(engine_name)
    abund, resid = fit(cube, a, offset=3.0)
    model = np.einsum("ck,kyx->cyx", a, abund.astype(np.float64))
    expected = np.sqrt(((cube - 3.0 - model) ** 2).mean(axis=0))
    np.testing.assert_allclose(resid, expected, rtol=1e-5, atol=1e-4)


@with_engines
def test_exact_mixture_has_zero_residual_and_edge_pixels(engine_name):
    a = gaussians([530, 600, 650], [20, 25, 30])
    x = np.zeros((3, 2, 3))
    x[:, 0, 0] = [10, 0, 5]
    x[:, 0, 1] = [0, 0, 0]  # an all-zero pixel
    x[:, 0, 2] = [1e4, 2e4, 1]
    x[:, 1, :] = [[7], [8], [9]]
    cube = np.einsum("ck,kyx->cyx", a, x)
    cube[:, 1, 2] = -5.0  # a pixel below the offset: all abundances 0
    fit = engine(engine_name)
    abund, resid = fit(cube, a)
    x[:, 1, 2] = 0
    np.testing.assert_allclose(abund, x, rtol=1e-5, atol=1e-6)
    assert resid[0, :2].max() < 1e-6
    assert resid[1, 2] == pytest.approx(5.0, rel=1e-6)


@with_engines
def test_inputs_not_mutated(engine_name):
    rng = np.random.default_rng(4)
    a = gaussians([530, 600], [20, 25])
    cube = rng.uniform(0, 50, (20, 4, 4)).astype(np.float32)
    cube0, a0 = cube.copy(), a.copy()
    fit = engine(engine_name)
    fit(cube, a, offset=np.full(20, 2.0), weights="poisson")
    fit(cube, a)
    np.testing.assert_array_equal(cube, cube0)
    np.testing.assert_array_equal(a, a0)


# --------------------------------------------------------------------------
# recovery, offsets, Poisson weights
# --------------------------------------------------------------------------


def simulated_cube(rng, shape=(40, 40), offset=None):
    a = gaussians([520, 560, 600, 640, 600], [12, 12, 12, 12, 80])
    k = a.shape[1]
    x = rng.gamma(2.0, 60.0, (k,) + shape) * (rng.random((k,) + shape) < 0.5)
    x[-1] = rng.gamma(4.0, 5.0, shape)  # broad autofluorescence everywhere
    clean = np.einsum("ck,kyx->cyx", a, x)
    cube = rng.poisson(clean).astype(np.float64)
    if offset is not None:
        cube += np.asarray(offset, dtype=np.float64).reshape(-1, 1, 1)
    return a, x, cube


def test_recovers_known_abundances_with_poisson_noise():
    rng = np.random.default_rng(5)
    a, x, cube = simulated_cube(rng)
    abund, resid = unmix(cube.astype(np.uint16), a)
    err = abund - x
    # nearly unbiased (NNLS clips noise at 0: a small positive bias), errors
    # at the photon-noise level
    for k in range(a.shape[1]):
        mean = x[k].mean()
        assert abs(err[k].mean()) < 0.08 * mean, k
        assert np.sqrt((err[k] ** 2).mean()) < 0.2 * mean, k
        assert np.corrcoef(abund[k].ravel(), x[k].ravel())[0, 1] > (0.99 if k < 4 else 0.9), k
    assert np.median(resid) < 1.2 * np.sqrt(cube.mean())


def test_offset_scalar_vector_and_auto():
    rng = np.random.default_rng(6)
    offset = np.linspace(90.0, 110.0, WL.size)
    a, x, cube = simulated_cube(rng, offset=offset)
    cube[:, :8, :8] = offset[:, None, None] + rng.normal(0, 0.5, (WL.size, 8, 8))  # background
    clean_abund, clean_resid = unmix(cube - offset[:, None, None], a)
    vec_abund, vec_resid = unmix(cube, a, offset=offset)
    np.testing.assert_allclose(vec_abund, clean_abund, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(vec_resid, clean_resid, rtol=1e-4, atol=1e-3)
    # scalar offset
    s_abund, _ = unmix(cube, a, offset=100.0)
    np.testing.assert_allclose(s_abund, unmix(cube - 100.0, a)[0], rtol=1e-4, atol=1e-3)
    # estimated offset: within about two noise sigmas, below the true offset
    est = estimate_offset(cube)
    assert est.shape == (WL.size,)
    assert (np.abs(est - offset) < 2.0).all()
    auto_abund, _ = unmix(cube, a, offset="auto")
    np.testing.assert_allclose(auto_abund, unmix(cube, a, offset=est)[0], rtol=1e-5, atol=1e-4)
    # a flat endmember (column of ones) absorbs a constant offset
    flat = np.hstack([a, np.ones((WL.size, 1))])
    _, x2, cube2 = simulated_cube(rng, offset=np.full(WL.size, 100.0))
    f_abund, _ = unmix(cube2, flat)
    assert abs(np.median(f_abund[-1]) - 100.0) < 3.0
    np.testing.assert_allclose(f_abund[:4].mean(axis=(1, 2)), x2[:4].mean(axis=(1, 2)), rtol=0.1)


def test_estimate_offset_dask_matches_numpy():
    rng = np.random.default_rng(7)
    cube = rng.normal(50.0, 1.0, (5, 200, 160)) + rng.gamma(1.0, 20.0, (1, 200, 160)) * (
        rng.random((1, 200, 160)) < 0.7
    )
    np_est = estimate_offset(cube)
    da_est = estimate_offset(da.from_array(cube, chunks=(5, 50, 40)))
    np.testing.assert_allclose(da_est, np_est, atol=0.5)
    np.testing.assert_allclose(np_est, 50.0 - 2.33, atol=0.5)


@with_engines
def test_poisson_weights_equal_weighted_scipy(engine_name):
    rng = np.random.default_rng(8)
    a, _, cube = simulated_cube(rng, shape=(6, 7))
    fit = engine(engine_name)
    abund, resid = fit(cube, a, weights="poisson")
    plain = scipy_unmix(cube, a)
    px = cube.reshape(cube.shape[0], -1)
    expected = a @ plain.reshape(a.shape[1], -1)
    floor = np.maximum(1.0, 0.01 * expected.max(axis=0))
    wts = 1.0 / np.maximum(expected, floor)
    ref = np.stack(
        [nnls(a * np.sqrt(wts[:, i])[:, None], px[:, i] * np.sqrt(wts[:, i]))[0] for i in range(px.shape[1])],
        axis=1,
    )
    assert_close_per_pixel(abund, ref.reshape(abund.shape), rtol=1e-3)
    # the residual reported stays the plain (unweighted) RMS
    model = np.einsum("ck,kyx->cyx", a, abund.astype(np.float64))
    np.testing.assert_allclose(resid, np.sqrt(((cube - model) ** 2).mean(axis=0)), rtol=1e-4)
    # and dask gives the same
    fit = engine(engine_name)
    d_abund = fit(da.from_array(cube, chunks=(5, 3, 4)), a, weights="poisson")[0].compute()
    np.testing.assert_allclose(d_abund, abund, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------
# the numba kernel: many pixels, strided and integer cubes, fallback
# --------------------------------------------------------------------------

needs_numba = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")


@needs_numba
def test_numba_is_the_default_engine():
    assert resolve_engine("auto") == "numba"


def test_unknown_engine_is_an_input_error():
    with pytest.raises(InputError, match="engine must be one of"):
        unmix(np.ones((3, 2, 2)), np.eye(3), engine="gpu")


def many_pixel_problem(seed, shape=(90, 130), k=6):
    rng = np.random.default_rng(seed)
    if k == 6:
        a = gaussians([520, 560, 600, 640, 680, 600], [12, 12, 12, 12, 12, 80])
    else:  # k - 1 narrow peaks and a broad one
        a = gaussians(list(np.linspace(510, 690, k - 1)) + [600], [10] * (k - 1) + [80])
    k = a.shape[1]
    x = rng.gamma(2.0, 40.0, (k,) + shape) * (rng.random((k,) + shape) < 0.5)
    cube = np.einsum("ck,kyx->cyx", a, x)
    cube += rng.normal(0, 1, cube.shape) * np.sqrt(cube + 4)
    return a, cube.astype(np.float32)


def assert_fit_matches_scipy(fit, cube, a, *, offset):
    """``fit``'s abundances equal scipy's NNLS per pixel and its residual their RMS misfit."""
    abund, resid = fit(cube, a, offset=offset)
    assert_close_per_pixel(abund, scipy_unmix(cube, a, offset=offset))
    model = np.einsum("ck,kyx->cyx", a, abund.astype(np.float64))
    expected = np.sqrt(((cube.astype(np.float64) - offset - model) ** 2).mean(axis=0))
    np.testing.assert_allclose(resid, expected, rtol=1e-5, atol=1e-4)


@needs_numba
@pytest.mark.parametrize("layout", ["contiguous", "strided", "x-strided", "uint16"])
@pytest.mark.parametrize("engine_name", ["numba", "numba-cholesky"])
def test_numba_many_pixels_match_scipy(engine_name, layout):
    # many tiles (several threads when numba has them); a view that cannot be
    # flattened (tiles along rows, a short last tile); one with a non-unit
    # stride along X; an integer cube
    a, cube = many_pixel_problem(12)
    if layout == "strided":
        cube = cube[:, ::2, 3:]
    elif layout == "x-strided":
        cube = cube[:, 1:, ::2]
    elif layout == "uint16":
        cube = np.clip(cube + 50, 0, None).astype(np.uint16)
    assert_fit_matches_scipy(engine(engine_name), cube, a, offset=1.5)


@with_engines
@pytest.mark.parametrize("ill", [False, True])
@pytest.mark.parametrize("k", [7, 8, 9, 10, 11, 12, 13])
def test_seven_to_thirteen_endmembers_match_scipy(engine_name, k, ill):
    # the numba kernel's vectors of 8 variables with one padding variable
    # (K = 7) and none (K = 8), its 16-lane vectors (K = 9..12), the scalar
    # kernel beyond (13); rows of 37 pixels (a short block), an offset;
    # float32 well-conditioned, float64 ill-conditioned (the numpy engine
    # sums a float32 cube in float32)
    rng = np.random.default_rng(10 * k + ill)
    wl = np.linspace(450, 750, 31)
    # peaks narrower as they crowd (condition number 4-11 for K = 7..13)
    a = gaussians(np.linspace(480, 720, k), [min(25.0, 200.0 / k)] * k, wl)
    if ill:  # two near-collinear columns, condition number about 3e3
        bump = rng.uniform(0.0, 1.0, wl.size)
        eps = 1e-2
        for _ in range(6):
            a[:, 1] = a[:, 0] + eps * bump
            eps *= cond(a) / 3e3
        assert 1e3 < cond(a) < 1e4
    x = rng.gamma(2.0, 30.0, (k, 9, 37)) * (rng.random((k, 9, 37)) < 0.5)
    cube = np.einsum("ck,kyx->cyx", a, x) + 2.0
    cube = (cube + rng.normal(0, 1, cube.shape) * np.sqrt(cube)).astype(np.float64 if ill else np.float32)
    assert_fit_matches_scipy(engine(engine_name), cube, a, offset=2.0)


@needs_numba
@pytest.mark.parametrize("layout", ["contiguous", "x-strided", "uint16", "dask"])
def test_shipped_library_many_pixels_match_scipy(layout):
    # the shipped 9-endmember library (31 bands) on many tiles, two threads'
    # chunks when numba has them; an X-strided view goes through contiguous
    # slabs (small ones here: several)
    lib = pd.read_csv(REPO / "config" / "spectra.csv")
    a = lib.drop(columns="wavelength_nm").to_numpy()
    k = a.shape[1]
    rng = np.random.default_rng(21)
    x = rng.gamma(2.0, 40.0, (k, 40, 150)) * (rng.random((k, 40, 150)) < 0.5)
    cube = np.einsum("ck,kyx->cyx", a, x) + 3.0
    cube = (cube + rng.normal(0, 1, cube.shape) * np.sqrt(cube)).astype(np.float32)
    tuning = {}
    if layout == "x-strided":
        cube = cube[:, 1:, ::2]
        tuning["strided_slab_px"] = 1000
    elif layout == "uint16":
        cube = np.clip(cube, 0, None).astype(np.uint16)
    fallback = []
    fit = engine("numba", on_fallback=lambda b: fallback.append(b.shape), **tuning)
    if layout == "dask":
        abund, resid = da.compute(*fit(da.from_array(cube, chunks=(31, 17, 64)), a, offset=3.0))
    else:
        abund, resid = fit(cube, a, offset=3.0)
    # solved by the 16-lane kernel, none by the numpy fallback
    assert lane_kernel(16, k).signatures and not fallback
    assert_close_per_pixel(abund, scipy_unmix(cube, a, offset=3.0))
    model = np.einsum("ck,kyx->cyx", a, abund.astype(np.float64))
    expected = np.sqrt(((cube.astype(np.float64) - 3.0 - model) ** 2).mean(axis=0))
    np.testing.assert_allclose(resid, expected, rtol=1e-5, atol=1e-4)


@needs_numba
@pytest.mark.parametrize("k", [6, 9])
@pytest.mark.parametrize("engine_name", ["numba", "numba-cholesky"])
def test_numba_unconverged_pixels_go_to_numpy_path(engine_name, k):
    a, cube = many_pixel_problem(13, shape=(20, 30), k=k)
    solved = []
    # no Lawson-Hanson outer step at all: every pixel that needs one is flagged
    fit = engine(engine_name, lh_iter_factor=-1, on_fallback=lambda b: solved.append(b.shape[1]))
    abund, resid = fit(cube, a, weights=None)
    assert len(solved) == 1 and 0 < solved[0] < 600
    assert_close_per_pixel(abund, scipy_unmix(cube, a))
    model = np.einsum("ck,kyx->cyx", a, abund.astype(np.float64))
    np.testing.assert_allclose(resid, np.sqrt(((cube - model) ** 2).mean(axis=0)), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------
# library check
# --------------------------------------------------------------------------


def test_check_library_reports_and_warns():
    a = gaussians([520, 600, 680], [15, 15, 15])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = check_library(a, ["A", "B", "C"])
    assert isinstance(res, LibraryCheck)
    assert 1.0 <= res.condition_number < CONDITION_LIMIT
    assert res.most_collinear in {("A", "B"), ("B", "C")}
    assert 0 < res.cosine < 1
    close = gaussians([520, 600, 600.2], [15, 15, 15])
    with pytest.warns(UserWarning, match="ill-conditioned"):
        res = check_library(close, ["A", "B", "C"])
    assert res.most_collinear == ("B", "C") and res.cosine > 0.99
    assert res.condition_number > CONDITION_LIMIT


# --------------------------------------------------------------------------
# bad input: one InputError each
# --------------------------------------------------------------------------


@pytest.fixture
def good():
    rng = np.random.default_rng(9)
    return rng.uniform(0, 10, (20, 4, 5)), gaussians([530, 600], [20, 25])


def test_error_band_mismatch(good):
    cube, a = good
    with pytest.raises(InputError, match=r"19 rows.*20 bands"):
        unmix(cube, a[:19])


def test_error_nonfinite_spectra(good):
    cube, a = good
    for bad in (np.nan, np.inf):
        a2 = a.copy()
        a2[3, 1] = bad
        with pytest.raises(InputError, match="spectra contains NaN or inf"):
            unmix(cube, a2)
        with pytest.raises(InputError, match="spectra contains NaN or inf"):
            check_library(a2, ["x", "y"])


def test_error_nonfinite_cube_numpy(good):
    cube, a = good
    for bad in (np.nan, -np.inf):
        c2 = cube.copy()
        c2[2, 3, 1] = bad
        with pytest.raises(InputError, match=r"cube contains NaN or inf.*band 2, y 3, x 1"):
            unmix(c2, a)


@with_engines
def test_error_nonfinite_cube_dask(good, engine_name):
    cube, a = good
    for bad in (np.nan, np.inf):
        c2 = cube.copy()
        c2[2, 3, 1] = bad
        fit = engine(engine_name)
        abund, resid = fit(da.from_array(c2, chunks=(20, 2, 5)), a)  # lazy: no error yet
        with pytest.raises(InputError, match="cube contains NaN or inf"):
            da.compute(abund, resid)
        with pytest.raises(InputError, match="cube contains NaN or inf"):
            da.compute(fit(da.from_array(c2, chunks=(20, 2, 5)), a, weights="poisson"))


def test_error_negative_spectra(good):
    cube, a = good
    a2 = a.copy()
    a2[0, 0] = -0.1
    with pytest.raises(InputError, match="negative"):
        unmix(cube, a2)


def test_error_zero_column(good):
    cube, a = good
    a2 = a.copy()
    a2[:, 1] = 0
    with pytest.raises(InputError, match="column 1 is all zero"):
        unmix(cube, a2)


def test_error_more_endmembers_than_bands():
    a = np.eye(3, 4) + 0.1
    with pytest.raises(InputError, match=r"more endmembers \(4\) than bands \(3\)"):
        unmix(np.ones((3, 2, 2)), a)


@pytest.mark.parametrize("shape", [(20, 5), (1, 20, 4, 5), (20,)])
def test_error_cube_not_3d(good, shape):
    _, a = good
    with pytest.raises(InputError, match="3-D"):
        unmix(np.ones(shape), a)


def test_error_collinear_library(good):
    cube, a = good
    with pytest.raises(InputError, match="linearly dependent"):
        unmix(cube, np.hstack([a, 2 * a[:, :1]]))


def test_error_bad_options(good):
    cube, a = good
    with pytest.raises(InputError, match="weights"):
        unmix(cube, a, weights="gaussian")
    with pytest.raises(InputError, match=r"offset must be a scalar or have shape \(20,\)"):
        unmix(cube, a, offset=np.ones(3))
    with pytest.raises(InputError, match="offset must be None"):
        unmix(cube, a, offset="median")
    with pytest.raises(InputError, match="3 names given for 2"):
        check_library(a, ["a", "b", "c"])


# --------------------------------------------------------------------------
# library refinement on the slide
# --------------------------------------------------------------------------

REF_CENTRES, REF_WIDTHS = [530, 570, 610, 650], [12, 14, 14, 16]


def refine_problem(shifts, seed):
    rng = np.random.default_rng(seed)
    af = gaussians([600], [80])[:, 0]
    lib = np.column_stack([gaussians(REF_CENTRES, REF_WIDTHS), af, np.ones(WL.size)])
    # the slide's spectra: analytic Gaussians moved by `shifts` (not interpolated)
    true = np.column_stack([
        gaussians([c + s for c, s in zip(REF_CENTRES, shifts)], REF_WIDTHS),
        af,
        np.ones(WL.size),
    ])
    x = rng.gamma(2.0, 60.0, (6, 48, 48)) * (rng.random((6, 48, 48)) < 0.4)
    x[4] = rng.gamma(4.0, 4.0, (48, 48))
    x[5] = 0.0
    cube = rng.poisson(np.einsum("ck,kyx->cyx", true, x)).astype(np.float64) + 100.0
    return cube, lib


def test_refine_library_recovers_shifts():
    cube, lib = refine_problem([3.0, -2.0, 0.0, 0.0], seed=10)
    refined, report = refine_library(cube, lib, WL, offset=100.0, n_iter=2)
    assert refined.shape == lib.shape
    np.testing.assert_allclose(report["shift_nm"].to_numpy()[:4], [3.0, -2.0, 0.0, 0.0], atol=0.5)
    assert report["shift_nm"].iloc[5] == 0.0  # the flat endmember is left alone
    np.testing.assert_array_equal(refined[:, 5], lib[:, 5])
    assert (report["residual_after"].iloc[:2] < 0.7 * report["residual_before"].iloc[:2]).all()
    assert report.attrs["residual_after"] < report.attrs["residual_before"]
    assert (np.abs(report["shift_nm"]) <= 6.0).all()


def test_refine_library_keeps_unshifted_library():
    cube, lib = refine_problem([0.0, 0.0, 0.0, 0.0], seed=11)
    frame = pd.DataFrame({"wavelength_nm": WL, **{f"E{i}": lib[:, i] for i in range(6)}})
    refined, report = refine_library(da.from_array(cube, chunks=(20, 24, 24)), frame, WL, offset=100.0, n_iter=1)
    assert list(refined.columns) == list(frame.columns)
    assert list(report["endmember"]) == [f"E{i}" for i in range(6)]
    assert (np.abs(report["shift_nm"].to_numpy()[:4]) < 0.3).all()
    assert report.attrs["residual_after"] <= report.attrs["residual_before"] * 1.001
    with pytest.raises(InputError, match="wavelengths_nm"):
        refine_library(cube, lib, WL[:-1])


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_estimate_offset_is_the_percentile_of_its_sample(dtype):
    from qdquant.unmixing import estimate_offset

    rng = np.random.default_rng(7)
    low = -100 if np.dtype(dtype).kind in "if" else 0  # signed: counts below zero too
    for n in (1, 2, 9, 400):
        cube = (low + rng.random((4, n, 11)) * 200).astype(dtype)
        for p in (0.0, 1.0, 37.5, 100.0):
            expected = np.percentile(np.asarray(cube, dtype=np.float64).reshape(4, -1), p, axis=1)
            np.testing.assert_allclose(estimate_offset(cube, percentile=p), expected, rtol=1e-12, atol=1e-9)


@with_engines
@pytest.mark.parametrize("k", [5, 9])
@pytest.mark.parametrize("weights", [None, "poisson"])
def test_gain_is_the_fit_of_the_corrected_cube(engine_name, k, weights):
    """``unmix(cube, gain=g, gain_offset=o)`` fits ``o + g (cube - o)``, for every kernel
    (the 16-lane one applies the gain in its band sums, the others to slabs, here several
    a cube), with an offset of its own subtracted too, on a whole cube and on a window of
    one (rows strided, short blocks at the row ends)."""
    rng = np.random.default_rng(40 + k)
    centres = np.linspace(520, 660, k - 1)
    a = gaussians(list(centres) + [600], [10] * (k - 1) + [80])
    shape = (37, 203)
    x = rng.gamma(2.0, 60.0, (k,) + shape) * (rng.random((k,) + shape) < 0.5)
    gain_offset = rng.uniform(90.0, 110.0, WL.size)
    cube = rng.poisson(np.einsum("ck,kyx->cyx", a, x)).astype(np.float64) + gain_offset[:, None, None]
    cube = cube.astype(np.uint16)
    gain = rng.uniform(1.0, 1.4, shape).astype(np.float32)
    offset = gain_offset - 3.0  # not the gain's: the corrected cube keeps 3 counts of it
    for window in (np.s_[:, :, :], np.s_[:, 2:, 5:198]):
        sub, g = cube[window], gain[window[1:]]
        corrected = gain_offset[:, None, None] + g.astype(np.float64) * (sub - gain_offset[:, None, None])
        fit = engine(engine_name, gain_slab_px=1000)
        want = fit(corrected, a, offset=offset, weights=weights)
        got = fit(sub, a, offset=offset, weights=weights, gain=g, gain_offset=gain_offset)
        lazy = da.compute(*fit(da.from_array(sub, chunks=(-1, 16, 64)), a, offset=offset,
                               weights=weights, gain=da.from_array(g, chunks=(16, 64)),
                               gain_offset=gain_offset))
        for abund, resid in (got, lazy):
            assert_close_per_pixel(abund, want[0].astype(np.float64), rtol=1e-5)
            np.testing.assert_allclose(resid, want[1], rtol=1e-5, atol=1e-4)
        # no gain_offset: the gain scales the offset too
        fit = engine(engine_name, gain_slab_px=1000)
        want = fit(g.astype(np.float64) * sub, a, offset=offset, weights=weights)
        got = fit(sub, a, offset=offset, weights=weights, gain=g)
        assert_close_per_pixel(got[0], want[0].astype(np.float64), rtol=1e-5)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4)
    if engine_name == "numba" and weights is None and k == 9:
        assert lane_kernel(16, k, True).signatures  # the fused kernel ran


def test_nan_in_a_dask_cube_is_reported_at_its_band_y_and_x():
    import dask.array as da

    cube = np.ones((4, 64, 96), np.float32)
    cube[2, 37, 70] = np.nan
    spectra = np.eye(4)[:, :3] + 0.1
    abundances, _ = unmix(da.from_array(cube, chunks=(4, 32, 32)), spectra)
    with pytest.raises(InputError, match=r"first at band 2, y 37, x 70"):
        abundances.compute()
