"""qdquant.metrics: instance matching on tiny literal label images."""

from __future__ import annotations

import numpy as np
import pytest

from qdquant.errors import InputError
from qdquant.metrics import match_by_position, match_instances, overlap_table


def test_identical_images_match_fully_whatever_the_ids():
    t = np.array([[1, 1, 0, 2], [1, 1, 0, 2], [0, 0, 0, 2]])
    p = np.array([[7, 7, 0, 3], [7, 7, 0, 3], [0, 0, 0, 3]])
    r = match_instances(t, p)
    assert (r["precision"], r["recall"], r["f1"]) == (1.0, 1.0, 1.0)
    assert (r["n_true"], r["n_pred"], r["n_matched"]) == (2, 2, 2)
    assert r["pairs"].tolist() == [[1, 7], [2, 3]]
    assert r["mean_iou"] == 1.0


def test_iou_threshold_is_inclusive_and_counts_follow():
    # truth 1 has 4 px; prediction 5 covers 2 of them and 2 background px:
    # IoU = 2 / 6 = 1/3.  Truth 2 (2 px) is matched exactly by 6.
    t = np.array([[1, 1, 0, 0, 2, 2], [1, 1, 0, 0, 0, 0]])
    p = np.array([[0, 5, 5, 0, 6, 6], [0, 5, 5, 0, 0, 0]])
    r = match_instances(t, p, iou_threshold=0.5)
    assert r["n_matched"] == 1 and r["pairs"].tolist() == [[2, 6]]
    assert r["precision"] == 0.5 and r["recall"] == 0.5 and r["f1"] == 0.5
    r = match_instances(t, p, iou_threshold=1 / 3)
    assert r["n_matched"] == 2
    assert r["mean_iou"] == pytest.approx((1 / 3 + 1) / 2)


def test_a_split_nucleus_counts_one_miss_and_two_false_positives():
    t = np.array([[1, 1, 1, 1, 1, 1]])
    p = np.array([[1, 1, 1, 2, 2, 2]])  # each half has IoU 0.5 with the whole
    r = match_instances(t, p, iou_threshold=0.51)
    assert (r["n_true"], r["n_pred"], r["n_matched"]) == (1, 2, 0)
    assert r["f1"] == 0.0
    # at exactly 0.5 both halves are candidates; only one may be matched
    r = match_instances(t, p, iou_threshold=0.5)
    assert r["n_matched"] == 1
    assert r["f1"] == pytest.approx(2 / 3)


def test_low_threshold_matching_maximises_the_number_of_pairs():
    # t1 overlaps p1 (IoU 0.4) and p2 (IoU 0.6 > 0.4) ; t2 overlaps only p2
    # (IoU 0.35).  Greedy by IoU takes (t1, p2) and leaves 1 pair; the
    # optimal one-to-one matching takes (t1, p1) and (t2, p2).
    t = np.zeros((1, 20), int)
    p = np.zeros((1, 20), int)
    t[0, 0:10] = 1
    p[0, 0:4] = 1  # t1 & p1 = 4, union 10 -> 0.4
    p[0, 4:13] = 2  # t1 & p2 = 6, union 13 -> 0.46 ; t2 & p2 = 3
    t[0, 10:17] = 2  # t2 & p2 = 3, union 13 -> 0.23
    r = match_instances(t, p, iou_threshold=0.2)
    assert r["n_matched"] == 2
    assert sorted(map(tuple, r["pairs"].tolist())) == [(1, 1), (2, 2)]


def test_empty_images():
    z = np.zeros((3, 3), int)
    one = z.copy()
    one[1, 1] = 4
    r = match_instances(z, z)
    assert (r["precision"], r["recall"], r["f1"], r["n_matched"]) == (1.0, 1.0, 1.0, 0)
    assert r["pairs"].shape == (0, 2)
    r = match_instances(z, one)
    assert (r["precision"], r["f1"], r["n_pred"]) == (0.0, 0.0, 1)
    r = match_instances(one, z)
    assert (r["recall"], r["f1"], r["n_true"]) == (0.0, 0.0, 1)


def test_overlap_table_lists_every_touching_pair():
    t = np.array([[1, 1, 2, 2]])
    p = np.array([[3, 4, 4, 0]])
    ti, pi, iou, tl, pl = overlap_table(t, p)
    assert list(zip(ti.tolist(), pi.tolist())) == [(1, 3), (1, 4), (2, 4)]
    assert iou.tolist() == pytest.approx([0.5, 1 / 3, 1 / 3])
    assert tl.tolist() == [1, 2] and pl.tolist() == [3, 4]


def test_bad_inputs_raise_input_error():
    with pytest.raises(InputError, match="shapes differ"):
        match_instances(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(InputError, match="integer"):
        match_instances(np.zeros((2, 2)), np.zeros((2, 2), int))
    with pytest.raises(InputError, match="negative"):
        match_instances(np.array([[-1]]), np.array([[1]]))
    with pytest.raises(InputError, match="iou_threshold"):
        match_instances(np.zeros((2, 2), int), np.zeros((2, 2), int), iou_threshold=0)


def test_match_by_position():
    truth = [[0, 0], [10, 10], [20, 20]]
    pred = [[0.5, 0], [10, 12.5], [30, 30], [0, 0.2]]
    r = match_by_position(truth, pred, max_distance=2)
    # (0,0) has two candidates, the closer one (0, 0.2) wins; (10,10)-(10,12.5) too far
    assert r["n_matched"] == 1 and r["pairs"].tolist() == [[0, 3]]
    assert r["precision"] == 0.25 and r["recall"] == pytest.approx(1 / 3)
    r = match_by_position(truth, pred, max_distance=3)
    assert r["n_matched"] == 2
    assert match_by_position([], pred, max_distance=1)["recall"] == 0.0
    assert match_by_position(np.zeros((0, 2)), np.zeros((0, 2)), max_distance=1)["f1"] == 1.0
    with pytest.raises(InputError):
        match_by_position([[0, 0]], [[0, 0, 0]], max_distance=1)
    with pytest.raises(InputError):
        match_by_position([[0, 0]], [[0, 0]], max_distance=0)
