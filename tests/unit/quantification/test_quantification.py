"""measure_cells and membrane_sectors against straightforward references."""

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from skimage import measure, segmentation

from qdquant.errors import InputError
from qdquant.quantification import measure_cells, membrane_sectors
from qdquant.segmentation import compartments


def random_tissue(seed=0, shape=(90, 110), n=25):
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, np.int32)
    pts = np.column_stack([rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)])
    seeds[pts[:, 0], pts[:, 1]] = rng.permutation(np.arange(1, n + 1)) * 3  # sparse, unordered ids
    cells = segmentation.expand_labels(seeds, 9)
    cells[rng.random(shape) < 0.02] = 0  # holes: background inside cells
    nuclei = segmentation.expand_labels(seeds, 3) * (cells > 0)
    nuclei[nuclei != cells] = 0
    abundances = rng.gamma(2.0, 10.0, size=(3,) + shape).astype(np.float32)
    return cells, nuclei, abundances


def reference(cells, nuclei, abundances, names, width):
    """regionprops on each compartment, one channel at a time (MCQuant's way)."""
    nucleus, membrane, cytoplasm = compartments(cells, nuclei, width)
    rows = {}
    props = measure.regionprops_table(cells, properties=["label", "area", "centroid"])
    rows["CellID"] = props["label"]
    rows["Area"] = props["area"]
    rows["Y_centroid"], rows["X_centroid"] = props["centroid-0"], props["centroid-1"]
    for k, name in enumerate(names):
        for comp, mask in (("cell", cells > 0), ("nucleus", nucleus), ("membrane", membrane), ("cytoplasm", cytoplasm)):
            key = name if comp == "cell" else f"{name}_{comp}_mean"
            lab = np.where(mask, cells, 0)
            p = measure.regionprops_table(lab, intensity_image=abundances[k], properties=["label", "intensity_mean"])
            series = pd.Series(p["intensity_mean"], index=p["label"])
            rows[key] = series.reindex(props["label"]).to_numpy()
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_means_equal_regionprops_reference(seed):
    cells, nuclei, abundances = random_tissue(seed)
    names = ["HER2", "ER", "DAPI"]
    got = measure_cells(cells, nuclei, abundances, names, 2)
    ref = reference(cells, nuclei, abundances, names, 2)
    assert list(got["CellID"]) == list(ref["CellID"])
    for column in ref.columns:
        np.testing.assert_allclose(got[column], ref[column], rtol=1e-6, equal_nan=True, err_msg=column)
    assert (got["NucleusArea"] == ndi.sum_labels(nuclei > 0, cells, got["CellID"])).all()


def test_missing_compartment_is_nan_not_zero():
    cells = np.zeros((12, 12), np.int32)
    cells[2:6, 2:6] = 1  # 4x4: every pixel within 2 px of the outside -> no cytoplasm
    nuclei = np.zeros_like(cells)
    abundances = np.ones((1, 12, 12), np.float32)
    t = measure_cells(cells, nuclei, abundances, ["M"], 2)
    assert np.isnan(t.loc[0, "M_cytoplasm_mean"])
    assert np.isnan(t.loc[0, "M_nucleus_mean"])
    assert t.loc[0, "M_membrane_mean"] == 1.0
    assert t.loc[0, "NucleusArea"] == 0


def test_chunked_equals_whole_and_dask():
    import dask.array as da

    cells, nuclei, abundances = random_tissue(3, shape=(130, 150), n=40)
    names = ["A", "B", "C"]
    whole = measure_cells(cells, nuclei, abundances, names, 2)
    blocks = measure_cells(
        da.from_array(cells, chunks=31), da.from_array(nuclei, chunks=31),
        da.from_array(abundances, chunks=(3, 31, 31)), names, 2, block_size=29,
    )
    pd.testing.assert_frame_equal(whole, blocks, check_exact=True)  # to the last bit, whatever the blocks


def test_sums_do_not_depend_on_the_blocks():
    """Means and HER2 sector sums of cells cut by block edges are the same to the last bit for every
    block size (values of many magnitudes, whose float sums would round differently)."""
    cells, nuclei, abundances = random_tissue(4, shape=(120, 140), n=30)
    rng = np.random.default_rng(4)
    abundances = (abundances * 10.0 ** rng.uniform(-3, 4, abundances.shape)).astype(np.float32)
    tables, sectors = [], []
    for block in (7, 33, 1000):
        tables.append(measure_cells(cells, nuclei, abundances, ["A", "B", "C"], 2, block_size=block))
        ids, centroids = tables[-1]["CellID"].to_numpy(), tables[-1][["Y_centroid", "X_centroid"]].to_numpy()
        sectors.append(membrane_sectors(cells, abundances[0], ids, centroids, 2, sectors=12, block_size=block))
    for table, (sums, npx) in zip(tables[1:], sectors[1:]):
        pd.testing.assert_frame_equal(tables[0], table, check_exact=True)
        assert np.array_equal(sums, sectors[0][0]) and np.array_equal(npx, sectors[0][1])
    np.testing.assert_allclose(tables[0]["A"], reference(cells, nuclei, abundances, ["A", "B", "C"], 2)["A"], rtol=1e-6)


