"""A cell never reaches farther than the expansion distance from its own nucleus."""

import numpy as np
from scipy import ndimage as ndi
from skimage import segmentation

from qdquant.segmentation import segment_cells
from qdquant.segmentation._reach import beyond_own_nucleus


def own_distance(cells, nuclei):
    """Each cell pixel's distance to the nearest pixel of its own nucleus (scipy, one label at a time)."""
    out = np.full(cells.shape, np.inf)
    for i in np.unique(cells[cells > 0]):
        d = ndi.distance_transform_edt(nuclei != i)
        out[cells == i] = d[cells == i]
    return out


def crowded(seed=0, shape=(120, 140), n=40):
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, np.int32)
    seeds[rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)] = np.arange(1, n + 1)
    nuclei = segmentation.expand_labels(seeds, 3)
    return nuclei, rng


def test_beyond_own_nucleus_equals_the_distance_to_the_own_nucleus():
    nuclei, rng = crowded(1)
    cells = segmentation.expand_labels(nuclei, 25)  # every pixel to the nearest nucleus...
    ids = np.unique(nuclei[nuclei > 0])
    far = rng.random(cells.shape) < 0.3
    cells[far] = rng.choice(ids, far.sum())  # ...and some to a nucleus anywhere
    cells[nuclei > 0] = nuclei[nuclei > 0]
    for reach2 in (0, 10, 49, 150):
        expected = (cells > 0) & (np.rint(own_distance(cells, nuclei) ** 2) > reach2)  # squared distances are integers
        np.testing.assert_array_equal(beyond_own_nucleus(cells, nuclei, reach2), expected)


def test_cells_stay_within_the_expansion_of_their_own_nucleus():
    """Crowded nuclei behind bright membranes: no cell floods around its walled-in neighbours."""
    nuclei, rng = crowded(2, n=60)
    walls = segmentation.find_boundaries(segmentation.expand_labels(nuclei, 6), mode="inner")
    membrane = rng.gamma(2.0, 1.0, nuclei.shape) + 20.0 * ndi.binary_dilation(walls)
    cells = segment_cells(nuclei, membrane, pixel_size_um=0.5, cell_expansion_um=4.0)
    d = own_distance(cells, nuclei)
    assert d[cells > 0].max() <= 8.0  # 4 um at 0.5 um/px
