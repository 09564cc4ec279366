"""Tuning constants of the segmentation (fractions of the nucleus radius r unless stated)."""

from qdquant.config.defaults import default

_SMOOTH_Q = 1 / 6  # pre-smoothing Gaussian sigma
_LOG_Q = (0.4, 0.5, 0.6)  # LoG scales of the seed detector
_SEED_H = 0.05  # minimum scale-normalised LoG response (units of the Otsu level)
_NMS_Q = 0.3  # half-width of the non-maximum suppression window
_SEED_MIN = 0.4  # a seed's intensity >= this fraction of the Otsu level
_MASK_MIN = 0.25  # watershed mask: intensity >= this fraction of the Otsu level
_NOISE_K_SEED = 6.0  # ... and >= this many noise sigmas (seeds)
_NOISE_K_MASK = 3.0  # ... (mask)
_ALPHA = 0.45  # nucleus contour at this fraction of its own peak
_COMPACTNESS = 0.8  # weight of the distance-to-seed term (per r) in the watershed landscape
_MIN_AREA_Q = 0.15  # smallest nucleus, fraction of pi r^2
_MERGE_AREA = 1.3  # merge touching pieces whose union is below this multiple of pi r^2 ...
_MERGE_R = 0.9  # ... and at least this ellipse-like ...
_MERGE_DIP = 0.8  # ... and no dip: contact intensity >= this fraction of the dimmer piece's mean
_MAX_AREA_Q = 25.0  # largest object kept, multiple of pi r^2
_BG_BLOCK_Q = 4.0  # background block edge, in r
_BG_PERCENTILE = 10.0
_PCT_Z = 1.2816  # standard-normal quantile of _BG_PERCENTILE (bias correction)
_SAMPLE_MAX = 4_000_000  # most block means used for the global statistics
_MEMBRANE_SMOOTH_UM = 0.75  # membrane pre-smoothing sigma, micrometres
_MEMBRANE_WEIGHT = 4.0  # weight of the membrane term against the distance term
# Borders between touching cells are moved onto the membrane's crest (pixels within
# _CREST_ZONE_PX of a border, where the saturated membrane score is at least _CREST_LEVEL,
# i.e. a quarter of the Otsu level), over the membrane smoothed by _CREST_SMOOTH_UM (noise only).
_CREST_ZONE_PX = 2
_CREST_LEVEL = 0.2
_CREST_SMOOTH_UM = 0.4
# A cell whose cytoplasm carries essentially no membrane stain (mean
# saturated score m / (1 + m) below this, i.e. m ~ 1/20 of the Otsu level)
# keeps only a rim of cytoplasm this wide, micrometres. Higher levels also
# trim the sparse-count cells of the MIBI data set (tests/unit/segmentation/test_segmentation.py).
_BARE_LEVEL = 0.05
_BARE_RIM_UM = 1.0

# Contract defaults: read from the config schema, where they are defined.
CELL_EXPANSION_UM = default("segmentation.cell_expansion_um")
CHUNK_SIZE = default("chunk_size")
NUCLEUS_DIAMETER_UM = default("segmentation.nucleus_diameter_um")
