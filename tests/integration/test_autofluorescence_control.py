"""Autofluorescence measured on an unstained control slide named in the sample sheet, used by
the unmix step (the spectrum itself: tests/unit/library; the sheet's checks: tests/unit/config)."""

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, repo_config
from qdquant import io, pipeline, simulate
from qdquant.config import load_config

#: a tissue whose autofluorescence is mostly flavin, where the library's AF is mostly NADH
FLAVIN_RICH = {"NADH": 0.15, "Riboflavin": 0.85}


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """A stained HER2-null slide and an unstained section, both with the flavin-rich AF."""
    root = tmp_path_factory.mktemp("af_control")
    stained = simulate.simulate_slide(her2_score="null", shape=(384, 384), seed=31, af_mix=FLAVIN_RICH)
    unstained = simulate.simulate_slide(her2_score="null", shape=(384, 384), seed=32, af_mix=FLAVIN_RICH,
                                        unstained=True)
    paths = {"stained": simulate.write_slide(stained, root, "stained")["image"],
             "unstained": simulate.write_slide(unstained, root, "unstained")["image"]}
    return root, stained, paths


def _unmix(root, paths, with_control):
    control = paths["unstained"] if with_control else ""
    (root / "samples.tsv").write_text(f"sample_id\timage\tunstained\ns\t{paths['stained']}\t{control}\n")
    cfg = load_config(repo_config(root / "config.yaml", root / "samples.tsv", root / f"results{int(with_control)}",
                                  unmixing={"refine_library": False}))
    assert (cfg.samples[0].unstained is not None) == with_control
    pipeline.unmix_sample(cfg, "s")
    out = pipeline.outputs(cfg, "s")
    image, names = io.read_ome_zarr(out["zarr"])
    return pd.read_csv(out["spectra_used"]), np.asarray(image), names


def test_unmix_uses_the_controls_autofluorescence(slides):
    root, truth, paths = slides
    results = {flag: _unmix(root, paths, flag) for flag in (False, True)}
    true_af = truth.true_spectra["AF"].to_numpy()
    af_error = {f: np.abs(used["AF"].to_numpy() - true_af).max() for f, (used, _, _) in results.items()}
    assert af_error[True] < 0.1 < 0.4 < af_error[False], af_error
    # the other endmembers are the library's, untouched
    used = results[True][0]
    library = pd.read_csv(REPO / "config" / "spectra.csv")
    np.testing.assert_allclose(used["QD655"], library["QD655"])
    # a better AF spectrum: a smaller residual, and less autofluorescence read as HER2 on a HER2-null slide
    residual = {f: np.median(img[-1]) for f, (_, img, _) in results.items()}
    her2_error = {f: np.abs(img[names.index("QD655")] - truth.abundance("QD655")).mean()
                  for f, (_, img, names) in results.items()}
    # (the slide is tissue edge to edge: its faintest autofluorescence goes with the dark offset
    # subtracted from every pixel, so there is less of it left to misfit than on the raw counts)
    assert residual[True] < 0.97 * residual[False], residual
    assert her2_error[True] < 0.75 * her2_error[False], her2_error