def test_ids_spread_far_apart_measure_as_close_ones():
    """Ids beyond any lookup table's reach (labels made elsewhere) are measured like small ones."""
    cells, nuclei, abundances = random_tissue(5)
    far = np.where(cells > 0, cells.astype(np.int64) * 10**9 + 7, 0)
    names = ["A", "B", "C"]
    got = measure_cells(far, np.where(nuclei > 0, far, 0), abundances, names, 2, block_size=40)
    ref = measure_cells(cells, nuclei, abundances, names, 2, block_size=40)
    assert list(got["CellID"]) == [i * 10**9 + 7 for i in ref["CellID"]]
    pd.testing.assert_frame_equal(got.drop(columns="CellID"), ref.drop(columns="CellID"))


def test_flagged_pixels_are_left_out_and_counted():
    cells, nuclei, abundances = random_tissue(4)
    flagged = np.zeros(cells.shape, bool)
    flagged[:, :20] = True
    spiked = abundances.copy()
    spiked[:, flagged] = 1e6  # an off-library object: must not stain any cell
    t = measure_cells(cells, nuclei, spiked, ["A", "B", "C"], 2, flagged=flagged)
    clean = measure_cells(np.where(flagged, 0, cells), nuclei * ~flagged, abundances, ["A", "B", "C"], 2)
    assert t["A"].max() < 1e5
    assert (t["n_flagged_px"] == ndi.sum_labels(flagged, cells, t["CellID"])).all()
    assert t["Area"].sum() == (cells > 0).sum()
    common = clean.set_index("CellID")
    np.testing.assert_allclose(t.set_index("CellID").loc[common.index, "A"], common["A"], rtol=1e-6)


def test_sectors_partition_the_ring():
    cells, nuclei, abundances = random_tissue(5)
    t = measure_cells(cells, nuclei, abundances, ["A", "B", "C"], 2)
    sums, npx = membrane_sectors(cells, abundances[0], t["CellID"], t[["Y_centroid", "X_centroid"]], 2, sectors=36)
    assert sums.shape == npx.shape == (len(t), 36)
    np.testing.assert_allclose(sums.sum(1) / npx.sum(1), t["A_membrane_mean"], rtol=1e-6)
    sums2, npx2 = membrane_sectors(cells, abundances[0], t["CellID"], t[["Y_centroid", "X_centroid"]], 2,
                                   sectors=36, block_size=17)
    np.testing.assert_allclose(sums, sums2)
    assert (npx == npx2).all()


def test_sector_zero_starts_at_plus_x():
    cells = np.zeros((21, 21), np.int32)
    rr, cc = np.mgrid[:21, :21]
    cells[(rr - 10) ** 2 + (cc - 10) ** 2 <= 81] = 1
    values = np.zeros((21, 21), np.float32)
    values[10, 17:] = 5.0  # the ring pixels straight to the right (+x) of the centre
    sums, npx = membrane_sectors(cells, values, [1], [[10.0, 10.0]], 2, sectors=4)
    assert sums[0, 0] > 0 and sums[0, 1:].sum() == 0
    values[17:, 10] = 7.0  # straight down (+y): a quarter turn later
    sums, _ = membrane_sectors(cells, values, [1], [[10.0, 10.0]], 2, sectors=4)
    assert sums[0, 1] > 0


def test_empty_labels_give_empty_table_with_columns():
    t = measure_cells(np.zeros((10, 10), int), np.zeros((10, 10), int), np.zeros((2, 10, 10)), ["A", "B"], 2)
    assert len(t) == 0 and {"CellID", "A", "B_membrane_mean", "Area"} <= set(t.columns)


def test_bad_shapes_raise():
    cells, nuclei, abundances = random_tissue(0)
    with pytest.raises(InputError, match="abundances shape"):
        measure_cells(cells, nuclei, abundances[:, :10], ["A", "B", "C"], 2)
    with pytest.raises(InputError, match="marker names"):
        measure_cells(cells, nuclei, abundances, ["A", "B"], 2)
    with pytest.raises(InputError, match="nuclei shape"):
        measure_cells(cells, nuclei[:5], abundances, ["A", "B", "C"], 2)


def test_float_and_negative_labels_and_float32_overflow_are_clear_errors():
    cells = np.zeros((8, 8), np.int32)
    cells[2:6, 2:6] = 1
    abundances = np.ones((1, 8, 8))
    with pytest.raises(InputError, match="cells labels must be integers, got dtype float64"):
        measure_cells(cells.astype(float), cells, abundances, ["HER2"], 1)
    negative = cells.copy()
    negative[7, 3] = -2
    with pytest.raises(InputError, match=r"nuclei labels must be >= 0 .* -2 at y 7, x 3"):
        measure_cells(cells, negative, abundances, ["HER2"], 1)
    huge = abundances.copy()
    huge[0, 4, 5] = 1e200
    with pytest.raises(InputError, match=r"abundance 1e\+200 of channel 'HER2' at y 4, x 5 overflows float32"):
        measure_cells(cells, cells, huge, ["HER2"], 1)
    # float64 within float32's range is measured, not refused
    assert measure_cells(cells, cells, abundances, ["HER2"], 1)["HER2"].tolist() == [1.0]


def test_a_cube_beyond_float32_is_reported_as_overflow_not_as_nan():
    from qdquant.unmixing import unmix

    cube = np.ones((3, 4, 5))
    cube[1, 2, 3] = 1e200
    with pytest.raises(InputError, match=r"1e\+200 at band 1, y 2, x 3 overflows the fit"):
        unmix(cube, np.eye(3)[:, :2] + 0.1)
