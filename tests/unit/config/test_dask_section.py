"""The ``dask`` config section, and the chunk size that fits a step's memory (qdquant.config)."""

from __future__ import annotations

import pytest
import yaml

from qdquant.config import (
    CHUNK_MEMORY_FRACTION,
    UNMIX_BYTES_PER_PX_PER_BAND,
    Dask,
    chunk_mem_mb,
    chunk_size_for,
    load_config,
    validate_config_dict,
)
from qdquant.errors import InputError

MINIMAL = {"samples": "s.tsv", "spectra": "x.csv", "panel": "p.tsv"}


# ----------------------------------------------------------------------------
# schema and parsing


@pytest.mark.parametrize(
    "section",
    [
        {},
        {"scheduler": "threads"},
        {"scheduler": "processes", "num_workers": 4},
        {"scheduler": "synchronous", "num_workers": None},
        {"scheduler": "tcp://10.0.0.5:8786"},
        {"scheduler": "tls://scheduler.example.org:8786", "num_workers": 1},
    ],
)
def test_schema_accepts_dask_section(section):
    cfg = validate_config_dict({**MINIMAL, "dask": section})
    assert cfg["dask"]["scheduler"] == section.get("scheduler", "threads")
    assert cfg["dask"]["num_workers"] == section.get("num_workers")


def test_schema_fills_dask_defaults():
    dask = validate_config_dict(MINIMAL)["dask"]
    assert dask["scheduler"] == "threads" and dask["num_workers"] is None and dask["cluster"] is None
    assert dask["slurm"]["jobs"] == 2 and dask["slurm"]["memory"] == "16GB"


@pytest.mark.parametrize(
    "section, fragments",
    [
        ({"scheduler": "threads", "workers": 2}, ("unknown key", "'workers'", "'dask'")),
        ({"scheduler": "gpu"}, ("key 'dask.scheduler'", "'gpu'", "tcp://host:8786")),
        ({"scheduler": "tcp://"}, ("key 'dask.scheduler'",)),
        ({"scheduler": 3}, ("key 'dask.scheduler'",)),
        ({"num_workers": 0}, ("key 'dask.num_workers'",)),
        ({"num_workers": "two"}, ("key 'dask.num_workers'",)),
    ],
)
def test_schema_rejects_bad_dask_section(section, fragments):
    with pytest.raises(InputError) as e:
        validate_config_dict({**MINIMAL, "dask": section}, source="c.yaml")
    message = str(e.value)
    assert "\n" not in message and message.startswith("c.yaml: ")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_dask_section_is_parsed_into_the_config(tiny_project):
    assert load_config(tiny_project).dask == Dask(scheduler="threads", num_workers=None)
    raw = yaml.safe_load(tiny_project.read_text())
    raw["dask"] = {"scheduler": "synchronous", "num_workers": 3}
    tiny_project.write_text(yaml.safe_dump(raw))
    assert load_config(tiny_project).dask == Dask(scheduler="synchronous", num_workers=3)


# ----------------------------------------------------------------------------
# chunk size from memory


def _fits(edge, bands, workers, mem_mb):
    return workers * edge**2 * bands * UNMIX_BYTES_PER_PX_PER_BAND <= CHUNK_MEMORY_FRACTION * mem_mb * 1e6


def test_chunk_size_unchanged_without_mem_mb():
    assert chunk_size_for(2048, 31, 16, None) == 2048
    assert chunk_size_for(100, 31, 16, None) == 100


def test_chunk_size_unchanged_when_it_fits():
    # 2 workers x 2048² x 31 bands x 10 B = 2.6 GB <= 0.8 x 3500 MB
    assert chunk_size_for(2048, 31, 2, 3500) == 2048
    assert chunk_size_for(2000, 31, 2, 3500) == 2000  # fits: kept, not rounded


def test_chunk_size_shrinks_to_a_multiple_of_256():
    # budget 1.6e9 B / (2 x 31 x 10 B) = 2.58e6 px -> edge 1606 -> 1536
    assert chunk_size_for(2048, 31, 2, 2000) == 1536
    assert _fits(1536, 31, 2, 2000) and not _fits(1792, 31, 2, 2000)
    # twice the workers: half the pixels per chunk
    assert chunk_size_for(2048, 31, 4, 2000) == 1024
    # the per-pixel factor is a parameter
    assert chunk_size_for(2048, 31, 1, 2000, bytes_per_px_per_band=2 * UNMIX_BYTES_PER_PX_PER_BAND) == 1536
    for mem in (300, 700, 1234, 2999, 5000):
        for workers in (1, 2, 3, 8):
            edge = chunk_size_for(4096, 31, workers, mem)
            assert edge % 256 == 0 and 256 <= edge <= 4096
            assert edge == 256 or _fits(edge, 31, workers, mem)
            assert edge == 4096 or not _fits(edge + 256, 31, workers, mem)


def test_chunk_size_never_below_256_nor_grown():
    assert chunk_size_for(2048, 31, 16, 1) == 256
    assert chunk_size_for(300, 31, 16, 1) == 256
    assert chunk_size_for(200, 31, 16, 1) == 200  # below 256 already: never grown
    assert chunk_size_for(128, 31, 2, 10**6) == 128
    assert chunk_size_for(1000, 8, 1, 10**6) == 1000


@pytest.mark.parametrize("chunk, bands, workers", [(2048, 31, 2), (1024, 8, 1), (4096, 12, 16), (768, 31, 3)])
def test_chunk_mem_mb_is_the_smallest_memory_that_keeps_the_chunk(chunk, bands, workers):
    need = chunk_mem_mb(chunk, bands, workers)
    assert chunk_size_for(chunk, bands, workers, need) == chunk
    assert chunk_size_for(chunk, bands, workers, need - 1) < chunk
