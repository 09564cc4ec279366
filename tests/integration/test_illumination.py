"""Field-of-view shading on a whole messy slide: estimated, and divided out by the unmix step.

A 2048² slide of about 110 fields of view (a minute to simulate), so the module is ``slow``;
the estimator's parts are unit-tested on small arrays in tests/unit/illumination.
"""

import json

import dask.array as da
import numpy as np
import pytest

from conftest import repo_config
from qdquant import illumination, io, pipeline, simulate
from qdquant.config import load_config

pytestmark = pytest.mark.slow


def _max_error(shading, truth):
    est = illumination.shading_field(shading, 0, truth.shape[0], 0, truth.shape[1])
    return float(np.abs(est / truth - 1).max())


@pytest.fixture(scope="module")
def shaded_slide(tmp_path_factory):
    """A messy 2048² slide of 192-px fields of view (about 110 of them), 20 % darker corners."""
    root = tmp_path_factory.mktemp("shading")
    slide = simulate.simulate_slide(her2_score="2+", shape=(2048, 2048), seed=3, shading=0.2, fov_px=192,
                                    crowded=True, off_library_af=True, photons_per_count=2.0, drift_nm=3.0)
    path = simulate.write_slide(slide, root, "shaded")["image"]
    return root, slide, path


def test_estimated_from_a_messy_slide(shaded_slide):
    _, slide, _ = shaded_slide
    a = slide.library.drop(columns="wavelength_nm").to_numpy()
    cube = da.from_array(slide.cube, chunks=(31, 512, 512))
    shading, _, _ = illumination.estimate_slide_shading(cube, a, list(slide.library.columns[1:]).index("DAPI"))
    assert abs(shading.fov_px[0] - 192) <= 3 and abs(shading.fov_px[1] - 192) <= 3, shading.fov_px
    # uncorrected, intensities are off by up to 25 % (1 / 0.8); corrected, by less than 10 %
    assert _max_error(illumination.Shading((2048, 2048), np.ones((2048, 2048), np.float32)), slide.shading) > 0.24
    assert _max_error(shading, slide.shading) < 0.1


def test_a_large_slide_is_estimated_on_evenly_spaced_regions(shaded_slide, monkeypatch):
    """With max_pixels below the slide's, the estimate reads half of its 16 regions (the
    others' blocks NaN, the read ones' as in a full read) and still finds the shading."""
    _, slide, _ = shaded_slide
    a = slide.library.drop(columns="wavelength_nm").to_numpy()
    nuclear = list(slide.library.columns[1:]).index("DAPI")
    monkeypatch.setattr(illumination, "GRID_PX", 512)  # a 2048² slide as a whole slide of 2048² regions
    cube = da.from_array(slide.cube, chunks=(31, 700, 300))  # regions, not chunks
    shading, part, offset = illumination.estimate_slide_shading(cube, a, nuclear, max_pixels=8 * 512 * 512)
    full = illumination.nuclear_brightness(cube, np.linalg.pinv(a)[nuclear], a[:, nuclear], offset, max_pixels=None)
    per_chunk = 512 // illumination.BIN_PX
    read = np.isfinite(part).reshape(4, per_chunk, 4, per_chunk).any(axis=(1, 3))
    assert read.sum() == 8
    np.testing.assert_array_equal(part[np.repeat(np.repeat(read, per_chunk, 0), per_chunk, 1)],
                                  full[np.repeat(np.repeat(read, per_chunk, 0), per_chunk, 1)])
    assert abs(shading.fov_px[0] - 192) <= 3 and abs(shading.fov_px[1] - 192) <= 3, shading.fov_px
    # half of 110 FOVs: a FOV size 1-2 px less exact than from all of them (there < 0.1); still
    # well below the uncorrected 0.25 (whole slides, thousands of FOVs, read at most 2^26 px)
    assert _max_error(shading, slide.shading) < 0.2


def test_unmix_step_applies_it(shaded_slide):
    root, slide, path = shaded_slide
    (root / "samples.tsv").write_text(f"sample_id\timage\nshaded\t{path}\n")
    dapi = {}
    for mode in ("none", "estimate"):
        cfg = load_config(repo_config(root / f"{mode}.yaml", root / "samples.tsv", root / mode,
                                      illumination=mode, unmixing={"refine_library": False}))
        pipeline.unmix_sample(cfg, "shaded")
        image, names = io.read_ome_zarr(pipeline.outputs(cfg, "shaded")["zarr"])
        dapi[mode] = np.asarray(image[names.index("DAPI")])
    qc = json.loads((root / "estimate" / "shaded" / "qc" / "illumination.json").read_text())
    assert qc["applied"] and (root / "estimate" / "shaded" / "qc" / "illumination.png").is_file()
    # DAPI over the nuclei vs its unshaded truth: in the FOV corners (shading < 0.88) relative
    # to the FOV centres (> 0.97); other misfits (3 nm of drift) bias both alike
    true = slide.abundance("DAPI")
    nuclei = true > 60
    corners, centres = nuclei & (slide.shading < 0.88), nuclei & (slide.shading > 0.97)
    falloff = {m: np.median(d[corners] / true[corners]) / np.median(d[centres] / true[centres])
               for m, d in dapi.items()}
    assert falloff["none"] < 0.9, falloff
    assert abs(falloff["estimate"] - 1) < 0.4 * abs(falloff["none"] - 1), falloff
