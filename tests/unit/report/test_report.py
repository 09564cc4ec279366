"""Figures and pages of qdquant.report."""

import numpy as np

from qdquant import report


def test_report_scatter_draws_a_bounded_subset_of_the_selected_cells(monkeypatch):
    monkeypatch.setattr(report, "MAX_POINTS", 50)
    selected = np.arange(1000) % 3 == 0
    drawn = report._drawn(selected)
    assert drawn.sum() <= 50 and not (drawn & ~selected).any()
    assert (report._drawn(selected) == drawn).all()  # reproducible
    small = np.arange(40) % 2 == 0
    assert (report._drawn(small) == small).all()
