"""What the workflow's rules ask a cluster for, from the slide's size (qdquant.resources)."""

import numpy as np
import pytest

from qdquant import resources
from qdquant.config import chunk_mem_mb
from qdquant.io import write_ome_tiff


def test_megapixels_from_the_header(tmp_path):
    write_ome_tiff(tmp_path / "s.ome.tif", np.zeros((3, 300, 200), np.uint16), pixel_size_um=0.5)
    assert resources.slide_megapixels(tmp_path / "s.ome.tif", default=1.0) == pytest.approx(0.06)
    assert resources.slide_megapixels(tmp_path / "not_yet.ome.tif", default=4.2) == 4.2


def test_memory_keeps_the_chunk_and_grows_with_cells_and_retries():
    kw = dict(chunk_size=2048, n_bands=31, threads=2)
    small, large = (resources.step_mem_mb("quantify", mpx, **kw) for mpx in (0.25, 900))
    assert small >= chunk_mem_mb(2048, 31, 2)
    assert large - small == pytest.approx(1.5 * (900 - 0.25), abs=1)  # ~1000 cells per Mpx, 1.5 KB each
    assert resources.step_mem_mb("unmix", 900, **kw) == resources.step_mem_mb("unmix", 0.25, **kw)  # chunked
    assert resources.step_mem_mb("unmix", 1, attempt=3, **kw) == pytest.approx(
        2 * resources.step_mem_mb("unmix", 1, **kw), abs=1)


def test_runtime_scales_with_pixels_and_threads():
    test_field = resources.step_runtime_min("segment", 0.25, n_bands=31, threads=2)
    assert test_field == resources.MIN_RUNTIME_MIN
    slide = resources.step_runtime_min("segment", 900, n_bands=31, threads=2)  # a 30000² slide
    assert slide == pytest.approx(3 * (20 + 2.8 * 900) / 2 / 60, abs=1)
    assert resources.step_runtime_min("segment", 900, n_bands=31, threads=8) < slide / 3
    with pytest.raises(ValueError, match="unknown step"):
        resources.step_runtime_min("cohort", 1, n_bands=31)
