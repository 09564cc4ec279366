"""The command line: bad input is one line on stderr, a non-zero exit, nothing half-written; a step
given little memory works in smaller chunks and gives the same outputs."""

import logging
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import repo_config, write_project
from qdquant import simulate
from qdquant.cli import main
from qdquant.io import read_ome_zarr, write_ome_tiff


def test_help_is_fast_and_lists_steps():
    out = subprocess.run([sys.executable, "-m", "qdquant", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for step in ("unmix", "segment", "quantify", "score", "report", "cohort", "simulate", "library"):
        assert step in out.stdout


def test_check_accepts_a_valid_project(tiny_project, capsys):
    assert main(["check", "--config", str(tiny_project)]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize(
    "breaks, fragment",
    [
        (lambda root: (root / "samples.tsv").write_text("sample_id\timage\ns1\tnowhere.tif\n"), "nowhere.tif: image file not found"),
        (lambda root: (root / "panel.tsv").write_text((root / "panel.tsv").read_text().replace("QD655", "QD999")), "endmember 'QD999'"),
        (lambda root: (root / "config.yaml").write_text("samples: [\n"), "malformed YAML"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_project, capsys, breaks, fragment):
    breaks(tiny_project.parent)
    assert main(["check", "--config", str(tiny_project)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qdquant: error:") and fragment in err[0]


def test_step_on_nan_image_fails_cleanly(tmp_path):
    """A float image holding NaN: a clear error, and no unmixed.ome.zarr left behind."""
    config = write_project(tmp_path / "p")
    cube = np.full((8, 64, 64), 100.0, np.float32)
    cube[3, 10, 10] = np.nan
    write_ome_tiff(tmp_path / "p" / "s1.ome.tif", cube, pixel_size_um=0.5)
    proc = subprocess.run(
        [sys.executable, "-m", "qdquant", "unmix", "--config", str(config), "--sample", "s1"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("qdquant: error:") and "NaN" in last and "s1.ome.tif: " in last
    assert proc.stderr.count("qdquant: error:") == 1 and "Traceback" not in proc.stderr
    results = tmp_path / "p" / "results"
    assert not results.exists() or not any(results.rglob("*.zarr"))


# ----------------------------------------------------------------------------
# steps run by the command line with little memory


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    slide = simulate.simulate_slide(her2_score="2+", shape=(320, 320), seed=11)
    image = simulate.write_slide(slide, root / "slides", "small")["image"]
    (root / "samples.tsv").write_text(f"sample_id\timage\nsmall\t{image}\n")
    return root


def _repo_config(root, name):
    return repo_config(root / f"{name}.yaml", root / "samples.tsv", root / name, unmixing={"refine_library": False})


def test_step_with_little_memory_uses_smaller_chunks_and_same_outputs(small_slide, monkeypatch, capsys, caplog):
    """--mem-mb forces 256-px chunks in unmix; later steps (default chunks) read that zarr; same cells."""
    monkeypatch.setenv("QDQUANT_PROGRESS_MIN_S", "0")
    caplog.set_level(logging.INFO, logger="qdquant")
    plain, tight = _repo_config(small_slide, "plain"), _repo_config(small_slide, "tight")

    assert main(["unmix", "--config", str(tight), "--sample", "small", "--threads", "1", "--mem-mb", "5"]) == 0
    err = capsys.readouterr().err
    assert "% Completed" in err  # a progress bar (minimum 0)
    assert "chunk size 256 px" in caplog.text
    caplog.clear()
    assert main(["unmix", "--config", str(plain), "--sample", "small", "--threads", "1"]) == 0
    assert "chunk size 2048 px" in caplog.text

    def level0(name):  # as stored: dask chunks are the zarr's
        return read_ome_zarr(small_slide / name / "small" / "unmixed.ome.zarr")[0]

    assert level0("tight").chunksize[1:] == (256, 256)
    assert level0("plain").chunksize[1:] == (320, 320)
    np.testing.assert_array_equal(level0("tight").compute(), level0("plain").compute())

    for step in ("segment", "quantify"):  # default chunk size over a zarr stored in 256-px chunks
        for config in (tight, plain):
            assert main([step, "--config", str(config), "--sample", "small", "--threads", "1"]) == 0
    tables = {n: pd.read_csv(small_slide / n / "small" / "measurements.csv") for n in ("tight", "plain")}
    assert len(tables["plain"]) > 50
    geometry = ["CellID", "X_centroid", "Y_centroid", "Area", "NucleusArea"]
    pd.testing.assert_frame_equal(tables["tight"][geometry], tables["plain"][geometry])
    clean = (tables["tight"]["n_flagged_px"] == 0) & (tables["plain"]["n_flagged_px"] == 0)
    assert clean.mean() > 0.9
    np.testing.assert_allclose(tables["tight"].loc[clean, "HER2"], tables["plain"].loc[clean, "HER2"], rtol=1e-6)
