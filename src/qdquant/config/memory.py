"""The chunk edge a step can afford in the memory it is given (Snakemake's ``mem_mb``)."""

from __future__ import annotations

import math


#: Bytes a dask worker holds per pixel and band of its chunk in the unmix step,
#: the heaviest step: the raw chunk and its rechunked copy, numba's float64
#: per-pixel work, the float32 abundances and residual, the residual-QC
#: recompute and zarr's write buffers. Measured with
#: ``benchmarks/bench_wholeslide.py`` (4096², 31 bands, 2 workers, 2048-px
#: chunks: peak RSS 2821 MiB, about 9.8 bytes per pixel and band including the
#: interpreter), rounded up.
UNMIX_BYTES_PER_PX_PER_BAND = 10.0


#: Share of ``mem_mb`` the workers' chunks may fill; the rest is headroom.
CHUNK_MEMORY_FRACTION = 0.8


#: Chunk edges chosen from memory are multiples of this (and at least this).
CHUNK_QUANTUM = 256


def chunk_size_for(
    chunk_size: int,
    n_bands: int,
    n_workers: int,
    mem_mb: float | None,
    *,
    bytes_per_px_per_band: float = UNMIX_BYTES_PER_PX_PER_BAND,
    memory_fraction: float = CHUNK_MEMORY_FRACTION,
) -> int:
    """The chunk edge a step uses: ``chunk_size``, shrunk to fit ``mem_mb``.

    The working set is estimated as ``n_workers * edge² * n_bands *
    bytes_per_px_per_band`` bytes and must fit in ``memory_fraction`` of
    ``mem_mb`` (megabytes, 10⁶ bytes, as Snakemake's ``mem_mb``). When the
    configured edge does not fit it is shrunk to the largest multiple of 256
    that does, but never below 256 (nor above ``chunk_size``: a configured
    edge is never grown). ``mem_mb=None`` (not given) keeps ``chunk_size``.
    """
    chunk_size = int(chunk_size)
    if mem_mb is None:
        return chunk_size
    per_px = max(int(n_workers), 1) * max(int(n_bands), 1) * float(bytes_per_px_per_band)
    budget = float(mem_mb) * 1e6 * memory_fraction
    if chunk_size**2 * per_px <= budget:
        return chunk_size
    edge = int(math.sqrt(max(budget, 0.0) / per_px)) // CHUNK_QUANTUM * CHUNK_QUANTUM
    return min(chunk_size, max(CHUNK_QUANTUM, edge))


def chunk_mem_mb(
    chunk_size: int,
    n_bands: int,
    n_workers: int,
    *,
    bytes_per_px_per_band: float = UNMIX_BYTES_PER_PX_PER_BAND,
    memory_fraction: float = CHUNK_MEMORY_FRACTION,
) -> int:
    """The smallest ``mem_mb`` for which :func:`chunk_size_for` keeps ``chunk_size`` (for the rules)."""
    per_px = max(int(n_workers), 1) * max(int(n_bands), 1) * float(bytes_per_px_per_band)
    return int(math.ceil(int(chunk_size) ** 2 * per_px / memory_fraction / 1e6))
