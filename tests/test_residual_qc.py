"""Pixels the library cannot explain are flagged and cannot stain a cell."""

import numpy as np
import pandas as pd

from qdquant.quantification import measure_cells
from qdquant.unmixing import flag_poor_fit, noise_model, unmix

REPO_LIBRARY = pd.read_csv(__import__("conftest").REPO / "config" / "spectra.csv")


def test_off_library_object_is_flagged_and_left_out():
    rng = np.random.default_rng(3)
    wl = REPO_LIBRARY["wavelength_nm"].to_numpy()
    names = [c for c in REPO_LIBRARY.columns if c != "wavelength_nm"]
    spectra = REPO_LIBRARY[names].to_numpy()
    shape = (96, 96)
    abundances = np.zeros((len(names),) + shape)
    abundances[names.index("Offset")] = 100.0
    abundances[names.index("AF")] = rng.uniform(10, 40, shape)
    abundances[names.index("DAPI")] = 50.0
    cells = np.zeros(shape, np.int32)
    cells[10:40, 10:40], cells[50:90, 50:90] = 1, 2
    ring = np.zeros(shape, bool)
    ring[10:40, 10:40] = True
    ring[12:38, 12:38] = False
    abundances[names.index("QD655"), ring] = 40.0  # cell 1: HER2 40 on its membrane
    expected = np.einsum("ck,kyx->cyx", spectra, abundances)
    # an off-library emitter (a narrow peak between QD605 and QD655) on part of cell 2
    blob = np.zeros(shape, bool)
    blob[55:70, 55:70] = True
    expected[:, blob] += 400.0 * np.exp(-0.5 * ((wl - 640.0) / 9.0) ** 2)[:, None]
    gain = 2.0  # electrons per count
    cube = rng.poisson(expected * gain) / gain + rng.normal(0, 2.5, expected.shape)

    abund, residual = unmix(cube, spectra)
    a, b = noise_model(cube, residual)
    assert 0.2 < a < 1.0  # ~ 1/gain, up to degrees of freedom
    flagged = flag_poor_fit(cube, residual, (a, b))
    assert flagged[blob].mean() > 0.95
    assert flagged[~blob].mean() < 0.005

    her2 = abund[[names.index("QD655")]]
    naive = measure_cells(cells, np.zeros_like(cells), her2, ["HER2"], 2)
    masked = measure_cells(cells, np.zeros_like(cells), her2, ["HER2"], 2, flagged=flagged)
    # the off-library light leaks into HER2 past t_faint (20) unless its pixels are left out;
    # what stays is the cell's own noise floor
    assert naive.loc[1, "HER2"] > 20
    assert masked.loc[1, "HER2"] < 10
    assert np.isclose(masked.loc[1, "HER2"], her2[0][(cells == 2) & ~flagged].mean(), rtol=1e-5)
    assert masked.loc[1, "n_flagged_px"] == flagged[cells == 2].sum() > 200
    assert abs(masked.loc[0, "HER2_membrane_mean"] - 40) < 6


def test_flagging_can_be_switched_off(tmp_path):
    """unmixing.flag_poor_fit: false keeps an empty labels/flagged (for ablations)."""
    from conftest import write_project
    from qdquant import io, pipeline
    from qdquant.config import load_config

    flagged = {}
    for switch in (True, False):
        config = write_project(tmp_path / str(switch), config_extra={
            "unmixing": {"refine_library": False, "flag_poor_fit": switch}})
        # a bright emitter the library cannot fit: half of it goes to a band no endmember explains
        root = config.parent
        cube = np.random.default_rng(0).poisson(100, size=(8, 64, 64)).astype(np.uint16)
        cube[0, 20:30, 20:30] += 3000
        cube[7, 20:30, 20:30] += 3000
        io.write_ome_tiff(root / "s1.ome.tif", cube, pixel_size_um=0.5)
        cfg = load_config(config)
        assert cfg.unmixing.flag_poor_fit is switch
        pipeline.unmix_sample(cfg, "s1")
        flagged[switch] = np.asarray(io.read_labels(pipeline.outputs(cfg, "s1")["zarr"], "flagged"))
    assert flagged[True][20:30, 20:30].mean() > 0.9
    assert flagged[False].shape == (64, 64) and flagged[False].max() == 0
