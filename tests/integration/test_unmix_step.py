"""The unmix step (qdquant.pipeline.unmix_sample) on small slides: settings and corrections that
only show once the step reads a slide, fits it and writes its store."""

from __future__ import annotations

import json

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
