"""Tests of qdquant.library: control-slide libraries, dye-spectra mixing matrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qdquant.errors import InputError
from qdquant.library import (
    build_library,
    mirror_spectrum,
    mixing_matrix_from_dye_spectra,
    parse_leica_channels,
    plot_library,
    read_spectrum_table,
)

WL = np.arange(500.0, 720.0, 10.0)  # 22 bands
LEICA = Path("/work/shared/data/poissonnmf_spectra_and_leica_lambda/3dyeLeica/03_metadata_ascii.txt")


def gauss(centre, width, wl=WL):
    g = np.exp(-0.5 * ((wl - centre) / width) ** 2)
    return g / g.max()


TRUE = {"QD565": gauss(565, 10), "QD605": gauss(605, 12), "QD655": gauss(655, 14)}
TRUE_AF = gauss(560, 70)


def control(rng, spectrum, *, af=True, offset=20.0, shape=(64, 64), dtype=np.uint16, sat_frac=0.0):
    """A simulated single-stain control: sparse bright dye + AF everywhere + offset, Poisson."""
    c = WL.size
    dye = rng.gamma(2.0, 150.0, shape) * (rng.random(shape) < 0.2) if spectrum is not None else 0.0
    auto = rng.gamma(5.0, 4.0, shape) if af else 0.0
    signal = np.zeros((c,) + shape)
    if spectrum is not None:
        signal += spectrum[:, None, None] * dye
    signal += TRUE_AF[:, None, None] * auto
    signal[:, :, : shape[1] // 5] = 0.0  # empty glass: only the offset
    cube = rng.poisson(signal).astype(np.float64) + offset + rng.normal(0, 1.0, (c,) + shape)
    if sat_frac:
        # very bright pixels that saturate, with a distorted spectrum
        hot = rng.random(shape) < sat_frac
        cube[:, hot] = np.iinfo(dtype).max
    return np.clip(cube, 0, np.iinfo(dtype).max).astype(dtype)


def test_build_library_recovers_gaussians_and_af():
    rng = np.random.default_rng(0)
    controls = {name: control(rng, s, sat_frac=0.002) for name, s in TRUE.items()}
    unstained = control(rng, None, shape=(160, 160))
    lib = build_library(controls, unstained, wavelengths_nm=WL, names=list(TRUE))
    assert list(lib.columns) == ["wavelength_nm", *TRUE, "AF"]
    np.testing.assert_array_equal(lib["wavelength_nm"], WL)
    for name, s in TRUE.items():
        assert lib[name].max() == pytest.approx(1.0)
        assert np.abs(lib[name].to_numpy() - s).max() < 0.03, name
    assert np.abs(lib["AF"].to_numpy() - TRUE_AF).max() < 0.04
    assert set(lib.attrs["n_pixels"]) == {*TRUE, "AF"}


def test_build_library_without_unstained_keeps_some_af():
    rng = np.random.default_rng(1)
    controls = {"QD605": control(rng, TRUE["QD605"])}
    lib = build_library(controls, wavelengths_nm=WL, names=None, bright_percentile=95)
    assert list(lib.columns) == ["wavelength_nm", "QD605"]
    # the dye dominates its brightest pixels
    assert np.abs(lib["QD605"].to_numpy() - TRUE["QD605"]).max() < 0.1


def test_build_library_bad_input():
    rng = np.random.default_rng(2)
    good = control(rng, TRUE["QD565"], shape=(8, 8))
    with pytest.raises(InputError, match="21 bands but wavelengths_nm has 22"):
        build_library({"QD565": good[:21]}, wavelengths_nm=WL)
    with pytest.raises(InputError, match=r"no control image.*QD705"):
        build_library({"QD565": good}, wavelengths_nm=WL, names=["QD565", "QD705"])
    with pytest.raises(InputError, match="3-D"):
        build_library({"QD565": good[0]}, wavelengths_nm=WL)
    with pytest.raises(InputError, match="non-empty dict"):
        build_library({}, wavelengths_nm=WL)
    with pytest.raises(InputError, match="saturated"):
        build_library({"QD565": np.full_like(good, 65535)}, wavelengths_nm=WL)


def test_plot_library_writes_png(tmp_path):
    lib = pd.DataFrame({"wavelength_nm": WL, **TRUE})
    out = plot_library(lib, tmp_path / "lib.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="wavelength_nm"):
        plot_library(lib.drop(columns="wavelength_nm"), tmp_path / "x.png")


def test_mixing_matrix_from_dye_spectra():
    wl = np.arange(400.0, 750.0, 1.0)
    exc = np.column_stack([wl, gauss(490, 15, wl)])
    em = np.column_stack([wl, gauss(520, 10, wl)])
    exc2 = np.column_stack([wl, gauss(560, 15, wl)])
    em2 = np.column_stack([wl, gauss(600, 10, wl)])
    ex_lines = [488, 488, 561, 561]
    bands = [[510, 530], [590, 610], [510, 530], [590, 610]]
    m = mixing_matrix_from_dye_spectra(ex_lines, bands, {"a": (exc, em), "b": (exc2, em2)})
    assert m.shape == (4, 2)
    np.testing.assert_allclose(m.max(axis=0), 1.0)
    assert np.argmax(m[:, 0]) == 0 and np.argmax(m[:, 1]) == 3
    # entry = excitation at the line x emission integrated over the band
    e_a = gauss(490, 15, np.array([488.0, 561.0]))
    band = np.linspace(510, 530, 41)
    integral = np.trapezoid(gauss(520, 10, band), band)
    np.testing.assert_allclose(m[2, 0], e_a[1] / e_a[0], rtol=1e-6)
    assert m[0, 0] == pytest.approx(1.0) and integral > 0
    with pytest.raises(InputError, match=r"shape \(4, 2\)"):
        mixing_matrix_from_dye_spectra(ex_lines, bands[:3], {"a": (exc, em)})
    with pytest.raises(InputError, match="no signal"):
        mixing_matrix_from_dye_spectra(ex_lines, bands, {"a": (exc, np.column_stack([wl, 0 * wl]))})


def test_mirror_spectrum_and_table_reader(tmp_path):
    wl = np.arange(480.0, 640.0, 1.0)
    em = np.column_stack([wl, gauss(520, 12, wl)])
    ex = mirror_spectrum(em, 495.0)
    assert ex[np.argmax(ex[:, 1]), 0] == pytest.approx(495.0, abs=0.6)
    assert np.all(np.diff(ex[:, 0]) > 0)
    f = tmp_path / "dye.emn"
    f.write_text("110\t553.0\n" + "\n".join(f"{w:g}\t{v:g}" for w, v in em) + "\n")
    t = read_spectrum_table(f)
    assert t[0, 0] == 480.0 and t.shape == em.shape


@pytest.mark.skipif(not LEICA.is_file(), reason="Leica example data not available")
def test_parse_leica_channels():
    ch = parse_leica_channels(LEICA)
    assert len(ch) == 12
    np.testing.assert_array_equal(ch["channel"], np.arange(12))
    np.testing.assert_array_equal(ch["excitation_nm"], [488] * 4 + [514] * 4 + [561] * 4)
    np.testing.assert_array_equal(ch["band_low_nm"], [500, 520, 540, 560, 520, 540, 560, 580, 560, 580, 600, 620])
    np.testing.assert_array_equal(ch["band_high_nm"] - ch["band_low_nm"], 20)
    np.testing.assert_array_equal(ch["pmt"], [1, 2, 3, 4] * 3)


def test_parse_leica_channels_bad_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        parse_leica_channels(tmp_path / "missing.txt")
    bad = tmp_path / "x.txt"
    bad.write_text("hello\n")
    with pytest.raises(InputError, match="HARDWARE PARAMETER"):
        parse_leica_channels(bad)
