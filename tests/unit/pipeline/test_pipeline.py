"""Pipeline steps on small inputs (measurement tables, a 64² project): edge cases a slide can bring.

Whole steps run one after another: tests/integration/test_pipeline.py."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from qdquant import io, pipeline
from qdquant.config import load_config
from qdquant.errors import InputError
from qdquant.report import sample_warnings


def measurements(n_cells=20, *, sectors=36, her2=100.0, seed=0):
    """A measurements table as the quantify step writes it, for the tiny panel."""
    rng = np.random.default_rng(seed)
    table = {"CellID": np.arange(1, n_cells + 1), "X_centroid": rng.uniform(0, 60, n_cells),
             "Y_centroid": rng.uniform(0, 60, n_cells), "Area": 100, "NucleusArea": 40, "n_flagged_px": 0}
    table["X_um"], table["Y_um"] = table["X_centroid"] * 0.5, table["Y_centroid"] * 0.5
    for marker in ("DAPI", "ER", "HER2"):
        table[marker] = rng.uniform(0, 200, n_cells)
        for compartment in ("nucleus", "cytoplasm", "membrane"):
            table[f"{marker}_{compartment}_mean"] = rng.uniform(0, 200, n_cells)
    for s in range(sectors):
        table[pipeline.SECTOR_SUM.format(s)] = her2 * 10.0
        table[pipeline.SECTOR_NPX.format(s)] = 10
    return pd.DataFrame(table)


def test_sample_without_tumour_cells_is_valid_and_not_assessable(tiny_project):
    data = yaml.safe_load(tiny_project.read_text())
    data["tumour"] = {"marker": "HER2", "threshold": 1e9}  # no cell reaches it
    tiny_project.write_text(yaml.safe_dump(data))
    cfg = load_config(tiny_project)
    cells, summary = pipeline.score_cells(cfg, measurements())
    assert summary["n_cells"] == 20 and summary["n_tumour_cells"] == 0
    assert not cells["is_tumour"].any()
    assert summary["her2_score"] is None and summary["her2_category"] == "not assessable"
    assert np.isnan(summary["ER_pct_positive"]) and summary["ER_status"] == "not assessable"
    warnings = sample_warnings(summary, None, cfg)
    assert any("No tumour cells" in w for w in warnings)


def test_scoring_a_sample_without_cells_writes_empty_tables(tiny_project):
    import anndata

    cfg = load_config(tiny_project)
    sample = cfg.samples[0].sample_id
    out = pipeline.outputs(cfg, sample)
    io.write_csv(measurements(n_cells=0), out["measurements"])
    with pytest.warns(UserWarning, match="no cells"):
        pipeline.score_sample(cfg, sample)
    cells = pd.read_csv(out["cells"])
    assert len(cells) == 0 and {"CellID", "her2_class"} <= set(cells.columns)
    assert anndata.read_h5ad(out["h5ad"]).n_obs == 0
    summary = pd.read_csv(out["summary"]).iloc[0]
    assert summary["n_cells"] == 0 and summary["her2_category"] == "not assessable"


def test_scores_over_tumour_cells_only(tiny_project):
    data = yaml.safe_load(tiny_project.read_text())
    data["tumour"] = {"marker": "DAPI", "threshold": 100.0}
    tiny_project.write_text(yaml.safe_dump(data))
    cfg = load_config(tiny_project)
    table = measurements(n_cells=40)
    table["DAPI_membrane_mean"] = np.where(np.arange(40) < 10, 150.0, 5.0)  # 10 tumour cells
    table["ER_nucleus_mean"] = np.where(np.arange(40) < 10, 100.0, 0.0)  # ER 2+ in every tumour cell
    cells, summary = pipeline.score_cells(cfg, table)
    assert summary["n_tumour_cells"] == 10 and summary["tumour_threshold"] == 100.0
    assert summary["ER_pct_positive"] == 100.0 and summary["ER_hscore"] == 200.0
    assert summary["her2_score"] == "2+"  # every sector at 100: intensity 2+, complete


def test_missing_channel_is_a_clear_error(tiny_project, tmp_path):
    cfg = load_config(tiny_project)
    out = pipeline.outputs(cfg, "s1")
    image = np.zeros((3, 32, 32), np.float32)
    io.write_ome_zarr(out["zarr"], image, ["DAPI", "QD565", "residual"], pixel_size_um=0.5, chunk_size=32)
    labels = np.zeros((32, 32), np.int32)
    labels[4:12, 4:12] = 1
    io.write_labels(out["zarr"], {"nuclei": labels, "cells": labels}, chunk_size=32)
    with pytest.raises(InputError, match="no channel 'QD655'"):
        pipeline.quantify_sample(cfg, "s1")


def test_pixel_sample_strides_its_windows_to_at_most_max_pixels():
    import dask.array as da

    rng = np.random.default_rng(3)
    image = da.from_array(rng.random((2, 2048, 2048)).astype(np.float32), chunks=(2, 1024, 1024))
    full, = pipeline._pixel_sample(image, grid_px=1024)
    assert full.shape == (2, 384, 4 * 384)
    strided, = pipeline._pixel_sample(image, max_pixels=100_000, grid_px=1024)
    assert strided.shape[1] * strided.shape[2] <= 100_000
    np.testing.assert_array_equal(strided, full[:, ::3, ::3])  # windows 384 wide: stride 3 keeps each's columns


def test_pixel_sample_windows_lie_on_the_slide_not_on_its_chunks():
    """The same pixels whatever the chunking: windows centred in the cells of a fixed grid."""
    import dask.array as da

    image = np.arange(2 * 700 * 500, dtype=np.float32).reshape(2, 700, 500)
    samples = [pipeline.pixel_sample(da.from_array(image, chunks=chunks), grid_px=256, max_pixels=50_000)[0]
               for chunks in ((2, 700, 500), (2, 100, 64), (1, 256, 300))]
    for sample in samples[1:]:
        np.testing.assert_array_equal(sample, samples[0])
    assert pipeline.sampling.sample_grid(image.shape, 256) == ((256, 256, 188), (256, 244))
    # 3 x 2 cells, 4 evenly spaced: 0, 2, 3, 5; the first window is centred in cell (0, 0)
    assert samples[0][0, 0, 0] == image[0, (256 - 188) // 2, 0]


def test_cube_sample_reads_the_same_windows_from_the_tiles(tmp_path):
    """The sample read from the file's tiles equals the windows of the chunked cube, shading divided out."""
    from qdquant import illumination, simulate

    slide = simulate.simulate_slide(her2_score="2+", shape=(512, 512), seed=14)
    path = simulate.write_slide(slide, tmp_path, "s")["image"]
    profile = np.linspace(0.7, 1.0, 96 * 80, dtype=np.float32).reshape(96, 80)
    shading = (illumination.Shading((96, 80), profile), np.full(slide.cube.shape[0], 100.0))
    with io.open_cube(path, chunk_size=256) as cube:
        assert cube.tiles is not None and cube.tiles.chunksize != cube.data.chunksize
        plain = pipeline._cube_sample(cube, max_pixels=20_000)
        np.testing.assert_array_equal(plain, pipeline._pixel_sample(cube.data, max_pixels=20_000)[0])
        corrected = pipeline._cube_sample(cube, shading, max_pixels=20_000)
        expected = pipeline._pixel_sample(illumination.correct_shading(cube.data, *shading), max_pixels=20_000)[0]
        np.testing.assert_allclose(corrected, expected, rtol=1e-6)
        assert not np.allclose(corrected, plain)


