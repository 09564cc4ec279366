"""The command line: bad input is one line on stderr, a non-zero exit, nothing half-written."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qdquant.cli import main

REPO = Path(__file__).resolve().parents[1]


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
    import numpy as np

    from conftest import write_project
    from qdquant.io import write_ome_tiff

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
