"""The whole pipeline on slides of the independent generator (tests/independent), with the
contract's example config unchanged and a library without an ``Offset`` column.

Truth comes from the generator's own parameters, not from qdquant. Three messy slides
(crowded nests, QD drift, a library autofluorescence a little off and different in stroma
and epithelium, shading, few photons, red blood cells, a dark offset different in each
band on 1+): the HER2-null slide must stay HER2-0, the 1+ slide HER2-low, the 3+ slide
(13 µm nuclei where the config says 8) HER2-positive.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import need_independent_generator
from qdquant import pipeline
from qdquant.config import load_config
from qdquant.metrics import match_instances

#: every step on three 768² slides: about a minute
pytestmark = pytest.mark.slow

SLIDES = ["ind_null_a", "ind_1plus", "ind_3plus"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    need_independent_generator()
    import slides as independent

    folder = independent.make_cohort(tmp_path_factory.mktemp("independent"), offset_column=False, messy=True,
                                     size=768, only=SLIDES)
    cfg = load_config(folder / "config.yaml", check_images=True)
    for name in SLIDES:
        for step in ("unmix", "segment", "quantify", "score"):
            pipeline.STEPS[step](cfg, name)
    truth = pd.read_csv(folder / "truth_samples.csv", dtype={"her2_score": str}, keep_default_na=False)
    return folder, cfg, truth.set_index("sample_id")


@pytest.mark.parametrize("name", SLIDES)
def test_her2_score_and_nuclei_on_a_slide_made_differently(cohort, name):
    folder, cfg, truth = cohort
    out = pipeline.outputs(cfg, name)
    summary = pd.read_csv(out["summary"], dtype={"her2_score": str}).iloc[0]
    assert summary["her2_score"] == truth.loc[name, "her2_score"], (name, summary["her2_category"])
    true_nuclei = tifffile.imread(folder / f"{name}_truth_nuclei.tif")
    from qdquant import io

    found = np.asarray(io.read_labels(out["zarr"], "nuclei"))
    assert match_instances(true_nuclei, found, iou_threshold=0.5)["f1"] >= 0.9


def test_her2_null_cells_on_the_null_slide_stay_0(cohort):
    """At most 1 % of the null slide's cells read 1+ (the issue's target). Here 0 %; 1.6 %
    without the smoothing along membranes (``unmixing.smoothing_um: 0``), whose noise the
    rule's maximum over 36 sectors of a few pixels turns into 1+ cells."""
    _, cfg, _ = cohort
    cells = pd.read_csv(pipeline.outputs(cfg, "ind_null_a")["cells"], dtype={"her2_class": str})
    assert (cells["her2_class"] != "0").mean() <= 0.01


def test_the_regions_autofluorescence_keeps_the_librarys_column_order(cohort):
    """The messy slides' autofluorescence is fitted per region (two spectra, `AF` and `AF_2`);
    they take the library's `AF` place, before the flat column the fit adds."""
    _, cfg, _ = cohort
    library = list(cfg.library.names)
    for name in SLIDES:
        used = list(pd.read_csv(pipeline.outputs(cfg, name)["spectra_used"]).columns[1:])
        assert "AF_2" in used, (name, used)
        family = [n for n in used if n == "AF" or n.startswith("AF_")]
        assert used[: library.index("AF")] == library[: library.index("AF")]
        assert used[library.index("AF") : library.index("AF") + len(family)] == family, used
        assert used[-1] == "Offset", used



def test_refinement_finds_each_stains_drift_where_the_slides_centre_is_stroma(tmp_path):
    """Library refinement moves each QD to the generator's drift (2-4 nm) within 1 nm, HER2's
    QD655 included. The centre of this 1024² 3+ slide is stroma: a refinement sample of
    a window there alone held no HER2 membrane and fitted QD655 to noise (-5 nm for +3.8)."""
    import json

    need_independent_generator()
    import slides as independent

    folder = independent.make_cohort(tmp_path, offset_column=False, messy=True, size=1024, only=["ind_3plus"])
    cfg = load_config(folder / "config.yaml", check_images=True)
    pipeline.STEPS["unmix"](cfg, "ind_3plus")
    truth = pd.read_csv(folder / "truth_samples.csv").set_index("sample_id")
    drift = json.loads(truth.loc["ind_3plus", "params"])["qd_shift_nm"]
    found = pd.read_csv(pipeline.outputs(cfg, "ind_3plus")["unmixing_qc"].parent / "library_refinement.csv")
    found = found.set_index("endmember")
    for qd, shift in drift.items():
        assert not found.loc[qd, "at_bound"], qd
        assert abs(found.loc[qd, "shift_nm"] - shift) < 1.0, (qd, found.loc[qd, "shift_nm"], shift)
