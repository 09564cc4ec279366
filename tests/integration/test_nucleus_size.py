"""qdquant.nucleus_size on real and realistic images: the estimate against the truth.

Figures checked here (pixel size taken as 0.5 um for DSB2018, whose manual
nuclei then have a median equivalent diameter of 11.83 um):

* DSB2018 ``stardist_bundled/img2d.tif``: estimate 12.4-12.7 um (+5-7 %)
  for ``auto`` and hints 6 and 24 um; segmentation F1 at IoU 0.5
  0.899-0.903 with ``auto`` and with every hint (the hint used as the
  diameter itself: 0.54 at 7.2 um, 0.78 at 18 um).
* The simulator's messy slide (textured nuclei, 7.84 um): 7.1 um (it
  was 3.9 um before nested blobs were left out); a hint of 8 um is kept.
* The independent generator's messy slides (nests of touching nuclei,
  bright 6 um lymphocytes; 384 px here): within 7 % (4.6-7.5 um for
  11-12 um nuclei before), nuclei F1 0.95-1.0.

Several estimates and segmentations per image (25 s in all), so ``slow``; the
estimator on synthetic ellipses: tests/unit/nucleus_size.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import median_equivalent_diameter, need_independent_generator, shared
from qdquant import simulate
from qdquant.metrics import match_instances
from qdquant.nucleus_size import estimate_nucleus_diameter, resolve_nucleus_diameter
from qdquant.segmentation import segment_nuclei

pytestmark = pytest.mark.slow

PS = 0.5  # um per pixel, assumed for DSB2018 and the independent generator's slides


# --------------------------------------------------------------------------
# DSB2018
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dsb():
    folder = shared("stardist_bundled")
    return tifffile.imread(folder / "img2d.tif"), tifffile.imread(folder / "mask2d.tif")


def test_dsb2018_estimate_against_manual_masks(dsb):
    image, truth = dsb
    true_um = PS * median_equivalent_diameter(truth)
    assert abs(true_um - 11.83) < 0.05  # 23.67 px
    for hint in (None, 6, 24):
        est = estimate_nucleus_diameter(image, PS, hint_um=hint)
        print(f"DSB2018 hint {hint}: estimate {est:.2f} um, truth {true_um:.2f} um ({est / true_um - 1:+.1%})")
        assert abs(est / true_um - 1) < 0.15  # +5-7 %


def test_dsb2018_segmentation_with_auto_and_any_hint(dsb):
    image, truth = dsb
    f1 = {}
    for setting in ("auto", 6, 8, 12, 18, 24):
        labels = segment_nuclei(image, PS, setting, nucleus_diameter_hint=setting != "auto")
        f1[setting] = match_instances(truth, labels, iou_threshold=0.5)["f1"]
    print("DSB2018 F1@0.5 by setting:", {k: round(v, 3) for k, v in f1.items()})
    assert f1["auto"] >= 0.88  # reached 0.903
    assert min(f1.values()) >= 0.85  # every hint 0.899-0.903
    # A number without the hint flag is the diameter itself: 6 um is far too small.
    as_given = match_instances(truth, segment_nuclei(image, PS, 6), iou_threshold=0.5)["f1"]
    assert as_given < 0.7


# --------------------------------------------------------------------------
# The simulator's messy slide: textured nuclei
# --------------------------------------------------------------------------


def test_textured_nuclei_of_a_messy_slide():
    """Chromatin texture: spots inside each nucleus are nested blobs, not nuclei.

    The simulator's messy slide (crowded nests, textured nuclei; true median
    7.84 um): the estimate was 3.9 um while every spot of a nucleus counted
    as a blob; with only the strongest of nested blobs 7.1 um (auto and
    hint 8), and the hint of 8 um itself is used (1.13 times the estimate).
    """
    slide = simulate.simulate_slide(**simulate.messy_cohort(512)["messy_null"])
    dapi = slide.abundances[0]
    true_um = slide.pixel_size_um * median_equivalent_diameter(slide.nuclei)
    for hint in (None, 8):
        est = estimate_nucleus_diameter(dapi, slide.pixel_size_um, hint_um=hint)
        print(f"messy_null hint {hint}: estimate {est:.2f} um, truth {true_um:.2f} um")
        assert abs(est / true_um - 1) < 0.15  # -9 %
    assert resolve_nucleus_diameter(dapi, slide.pixel_size_um, 8, hint=True)[0] == 8
    assert resolve_nucleus_diameter(dapi, slide.pixel_size_um, 12, hint=True)[0] < 8


# --------------------------------------------------------------------------
# The independent generator (tests/independent): crowded nests, lymphocytes
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def independent_slides(tmp_path_factory):
    """Small messy slides of the independent generator: DAPI by pseudo-inverse, truth labels."""
    need_independent_generator()
    import slides

    folder = tmp_path_factory.mktemp("independent")
    names = ["ind_null_a", "ind_null_b", "ind_3plus"]  # nuclei ~7, ~13, ~13 um; lymphocytes 6 um
    slides.make_cohort(folder, offset_column=True, messy=True, size=384, only=names)
    lib = pd.read_csv(folder / "spectra.csv").drop(columns="wavelength_nm")
    unmix = np.linalg.pinv(lib.to_numpy())[list(lib.columns).index("DAPI")]
    out = {}
    for n in names:
        cube = tifffile.imread(folder / f"{n}.ome.tif").astype(np.float32)
        dapi = np.tensordot(unmix, cube - 100, axes=1).astype(np.float32)
        out[n] = dapi, tifffile.imread(folder / f"{n}_truth_nuclei.tif")
    return out


def test_crowded_nests_and_lymphocytes_of_the_independent_generator(independent_slides):
    """Nests of touching textured nuclei next to bright 6 um lymphocytes.

    The nuclear scale answers weakly in a nest (the LoG's negative surround
    lies on the neighbours), so the strongest scale was that of lymphocytes
    and chromatin spots, and the most contrasted windows were lymphocyte
    clusters by the glass: 4.6-7.5 um for 11-12 um nuclei on the 1024 px
    slides. Now the largest scale answering at least a tenth of the
    strongest starts the refinement, from above.
    """
    for name, (dapi, truth) in independent_slides.items():
        true_um = PS * median_equivalent_diameter(truth)
        for hint in (None, 8):
            est = estimate_nucleus_diameter(dapi, PS, hint_um=hint)
            print(f"{name} hint {hint}: estimate {est:.2f} um, truth {true_um:.2f} um ({est / true_um - 1:+.1%})")
            assert abs(est / true_um - 1) < 0.15
        used, _ = resolve_nucleus_diameter(dapi, PS, 8, hint=True)
        f1 = match_instances(truth, segment_nuclei(dapi, PS, used), iou_threshold=0.5)["f1"]
        print(f"{name}: used {used:.2f} um, nuclei F1@0.5 {f1:.3f}")
        assert f1 >= 0.85
