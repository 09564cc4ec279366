"""Pipeline steps run one after another on small projects: chunking changes nothing, and the run
records what it was made from (reports, provenance)."""

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import repo_config
from qdquant import pipeline, simulate
from qdquant.config import load_config
from qdquant.report import sample_warnings


@pytest.mark.slow  # four steps twice on a 320² slide: 10-16 s
def test_chunked_pipeline_equals_one_chunk(tmp_path, monkeypatch):
    """A slide processed in 128-px chunks, and scored 7 rows at a time, gives
    the cells.csv, cells.h5ad and summary of one chunk (ids aside)."""
    import anndata

    slide = simulate.simulate_slide(her2_score="2+", shape=(320, 320), seed=11)
    paths = simulate.write_slide(slide, tmp_path / "slides", "small")
    tables, summaries, h5ads = {}, {}, {}
    for chunk in (2048, 128):
        monkeypatch.setattr(pipeline.common, "TABLE_ROWS", 7 if chunk == 128 else 10**6)
        (tmp_path / "samples.tsv").write_text(f"sample_id\timage\nsmall\t{paths['image']}\n")
        cfg = load_config(repo_config(tmp_path / f"config{chunk}.yaml", tmp_path / "samples.tsv",
                                      tmp_path / f"results{chunk}", chunk_size=chunk,
                                      unmixing={"refine_library": False}))
        for step in ("unmix", "segment", "quantify", "score"):
            pipeline.STEPS[step](cfg, "small")
        table = pd.read_csv(pipeline.outputs(cfg, "small")["cells"], dtype={"her2_class": str})
        tables[chunk] = table.assign(y=table.Y_centroid.round(3), x=table.X_centroid.round(3)).sort_values(["y", "x"])
        summaries[chunk] = pd.read_csv(pipeline.outputs(cfg, "small")["summary"]).iloc[0]
        h5ads[chunk] = anndata.read_h5ad(pipeline.outputs(cfg, "small")["h5ad"]), table
    whole, chunked = tables[2048], tables[128]
    assert len(whole) > 50 and len(whole) == len(chunked)
    numeric = [c for c in whole.columns if c not in ("CellID", "her2_class", "imageid")]
    np.testing.assert_allclose(whole[numeric].to_numpy(float), chunked[numeric].to_numpy(float), rtol=1e-5, atol=1e-5)
    assert (whole["her2_class"].to_numpy() == chunked["her2_class"].to_numpy()).all()
    assert set(whole["imageid"]) == {"small"}
    for key, value in summaries[2048].items():
        if isinstance(value, float):
            assert summaries[128][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
        else:
            assert summaries[128][key] == value, key
    # The h5ad written in slices holds every cell once, in cells.csv's order.
    for adata, table in h5ads.values():
        assert adata.n_obs == len(table)
        np.testing.assert_allclose(adata.obsm["spatial"], table[["X_um", "Y_um"]].to_numpy(), rtol=1e-6)
        assert (adata.obs["her2_class"].astype(str).to_numpy() == table["her2_class"].to_numpy()).all()


def test_reports_name_their_inputs_and_the_cohort_page_its_scores(tiny_project):
    """report.html says what the numbers were made from; the cohort page shows every sample's
    scores and warnings, not only its statuses."""
    import qdquant

    cfg = load_config(tiny_project)
    pipeline.run_sample(cfg, "s1")
    pipeline.cohort(cfg)
    page = pipeline.outputs(cfg, "s1")["report"].read_text()
    for text in (str(cfg.sample("s1").image), "pixel size (µm)</th><td>0.5<", str(tiny_project.parent / "spectra.csv"),
                 "library refined on the slide", "endmembers fitted", "DAPI, QD565, QD655, Offset",
                 f"qdquant version</th><td>{qdquant.__version__}", "report written"):
        assert text in page, text
    cohort = (cfg.results / "cohort_report.html").read_text()
    for text in ("HER2 0 (%)", "HER2 3+ (%)", "HER2 score", "HER2 category", "ER % positive", "ER H-score",
                 "ER status", "warnings"):
        assert f"<th>{text}</th>" in cohort, text
    summary = pd.read_csv(pipeline.outputs(cfg, "s1")["summary"]).iloc[0].to_dict()
    stats = json.loads(pipeline.outputs(cfg, "s1")["unmixing_qc"].with_suffix(".json").read_text())
    warnings = sample_warnings(summary, stats, cfg)
    assert warnings and all(html.escape(w) in cohort for w in warnings)


def test_the_run_records_its_provenance(tiny_project):
    """provenance/params.yml (contract, "Runs"): resolved config, thresholds and library used per
    sample, versions and input checksums (checked against hashlib here)."""
    import hashlib

    import yaml

    import qdquant

    from qdquant import provenance

    cfg = load_config(tiny_project)
    provenance.record_run_start(pipeline.provenance_path(cfg).parent)  # as the workflow does when it starts
    started = provenance.run_start(pipeline.provenance_path(cfg).parent)
    pipeline.run_sample(cfg, "s1")
    pipeline.cohort(cfg)
    record = yaml.safe_load(pipeline.provenance_path(cfg).read_text())
    assert record["config"]["her2"]["t_faint"] == cfg.her2.t_faint
    sample = record["samples"]["s1"]
    image = cfg.sample("s1").image
    assert sample["image"]["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert sample["image"]["method"] == "whole" and sample["image"]["bytes"] == image.stat().st_size
    assert sample["library_used"]["endmembers"] == list(pd.read_csv(pipeline.outputs(cfg, "s1")["spectra_used"]).columns[1:])
    assert sample["thresholds_used"]["her2_t_faint"] == cfg.her2.t_faint
    assert record["versions"]["qdquant"] and record["versions"]["numpy"] == np.__version__
    run = record["run"]
    assert run["qdquant_version"] == qdquant.__version__ and run["host"]
    assert run["started"] == started <= run["finished"] and run["git_revision"] != ""  # None for an installed package
    assert pd.read_csv(pipeline.outputs(cfg, "s1")["summary"])["qdquant_version"].item() == qdquant.__version__
    assert record["inputs"]["spectra"]["sha256"] == hashlib.sha256(
        Path(cfg.raw["spectra"]).read_bytes()).hexdigest()
