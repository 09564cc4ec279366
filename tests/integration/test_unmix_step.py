"""The unmix step (qdquant.pipeline.unmix_sample) on small slides: settings and corrections that
only show once the step reads a slide, fits it and writes its store."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pandas as pd
import tifffile

from conftest import need_independent_generator, write_project
from qdquant import io, pipeline
from qdquant.config import load_config


def test_flagging_can_be_switched_off(tmp_path):
    """unmixing.flag_poor_fit: false keeps an empty labels/flagged (for ablations)."""
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


def test_unmix_step_on_raw_counts_with_the_contracts_library_and_no_offset_column(tmp_path):
    """A slide of the independent generator with glass (per-band offset 90-115 counts, library
    without ``Offset``, the contract's example config): the offset is found, subtracted, recorded
    and warned about; HER2 on the HER2-0 cells stays near 0 (it read ~90 without this)."""
    need_independent_generator()
    import slides as independent

    folder = independent.make_cohort(tmp_path / "cohort", offset_column=False, messy=False, size=256,
                                     only=["ind_1plus"])
    truth = pd.read_csv(folder / "truth_samples.csv").set_index("sample_id").loc["ind_1plus"]
    cfg = load_config(folder / "config.yaml")
    pipeline.unmix_sample(cfg, "ind_1plus")
    out = pipeline.outputs(cfg, "ind_1plus")
    found = pd.read_csv(out["unmixing_qc"].parent / "dark_offset.csv")["dark_offset_counts"].to_numpy()
    true = np.array([float(v) for v in truth["offset_per_band"].split(";")])
    assert np.ptp(true) > 10 and np.abs(found - true).max() < 2.0
    used = pd.read_csv(out["spectra_used"])
    assert "Offset" in used and np.allclose(used["Offset"], 1)  # a flat endmember joins the fit
    stats = json.loads(out["unmixing_qc"].with_suffix(".json").read_text())
    assert any("cannot explain" in w for w in stats["warnings"])
    image, names = io.read_ome_zarr(out["zarr"])
    labels = tifffile.imread(folder / "ind_1plus_truth_cells.tif")
    classes = pd.read_csv(folder / "ind_1plus_truth_cells.csv", dtype={"her2_class": str})
    unstained = np.isin(labels, classes.loc[classes["her2_class"] == "0", "cell_id"])
    assert float(np.asarray(image[names.index("QD655")])[unstained].mean()) < 3.0


def test_one_pass_smooths_each_block_once_and_matches_the_fit_and_flags_computed_apart(tmp_path, monkeypatch):
    """Abundances, residual and flags come from one pass that smooths each block of the cube once
    (and the noise model's windows, fitted before it); they equal the fit of the whole cube
    smoothed at once, and the flags of that fit's signal with the noise model of its residual."""
    from qdquant import unmixing
    from qdquant.pipeline import unmix as step
    from qdquant.pipeline.sampling import cube_sample, pixel_sample
    from qdquant.unmixing import smoothing

    config = write_project(tmp_path, config_extra={"illumination": "none", "unmixing": {"refine_library": False}})
    rng = np.random.default_rng(1)
    cube = rng.poisson(100, size=(8, 600, 600)).astype(np.uint16)
    cube[0, 200:230, 300:330] += 3000  # off-library light across the blocks' seams (at 512)
    cube[7, 500:530, 500:530] += 3000
    io.write_ome_tiff(tmp_path / "s1.ome.tif", cube, pixel_size_um=0.5, tile=256)
    cfg = load_config(config)
    smoothed = []
    real = smoothing._smooth_padded

    def counted(block, *args, **kwargs):
        if block.size:  # not dask's look at the output's type
            smoothed.append(block.shape[1:])
        return real(block, *args, **kwargs)

    monkeypatch.setattr(smoothing, "_smooth_padded", counted)
    pipeline.unmix_sample(cfg, "s1")

    scales = step._smoothing_scales(cfg, 0.5)
    depth = unmixing.smoothing_depth(**scales)
    blocks = [(y + 2 * depth, x + 2 * depth) for y in (512, 88) for x in (512, 88)]  # 256-px tiles merged
    window = (384 + 4 * depth,) * 2  # the noise model's one window, its margin, padded
    assert sorted(smoothed) == sorted([*blocks, window])

    out = pipeline.outputs(cfg, "s1")
    library = pd.read_csv(out["spectra_used"])
    spectra = library.drop(columns="wavelength_nm").to_numpy()
    offset = pd.read_csv(out["unmixing_qc"].parent / "dark_offset.csv")["dark_offset_counts"].to_numpy()
    # along the membranes' light (refinement is off: the library's membrane columns as written)
    whole = unmixing.smooth_along_structures(cube, **scales, guide_weights=step.membrane_guide(cfg, cfg.library))
    abundances, residual = unmixing.unmix(whole, spectra, offset=offset,
                                          weights="poisson" if cfg.unmixing.poisson_weights else None)
    stored, names = io.read_ome_zarr(out["zarr"])
    assert names == [*library.columns[1:], "residual"]
    # equal but for the last bit of a rare pixel (the fit of a block, of float32 sums)
    np.testing.assert_allclose(np.asarray(stored), np.concatenate([abundances, residual[None]]), rtol=1e-6,
                               atol=1e-9)

    with io.open_cube(tmp_path / "s1.ome.tif", chunk_size=cfg.chunk_size) as c:
        noise = unmixing.noise_model(cube_sample(c) - offset[:, None, None],
                                     pixel_sample(da.from_array(residual))[0])
    signal = whole - offset.astype(np.float32)[:, None, None]
    probes = unmixing.broadband_probes(spectra, library["wavelength_nm"].to_numpy())
    expected = unmixing.grow_mask(
        unmixing.flag_poor_fit(signal, residual, noise)
        | unmixing.flag_broadband(signal, probes, noise, n_endmembers=spectra.shape[1]),
        round(step.FLAG_MARGIN_UM / 0.5))
    flagged = np.asarray(io.read_labels(out["zarr"], "flagged")).astype(bool)
    assert flagged[200:230, 300:330].all() and flagged[500:530, 500:530].all()
    np.testing.assert_array_equal(flagged, expected)
