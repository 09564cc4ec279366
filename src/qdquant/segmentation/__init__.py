"""Nucleus and whole-cell segmentation, and the per-cell compartments.

Classical image analysis only (no trained model), one step per module:

* :mod:`.nuclei` -- :func:`segment_nuclei`: background-corrected multi-scale
  Laplacian-of-Gaussian seeds, a seeded watershed on log intensity plus a
  distance-to-seed term, and a per-nucleus contour at a fixed fraction of
  the nucleus's own peak, so that dim and bright nuclei are cut alike and
  touching nuclei are split.
* :mod:`.cells` -- :func:`segment_cells`: each nucleus grown by at most
  ``cell_expansion_um``: a seeded watershed on the membrane stain (plus a
  distance term, so cells without membrane stain still get a sensible
  territory) or, with no membrane image, a plain expansion.
* :mod:`.chunked` -- :func:`segment_chunked`: both of the above on
  overlapping tiles of a whole slide held as a dask array; each object is
  kept by the tile that owns its nucleus centroid, so the result does not
  depend on the tiling.
* :mod:`.masks` -- :func:`membrane_ring` and :func:`compartments`: the
  per-cell nucleus, membrane and cytoplasm masks of the user contract.
* :mod:`.image_stats` -- the whole-image statistics the steps share;
  :mod:`._checks` (input checks, lengths) and :mod:`._tuning` (constants).
* The compiled (numba) kernels the steps run on each tile, each the same as
  the library function it replaces: :mod:`._flood` (seeded watershed),
  :mod:`._distance` (exact distance transform), :mod:`._filters`
  (Gaussian, LoG, scale-space maxima), :mod:`._components` (pieces, holes,
  per-label sums and contacts).

Physical parameters are in micrometres; the pixel size converts them.
Everything that depends on the whole image (background surface, Otsu level,
noise level, membrane scale) is estimated once by :func:`_image_stats` from
block reductions that do not depend on how the image is chunked; everything
else is local, which is what makes the chunked result equal the unchunked one.
"""

# Private helpers re-exported for qdquant.nucleus_size, which runs the nucleus
# step on sample windows to estimate the nucleus diameter.
from qdquant.segmentation._checks import _check_image, _check_scale  # noqa: F401
from qdquant.segmentation._tuning import _SMOOTH_Q  # noqa: F401
from qdquant.segmentation.cells import segment_cells
from qdquant.segmentation.chunked import segment_chunked
from qdquant.segmentation.image_stats import _image_stats  # noqa: F401
from qdquant.segmentation.masks import compartments, membrane_ring
from qdquant.segmentation.nuclei import _nuclei_tile, segment_nuclei  # noqa: F401

__all__ = [
    "membrane_ring",
    "compartments",
    "segment_nuclei",
    "segment_cells",
    "segment_chunked",
]
