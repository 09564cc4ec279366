"""What a workflow step asks a cluster for: memory and time, from the slide's size.

The workflow's rules call these (``resources: mem_mb=..., runtime=...``) so that a
SLURM job for a 30 000² slide asks for more than one for a test field. The
figures come from docs/performance.md ("Whole slides": CPU seconds per
megapixel and peak memory of each step on 4096²-16384² slides, 31 bands): every
step computes chunk by chunk, so its memory follows the chunk size and the
number of threads, plus what grows with the number of cells (about 1000 cells
per megapixel); its time follows the pixel count.
"""

from __future__ import annotations

import math
import os

from qdquant.config import chunk_mem_mb

STEPS = ("unmix", "segment", "quantify", "score", "report")
#: Memory of a step beyond its chunks (interpreter, libraries, small samples), MB.
BASE_MB = {"unmix": 1000, "segment": 1000, "quantify": 1000, "score": 2000, "report": 2000}
#: Memory of one 2048² chunk in flight, MB (scaled with the chunk's area).
CHUNK_MB = {"unmix": 2500, "segment": 2000, "quantify": 1500, "score": 0, "report": 0}
#: Memory that grows with the slide (the cells: ~1000 per Mpx, 1.3 KB each in quantify), MB per Mpx.
MB_PER_MPX = {"unmix": 0.0, "segment": 0.0, "quantify": 1.5, "score": 0.2, "report": 0.1}
#: CPU seconds per megapixel, measured at 31 bands (unmix scales with the band count).
CPU_S_PER_MPX = {"unmix": 4.2, "segment": 2.8, "quantify": 1.3, "score": 0.35, "report": 0.25}
#: CPU seconds a step takes whatever the slide (start-up, imports, fixed-size samples).
FIXED_CPU_S = {"unmix": 30, "segment": 20, "quantify": 15, "score": 10, "report": 15}
#: Time asked for = this many times the estimate (a shared node, a slow filesystem), minutes at least.
RUNTIME_SAFETY = 3.0
MIN_RUNTIME_MIN = 10
#: Each retry of a failed job (Snakemake's ``attempt``) asks for this much more memory and time.
RETRY_GROWTH = 0.5


def slide_megapixels(path: str | os.PathLike, *, default: float) -> float:
    """Pixels of level 0 of a slide, in millions, from its header (``default`` while it does not exist yet)."""
    from qdquant.io import read_cube_header

    if not os.path.exists(path):
        return float(default)
    (_, height, width), _, _ = read_cube_header(path)  # (C, Y, X), whatever the file's layout
    return height * width / 1e6


def step_mem_mb(step: str, megapixels: float, *, chunk_size: int, n_bands: int, threads: int = 1,
                attempt: int = 1) -> int:
    """Memory (MB) of a per-sample step: base + chunks in flight + what grows with the cells.

    At least what keeps the configured ``chunk_size`` with ``threads``
    workers (:func:`~qdquant.config.chunk_mem_mb`), so a step given its
    request does not shrink its chunks; on retry ``attempt`` (from 1) asks
    for ``RETRY_GROWTH`` more per attempt.
    """
    _check_step(step)
    chunks = CHUNK_MB[step] * (chunk_size / 2048) ** 2
    needed = chunk_mem_mb(chunk_size, n_bands, threads) if CHUNK_MB[step] else 0
    mb = max(BASE_MB[step] + chunks, needed) + MB_PER_MPX[step] * megapixels
    return int(math.ceil(mb * (1 + RETRY_GROWTH * (max(int(attempt), 1) - 1))))


def step_runtime_min(step: str, megapixels: float, *, n_bands: int, threads: int = 1, attempt: int = 1) -> int:
    """Time limit (minutes) of a per-sample step: ``RUNTIME_SAFETY`` x its CPU time over its threads."""
    _check_step(step)
    rate = CPU_S_PER_MPX[step] * (max(n_bands, 1) / 31 if step == "unmix" else 1.0)
    cpu_s = FIXED_CPU_S[step] + rate * megapixels
    minutes = RUNTIME_SAFETY * cpu_s / max(int(threads), 1) / 60
    minutes *= 1 + RETRY_GROWTH * (max(int(attempt), 1) - 1)
    return int(max(MIN_RUNTIME_MIN, math.ceil(minutes)))


def _check_step(step: str) -> None:
    if step not in STEPS:
        raise ValueError(f"unknown step '{step}' (one of {', '.join(STEPS)})")
