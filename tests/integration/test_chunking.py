"""The chunk size changes nothing: a slide several chunks wide gives, step for step, the outputs of
the same slide in one chunk -- every CSV byte for byte, every Zarr array and QC statistic exactly.

The first test names what differs first when something does (an estimate, a level, the nuclei,
the cells, a row); the second compares everything.
"""

from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import assert_same_outputs, repo_config
from qdquant import pipeline, simulate
from qdquant.config import load_config

#: A 768² slide with the real-slide corrections switched on (library refinement, the slide's own
#: autofluorescence, field-of-view shading of 192-px fields): every estimate that samples the slide runs.
SLIDE = dict(her2_score="2+", shape=(768, 768), seed=104, drift_nm=3.0, shading=0.2, fov_px=192,
             off_library_af=True)
#: 3 x 3 chunks, and a ragged chunking that is not a multiple of the 16-px shading blocks.
CHUNK_SIZES = (256, 300)


def run_steps(root: Path, image: Path, chunk_size: int) -> Path:
    """Every per-sample step on ``image`` at this chunk size; returns the results folder."""
    (root / "samples.tsv").write_text(f"sample_id\timage\ns\t{image}\n")
    results = root / f"results{chunk_size}"
    cfg = load_config(repo_config(root / f"config{chunk_size}.yaml", root / "samples.tsv", results,
                                  chunk_size=chunk_size, illumination="estimate"))
    for step in pipeline.STEPS.values():
        step(cfg, "s")
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{chunk_size: results folder} of the slide in one chunk (2048) and in CHUNK_SIZES."""
    root = tmp_path_factory.mktemp("chunking")
    image = simulate.write_slide(simulate.simulate_slide(**SLIDE), root / "slides", "s")["image"]
    return {chunk_size: run_steps(root, image, chunk_size) for chunk_size in (2048, *CHUNK_SIZES)}


def all_arrays(group, prefix=""):
    """The paths of every array under a Zarr group."""
    yield from (f"{prefix}{name}" for name, _ in group.arrays())
    for name, sub in group.groups():
        yield from all_arrays(sub, f"{prefix}{name}/")


def rows_by_id(path: Path) -> dict[str, str]:
    """A per-cell CSV's lines by their first field (CellID), the header under ''."""
    lines = path.read_text().splitlines()
    return {"": lines[0], **{line.split(",", 1)[0]: line for line in lines[1:]}}


@pytest.mark.slow  # the five steps three times on a 768² slide: 40-60 s on two cores
def test_chunk_size_changes_no_estimate_array_or_row(runs):
    """Against one chunk: the sampled estimates (dark offset, shading, library, autofluorescence,
    noise), the abundances, residual, flags, nuclei, cells and their ids, the summary and QC
    statistics, and every row of cells.csv and measurements.csv are identical."""
    whole = runs[2048]
    assert (whole / "s" / "qc" / "illumination.png").is_file()  # the shading was found and divided out
    per_cell = {"s/cells.csv", "s/measurements.csv"}
    for chunk_size in CHUNK_SIZES:
        got = runs[chunk_size]
        csvs = sorted(str(p.relative_to(whole)) for p in whole.rglob("*.csv"))
        assert csvs == sorted(str(p.relative_to(got)) for p in got.rglob("*.csv"))
        for rel in sorted(set(csvs) - per_cell):
            assert (whole / rel).read_bytes() == (got / rel).read_bytes(), f"{rel} differs at chunk_size {chunk_size}"
        for stats in sorted((whole / "s" / "qc").glob("*.json")):
            assert stats.read_bytes() == (got / "s" / "qc" / stats.name).read_bytes(), stats.name
        a, b = (zarr.open_group(str(r / "s" / "unmixed.ome.zarr"), mode="r") for r in (whole, got))
        arrays = [name for name in all_arrays(a) if not name.startswith("labels/cells/")]
        assert "labels/nuclei/s0" in arrays and "s0" in arrays
        for name in arrays:  # every level of the image, the flags and the nuclei
            assert np.array_equal(a[name][...], b[name][...], equal_nan=True), f"{name} at chunk_size {chunk_size}"
        cells_a, cells_b = a["labels/cells/s0"][...], b["labels/cells/s0"][...]
        differ = cells_a != cells_b
        touched = sorted({int(i) for i in np.unique(np.r_[cells_a[differ], cells_b[differ]]) if i})
        assert not differ.any(), f"{differ.sum()} cell pixels differ at chunk_size {chunk_size}, cells {touched}"
        for rel in sorted(per_cell):
            rows_a, rows_b = rows_by_id(whole / rel), rows_by_id(got / rel)
            assert rows_a.keys() == rows_b.keys(), f"{rel}: other cells at chunk_size {chunk_size}"
            differ = sorted(cell for cell in rows_a if rows_a[cell] != rows_b[cell])
            assert not differ, f"{rel}: rows {differ} differ at chunk_size {chunk_size}"


@pytest.mark.slow  # shares the runs above
def test_chunk_size_changes_no_output(runs):
    """Every CSV byte for byte and every Zarr array exactly, the cells included."""
    for chunk_size in CHUNK_SIZES:
        compared = assert_same_outputs(runs[2048], runs[chunk_size])
        print(f"chunk_size {chunk_size} equals one chunk: {len(compared)} CSVs and Zarr arrays")
