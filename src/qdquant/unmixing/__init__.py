"""Linear spectral unmixing with non-negative abundances.

The model of one pixel is ``b = offset + A @ x + noise``: ``b`` is the pixel's
spectrum (C bands, camera counts), ``A`` the spectral library (C, K), one
column per endmember, and ``x >= 0`` the K abundances, in units of the
library's columns (a pixel equal to 100 times column k has abundance 100 for
endmember k).

:func:`unmix` solves the non-negative least-squares problem of every pixel
exactly (the solution of ``scipy.optimize.nnls``), on the normal equations
``G = A.T @ A`` (computed once) and ``A.T @ b`` (once per pixel), with one of
two engines (its ``engine`` argument):

- "numba" (the default when numba imports): one fused pass over the cube;
  the unconstrained solution of every pixel, then the Lawson-Hanson
  active-set algorithm for the pixels where it has a negative entry,
  warm-started from its positive entries (:mod:`.kernels`, driven by
  :mod:`.numba_engine`);
- "numpy": the fast combinatorial NNLS of Van Benthem & Keenan
  (:mod:`.nnls`): the Lawson-Hanson algorithm on all pixels together, the
  pixels that share a passive set solved with one normal-equations solve.

The package, one job a module:

- :mod:`.fit`: :func:`unmix`, its checks and the engine; :class:`Tuning`;
- :mod:`.gain`: :func:`apply_gain`, a per-pixel gain (shading) on a cube;
- :mod:`.spectra`: :func:`check_library`, :func:`flat_columns`;
- :mod:`.offset`: :func:`estimate_offset` of the camera's dark offset;
- :mod:`.refine`: :func:`refine_library`, the library fitted to the slide;
- :mod:`.smoothing`: :func:`smooth_along_structures` of a cube along its
  membranes, before the fit, and the margin it reads (:func:`smoothing_depth`);
- :mod:`.residual_qc`: :func:`noise_model`, :func:`flag_poor_fit`,
  :func:`broadband_probes`, :func:`flag_broadband`, :func:`grow_mask`;
- :mod:`.nnls`, :mod:`.numba_engine`, :mod:`.kernels`: the two engines;
- :mod:`.validation`: input checks shared by the others.
"""

from qdquant.unmixing.fit import Tuning, unmix
from qdquant.unmixing.gain import apply_gain
from qdquant.unmixing.offset import estimate_offset, evenly_spaced
from qdquant.unmixing.refine import refine_library
from qdquant.unmixing.residual_qc import broadband_probes, flag_broadband, flag_poor_fit, grow_mask, noise_model
from qdquant.unmixing.smoothing import smooth_along_structures, smooth_along_structures_dask, smoothing_depth
from qdquant.unmixing.spectra import CONDITION_LIMIT, LibraryCheck, check_library, flat_columns

__all__ = [
    "CONDITION_LIMIT",
    "LibraryCheck",
    "Tuning",
    "apply_gain",
    "broadband_probes",
    "check_library",
    "estimate_offset",
    "evenly_spaced",
    "flag_broadband",
    "flag_poor_fit",
    "flat_columns",
    "grow_mask",
    "noise_model",
    "refine_library",
    "smooth_along_structures",
    "smooth_along_structures_dask",
    "smoothing_depth",
    "unmix",
]