def mcmicro_to_scimap(paths, split="X_centroid", cell_id="CellID"):
    """scimap's ``pp.mcmicro_to_scimap`` (2.3.6) without its optional steps: the cell names, the
    markers (X) and the metadata (obs) it makes of MCQuant-style tables."""
    tables = []
    for path in map(Path, paths):
        d = pd.read_csv(path)
        if "imageid" not in d.columns:
            d["imageid"] = path.stem  # the file name's stem: "cells" for every cells.csv
        d.index = d["imageid"].astype(str) + "_" + d[cell_id].astype(str)
        d = d[[c for c in d.columns if c != cell_id] + [cell_id]]
        d = d[[c for c in d.columns if c != "imageid"] + ["imageid"]]
        tables.append(d)
    for d in tables:
        d.columns = tables[0].columns  # scimap overwrites the names by position
    data = pd.concat(tables, axis=0, sort=False)
    at = data.columns.get_loc(split)
    return data.iloc[:, :at], data.iloc[:, at:]


def test_two_samples_combine_in_scimap(tiny_project):
    """Every table is named cells.csv: the imageid column names the sample, and only the whole-cell
    means come before X_centroid (the compartment means are metadata to scimap, not markers)."""
    (tiny_project.parent / "samples.tsv").write_text(
        "sample_id\timage\n" + "".join(f"{s}\t{tiny_project.parent / 's1.ome.tif'}\n" for s in ("s1", "s2")))
    cfg = load_config(tiny_project)
    paths = []
    for seed, sample in enumerate(("s1", "s2")):
        out = pipeline.outputs(cfg, sample)
        io.write_csv(measurements(seed=seed), out["measurements"])
        pipeline.score_sample(cfg, sample)
        paths.append(out["cells"])
    try:
        import scimap

        adata = scimap.pp.mcmicro_to_scimap(paths, remove_dna=False, log=False)
        x, obs = adata.to_df(), adata.obs
    except ImportError:
        x, obs = mcmicro_to_scimap(paths)
    assert x.index.is_unique and len(x) == 40
    assert list(x.columns) == ["DAPI", "ER", "HER2"]  # the markers, nothing else
    assert np.isfinite(x.to_numpy(float)).all()
    assert sorted(set(obs["imageid"])) == ["s1", "s2"]
    assert {"ER_nucleus_mean", "her2_class", "X_um"} <= set(obs.columns)


def test_the_smoothing_takes_its_direction_from_the_membranes_light():
    from qdquant.pipeline.unmix import membrane_guide

    config = Path(__file__).resolve().parents[3] / "config"
    cfg = load_config(config / "config.yaml")
    panel = pd.read_csv(config / "panel.tsv", sep="\t")
    spectra = pd.read_csv(config / "spectra.csv")
    membrane = panel.loc[(panel.role == "membrane_stain") | (panel.compartment == "membrane"), "endmember"]
    assert sorted(membrane) == ["QD655", "QD705"]  # HER2 and the E-cadherin stain
    expected = sum(spectra[e] / spectra[e].sum() for e in membrane).to_numpy()
    np.testing.assert_allclose(membrane_guide(cfg, cfg.library), expected)
    # a panel without a membrane stain or membrane marker: the total light
    no_membrane = tuple(r for r in cfg.panel if r.compartment != "membrane" and r.role != "membrane_stain")
    assert membrane_guide(type("Cfg", (), {"panel": no_membrane})(), cfg.library) is None
