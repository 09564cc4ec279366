"""Per-cell and per-sample scores: HER2, H-score, Allred, % positive, subtypes.

Every scoring rule of the user contract (``contract.md``: "HER2 scoring
rules", "Other scores", "Tumour cells, receptor status and surrogate
subtype") is implemented in exactly one place, one subject per module:

* :mod:`.her2` -- HER2 per cell (:func:`her2_cell_scores`: which sector is
  stained, completeness and intensity, the intensity x completeness table)
  and per sample (:func:`her2_sample_score`: the > 10 % cascade and the
  category);
* :mod:`.markers` -- other markers: :func:`intensity_bins`,
  :func:`marker_sample_scores`, :func:`allred_score`;
* :mod:`.status` -- :func:`receptor_status`, :func:`surrogate_subtype`,
  :func:`tumour_threshold_auto`, :func:`is_tumour`;
* :mod:`.calibration` -- :func:`calibrate_her2_thresholds` reuses the HER2
  rules, so a fitted threshold triple is judged by the very rules used to
  score a slide;
* :mod:`._common` -- the score vocabulary (:data:`HER2_CLASSES`, ...), the
  contract defaults read from the config schema, and the input checks.

All functions are pure: arrays in, arrays or dicts out, inputs never
modified. Bad input raises :class:`qdquant.errors.InputError`.
"""

from qdquant.scoring._common import HER2_CATEGORIES, HER2_CLASSES, MARKER_SCORES, NOT_ASSESSABLE
from qdquant.scoring.calibration import calibrate_her2_thresholds
from qdquant.scoring.her2 import her2_cell_scores, her2_sample_score
from qdquant.scoring.markers import allred_score, intensity_bins, marker_sample_scores
from qdquant.scoring.status import is_tumour, receptor_status, surrogate_subtype, tumour_threshold_auto

__all__ = [
    "HER2_CLASSES",
    "HER2_CATEGORIES",
    "MARKER_SCORES",
    "NOT_ASSESSABLE",
    "allred_score",
    "calibrate_her2_thresholds",
    "her2_cell_scores",
    "her2_sample_score",
    "intensity_bins",
    "is_tumour",
    "marker_sample_scores",
    "receptor_status",
    "surrogate_subtype",
    "tumour_threshold_auto",
]
