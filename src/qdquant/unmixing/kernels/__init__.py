"""The numba kernels of :func:`qdquant.unmixing.unmix`.

One fused pass over the cube: for every tile of ``TILE`` pixels (contiguous
along X) the pixels' spectra are read once (offset subtracted, float64);
``b = A.T @ y`` and the unconstrained solution ``G^-1 b`` (``G = A.T @ A``)
are computed for the whole tile, pixel loops innermost (vectorised). A pixel
whose unconstrained solution has no negative entry is done: that is its NNLS
solution. The others run the Lawson-Hanson active-set algorithm on the Gram
form (G, b), warm-started from the passive set of the unconstrained
solution's positive entries (cold-started from the empty set if that fails).
The residual is then computed from the tile still in cache.

- :mod:`.scalar`: any K, any strides, Poisson weights. For K <= ``KP`` the
  problem is padded to ``KP`` variables and the inverse of G restricted to
  each of the ``2**KP`` passive sets is looked up in a table; beyond, each
  passive system is factorised (Cholesky) when it comes.
- :mod:`.lanes`: the vector kernel, unweighted, K <= ``K16_MAX``: 8 pixels a
  vector for the band sums, the unconstrained solution, the outputs and the
  residual; a pixel's variables one vector of 8 (K <= ``KP``) or 16 lanes
  for its active-set steps.
- :mod:`.vectors`: the LLVM vector intrinsics they are written with.
- :mod:`.gain`: a per-pixel gain applied to a cube in one pass.

Pixels whose active-set iteration does not converge, or whose passive
system is not numerically positive definite, are flagged (a nonzero status)
and re-solved by the caller with the numpy FC-NNLS. The constants below are
compiled into the kernels.
"""

from __future__ import annotations

try:  # the kernels need numba; without it unmix uses its numpy engine
    import llvmlite
    import numba
except Exception:  # pragma: no cover - numba is a dependency, but keep working without it
    AVAILABLE = False
else:
    AVAILABLE = True
    del llvmlite, numba

#: Pixels per tile.
TILE = 128
#: Endmembers of the table-driven paths with 8 variables (fewer are padded).
KP = 8
#: Most endmembers of the 16-lane vector kernel (its table: 12.6 MB at 12).
K16_MAX = 12
#: Blocks of 8 pixels per group of the vector kernel (64 pixels: the bit
#: masks of the group's pixels are int64; its stack buffers are sized for it).
GROUP = 8
#: A Cholesky pivot below this times the diagonal element counts as not
#: positive definite (the pixel goes to the numpy path).
CHOL_RTOL = 1e-13
#: KKT gradient tolerance, relative to max |A.T b| (times K), as in the
#: numpy FC-NNLS.
KKT_RTOL = 1e-11
#: The residual sum of squares is computed in Gram form,
#: ``|y|^2 - x.(2 b - G x)`` (float64, error about 1e-14 |y|^2); where that
#: is below this fraction of ``|y|^2`` it is recomputed band by band.
RSS_GRAM_MIN = 1e-6
#: Options of every kernel.
NB_OPTS = dict(cache=True, fastmath=False, nogil=True, error_model="numpy")
