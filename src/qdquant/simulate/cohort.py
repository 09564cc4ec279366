"""The bundled test cohort and the messy cohort, and writing a cohort."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from qdquant.simulate.slide import simulate_slide, write_slide


# ----------------------------------------------------------------------------
# the bundled test cohort


def test_cohort() -> dict[str, dict]:
    """Sample id → :func:`simulate_slide` keyword arguments of the bundled test data.

    Five 512² slides, one per HER2 reading (null, ultralow, 1+, 2+, 3+), and
    one harder 2+ slide (crowded nests, 3 nm spectral drift, 20 % shading,
    off-library autofluorescence, 2 electrons per count). Every sample-level
    truth is well away from the contract's 10 % (and 1 %) boundaries, over all
    cells and over tumour cells. Each has a fixed seed.
    """
    return {
        "her2_null": dict(her2_score="null", seed=101, er_pct=0.0, pr_pct=0.0,
                          ki67_pct=45.0, mtor_pct=30.0),
        "her2_ultralow": dict(her2_score="ultralow", seed=102, er_pct=85.0, pr_pct=55.0,
                              ki67_pct=8.0, mtor_pct=50.0),
        "her2_1plus": dict(her2_score="1+", seed=103, er_pct=70.0, pr_pct=5.0,
                           ki67_pct=30.0, mtor_pct=60.0),
        "her2_2plus": dict(her2_score="2+", seed=104, er_pct=60.0, pr_pct=45.0,
                           ki67_pct=30.0, mtor_pct=40.0),
        "her2_3plus": dict(her2_score="3+", seed=105, er_pct=0.0, pr_pct=0.0,
                           ki67_pct=40.0, mtor_pct=70.0),
        "her2_2plus_hard": dict(her2_score="2+", seed=106, er_pct=80.0, pr_pct=45.0,
                                ki67_pct=35.0, mtor_pct=50.0, crowded=True, drift_nm=3.0,
                                shading=0.2, off_library_af=True, photons_per_count=2.0),
    }


test_cohort.__test__ = False  # not a pytest test, despite its name


#: The four real-slide phenomena of :func:`messy_cohort`, each at the top of its documented range.
MESSY = dict(crowded=True, drift_nm=4.0, shading=0.25, off_library_af=True, photons_per_count=1.5)


def messy_cohort(size: int = 512, fov_px: int = 256) -> dict[str, dict]:
    """Sample id → :func:`simulate_slide` keyword arguments of a messy cohort.

    One ``size``² slide per HER2 reading (null, ultralow, 1+, 2+, 3+), every
    one with all four real-slide phenomena (:data:`MESSY`): crowded nests
    with touching nuclei, 4 nm of spectral drift, 25 % darker corners of
    ``fov_px`` fields of view, off-library autofluorescence (red blood cells
    in stroma, lipofuscin granules in tumour cells' cytoplasm) and 1.5
    electrons per count, with HER2 intensities spread across each class's
    bin (``her2_levels="continuous"``), so that a cell near a threshold
    moves when its light is misjudged. Receptor designs as in
    :func:`test_cohort`; seeds of their own. Shading can be estimated from about 8 x 8 FOVs of 256 px
    (``size=2048``); a 512² slide holds too few.
    """
    cohort = {}
    for i, (name, kwargs) in enumerate(list(test_cohort().items())[:5]):
        cohort[f"messy_{name.removeprefix('her2_')}"] = {
            **kwargs, **MESSY, "lipofuscin_in_cells": True, "her2_levels": "continuous",
            "shape": (size, size), "fov_px": fov_px,
            "seed": 301 + i,
        }
    return cohort


def write_cohort(
    directory: str | os.PathLike, cohort: dict[str, dict] | None = None
) -> dict[str, dict[str, Path]]:
    """Simulate and write every slide of a cohort, plus one table of their truths.

    Parameters
    ----------
    directory : path-like
        Output folder.
    cohort : dict, optional
        Sample id → :func:`simulate_slide` keyword arguments; default
        :func:`test_cohort`.

    Returns
    -------
    dict
        Sample id → the paths of :func:`write_slide`; key ``"_cohort"`` →
        ``{"truth": cohort_truth.csv}`` (one row per sample: ``sample_id``,
        ``pixel_size_um`` and every scalar truth value).
    """
    from qdquant.io import write_csv

    cohort = test_cohort() if cohort is None else cohort
    directory = Path(directory)
    out: dict[str, dict[str, Path]] = {}
    rows = []
    for sample_id, kwargs in cohort.items():
        slide = simulate_slide(**kwargs)
        out[sample_id] = write_slide(slide, directory, sample_id)
        row = {"sample_id": sample_id}
        row.update({k: v for k, v in slide.truth.items() if not isinstance(v, (dict, list))})
        rows.append(row)
    path = directory / "cohort_truth.csv"
    write_csv(pd.DataFrame(rows), path)
    out["_cohort"] = {"truth": path}
    return out
