"""Touching cells meet on the crest of the membrane stain (qdquant.segmentation.segment_cells).

Two cells share a straight border; each paints its own 2-px membrane ring beside it at its
own brightness, the pair blurred like an optical image. Nuclei sit at different distances
from the border, so the distance term of the cells' flood pulls the border off the
membranes: before the borders were moved onto the crest, it lay a pixel inside the cell
with the farther nucleus in two of these four cases, giving that cell's edge pixels (and a
stained cell's membrane light) to its neighbour.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from qdquant.segmentation import segment_cells

BORDER = 48  # x of the first pixel of the right-hand cell


def two_cells(gap_left, gap_right, levels, seed=0):
    """Nuclei (radius 7 px) ``gap_left`` / ``gap_right`` px from the border; membranes of
    ``levels`` (left, right) on the two pixels each side of it, blurred (sigma 1.3 px), noise."""
    h, w, r = 64, 96, 7
    yy, xx = np.mgrid[0:h, 0:w]
    nuclei = np.zeros((h, w), np.int32)
    nuclei[(yy - 32) ** 2 + (xx - (BORDER - gap_left - r)) ** 2 <= r * r] = 1
    nuclei[(yy - 32) ** 2 + (xx - (BORDER + gap_right + r)) ** 2 <= r * r] = 2
    membrane = np.zeros((h, w))
    membrane[:, BORDER - 2 : BORDER] = levels[0]
    membrane[:, BORDER : BORDER + 2] = levels[1]
    membrane = ndi.gaussian_filter(membrane, 1.3) + np.random.default_rng(seed).normal(0, 2.0, (h, w))
    return nuclei, membrane.astype(np.float32)


@pytest.mark.parametrize("gaps, levels", [((4, 9), (200, 120)), ((9, 4), (200, 120)),
                                          ((4, 9), (120, 200)), ((6, 6), (200, 120))])
def test_cells_meet_between_their_membranes(gaps, levels):
    nuclei, membrane = two_cells(*gaps, levels)
    cells = segment_cells(nuclei, membrane, pixel_size_um=0.5, cell_expansion_um=5)
    rows = cells[28:37]  # rows the cells reach the border on (within 5 um of both nuclei)
    # along each row the left cell ends and the right one starts at the true border
    assert (rows[:, BORDER - 1] == 1).all() and (rows[:, BORDER] == 2).all()
    assert np.array_equal(cells[nuclei > 0], nuclei[nuclei > 0])


def test_a_piece_cut_off_from_its_nucleus_goes_to_the_background():
    from qdquant.segmentation.cells import _without_stray_pieces

    nuclei = np.zeros((8, 12), np.int32)
    nuclei[2:4, 1:3] = 1
    nuclei[2:4, 8:10] = 2
    cells = np.zeros_like(nuclei)
    cells[1:5, 0:4] = 1
    cells[1:5, 7:11] = 2
    cells[6, 0:3] = 1  # a piece of cell 1 that no longer touches it
    kept = _without_stray_pieces(cells.copy(), nuclei)
    assert not kept[6].any()
    assert np.array_equal(kept[:6], cells[:6])
