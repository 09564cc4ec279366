"""One function per workflow step: read with :mod:`qdquant.io`, call the stage
functions, write with :mod:`qdquant.io`.

The Snakemake rules and the ``qdquant`` command line both call these, so a step
run by hand is exactly the step the workflow runs. One module per step:

- :mod:`~qdquant.pipeline.unmix`: :func:`unmix_sample` (the library adapted
  to the slide in :mod:`~qdquant.pipeline.unmix_library`);
- :mod:`~qdquant.pipeline.segment`: :func:`segment_sample`;
- :mod:`~qdquant.pipeline.quantify`: :func:`quantify_sample`;
- :mod:`~qdquant.pipeline.calibrate`: :func:`calibrate` and the HER2
  thresholds in force;
- :mod:`~qdquant.pipeline.score`: :func:`score_sample`;
- :mod:`~qdquant.pipeline.reports`: :func:`report_sample` and :func:`cohort`;

and what they share: :mod:`~qdquant.pipeline.paths` (where each output
lives), :mod:`~qdquant.pipeline.common` and :mod:`~qdquant.pipeline.sampling`.
"""

from qdquant.pipeline.calibrate import calibrate, her2_thresholds
from qdquant.pipeline.common import SECTOR_NPX, SECTOR_SUM, TABLE_ROWS
from qdquant.pipeline.paths import calibration_path, outputs, provenance_path, sample_dir
from qdquant.pipeline.quantify import quantify_sample
from qdquant.pipeline.reports import cohort, report_sample, write_provenance
from qdquant.pipeline.sampling import cube_sample, pixel_sample
from qdquant.pipeline.score import score_cell_rows, score_cells, score_sample, summarise_cells, tumour_threshold
from qdquant.pipeline.segment import CELL_EXPANSION_PER_NUCLEUS, segment_sample
from qdquant.pipeline.unmix import FLAG_MARGIN_UM, unmix_sample
from qdquant.pipeline.unmix_library import LIBRARY_SAMPLING, REFINE_SAMPLING, channel_roles

# the names these had when the steps were one module (tests and benchmarks use them)
_pixel_sample, _cube_sample = pixel_sample, cube_sample

#: The per-sample steps, in the order they run.
STEPS = {
    "unmix": unmix_sample,
    "segment": segment_sample,
    "quantify": quantify_sample,
    "score": score_sample,
    "report": report_sample,
}


def run_sample(cfg, sample_id: str) -> None:
    """Run every per-sample step in order (for notebooks; the workflow runs them as rules)."""
    for step in STEPS.values():
        step(cfg, sample_id)


__all__ = [
    "CELL_EXPANSION_PER_NUCLEUS", "FLAG_MARGIN_UM", "LIBRARY_SAMPLING", "REFINE_SAMPLING", "SECTOR_NPX", "SECTOR_SUM",
    "STEPS", "TABLE_ROWS", "calibrate", "calibration_path", "channel_roles", "cohort",
    "cube_sample", "her2_thresholds", "outputs", "pixel_sample", "provenance_path", "quantify_sample",
    "report_sample", "run_sample", "sample_dir", "score_cell_rows", "score_cells", "score_sample",
    "segment_sample", "summarise_cells", "tumour_threshold", "unmix_sample", "write_provenance",
]
