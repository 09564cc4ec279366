"""The HER2 scoring dock widget: the sample's summary, live thresholds, the clicked cell.

Shows what :class:`qdquant.viewer.session.Her2Session` computes; the
re-classification is the pipeline's own scoring code, and moving a
threshold replaces only the class overlay's colours, no mask.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from qdquant.colours import HER2_CLASS_COLOURS
from qdquant.errors import InputError
from qdquant.viewer.layers import CLASS_LAYER
from qdquant.viewer.results import locate
from qdquant.viewer.session import Her2Session

__all__ = ["Her2Widget"]

#: The thresholds the widget edits: (setting, label, maximum, decimals, step).
EDITABLE = (
    ("t_faint", "t_faint (abundance)", 1e6, 1, 1.0),
    ("t_weak", "t_weak (abundance)", 1e6, 1, 1.0),
    ("t_strong", "t_strong (abundance)", 1e6, 1, 5.0),
    ("complete_fraction", "complete_fraction", 1.0, 3, 0.05),
)
SELECTED_LAYER = "selected cell"
PCT_KEYS = ("her2_pct_0", "her2_pct_1plus", "her2_pct_2plus", "her2_pct_3plus")


def _text(value) -> str:
    """A table value as shown: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Her2Widget(QWidget):
    """Dock widget of one sample's HER2 scoring (the sample whose layers the reader added)."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session: Her2Session | None = None
        layout = QVBoxLayout(self)
        self.summary_label = QLabel("Open a qdquant sample's results (File > Open Folder).")
        self.summary_label.setWordWrap(True)
        layout.addWidget(self.summary_label)

        box = QGroupBox("HER2 thresholds")
        form = QFormLayout(box)
        self.spins: dict[str, QDoubleSpinBox] = {}
        for key, label, maximum, decimals, step in EDITABLE:
            spin = QDoubleSpinBox()
            spin.setRange(0.0, maximum)
            spin.setDecimals(decimals)
            spin.setSingleStep(step)
            spin.setKeyboardTracking(False)  # re-score when the value is entered, not per keystroke
            spin.valueChanged.connect(self._thresholds_changed)
            form.addRow(label, spin)
            self.spins[key] = spin
        layout.addWidget(box)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        layout.addWidget(self.message)

        cell_box = QGroupBox("Clicked cell")
        cell_layout = QVBoxLayout(cell_box)
        self.cell_table = QTableWidget(0, 2)
        self.cell_table.setHorizontalHeaderLabels(["column", "value"])
        self.cell_table.verticalHeader().setVisible(False)
        cell_layout.addWidget(self.cell_table)
        layout.addWidget(cell_box)

        self.viewer.layers.events.inserted.connect(self._attach)
        self.viewer.mouse_drag_callbacks.append(self._on_click)
        self._attach()

    # -- the sample -------------------------------------------------------------------------------
    def _class_layer(self):
        return next((layer for layer in self.viewer.layers if layer.name == CLASS_LAYER), None)

    def _attach(self, event=None) -> None:
        """Take the sample of the HER2 class layer, once it is in the viewer."""
        layer = self._class_layer()
        if layer is None or self.session is not None:
            return
        results = locate(Path(layer.metadata["qdquant_results"]))
        if results is None or results.table("measurements.csv") is None:
            return
        # the run's own summary until a threshold moves: the per-sector sums of every cell (large
        # on a whole slide) are read only then
        self.session = Her2Session(results)
        for key, spin in self.spins.items():
            spin.blockSignals(True)
            spin.setValue(getattr(self.session.settings, key))
            spin.blockSignals(False)
        self._show_summary()

    def set_thresholds(self, **values) -> None:
        """Set thresholds as a user would in the spin boxes (one re-scoring)."""
        for key, value in values.items():
            self.spins[key].blockSignals(True)
            self.spins[key].setValue(value)
            self.spins[key].blockSignals(False)
        self._thresholds_changed()

    def _thresholds_changed(self, *_) -> None:
        if self.session is None:
            return
        values = {key: spin.value() for key, spin in self.spins.items()}
        try:
            self.session.rescore(**values)
        except InputError as exc:
            self.message.setText(f"<span style='color:#d73027'>{html.escape(str(exc))}</span>")
            return
        self.message.setText("")
        layer = self._class_layer()
        if layer is not None:
            layer.data = self.session.class_levels()
        self._show_summary()

    def _show_summary(self) -> None:
        from qdquant.scoring import HER2_CLASSES

        run = self.session.run_summary
        s = self.session.summary if self.session.codes is not None else run
        changed = self.session.settings != self.session.run_settings
        rows = [f"<b>{html.escape(self.session.results.sample_id)}</b>",
                f"HER2 score <b>{s.get('her2_score')}</b> ({s.get('her2_category')})"
                + (f" &mdash; the run scored {run.get('her2_score')}" if changed else "")]
        pct = " &nbsp; ".join(
            f"<span style='color:{HER2_CLASS_COLOURS[c]}'>&#9632;</span> {c}: {s[k]:.1f}%"
            for c, k in zip(HER2_CLASSES, PCT_KEYS) if k in s and not math.isnan(s[k]))
        rows.append(pct)
        others = self.session.marker_scores()
        if others:
            note = " (at the run's HER2 thresholds)" if changed and "surrogate_subtype" in others else ""
            rows.append("; ".join(f"{html.escape(k)}: {html.escape(_text(v))}" for k, v in others.items()) + note)
        self.summary_label.setText("<br>".join(rows))

    # -- the clicked cell -------------------------------------------------------------------------
    def _on_click(self, viewer, event) -> None:
        if event.type != "mouse_press" or self.session is None:
            return
        self.select_cell(self.session.cell_at(*self._label_pixel(event.position)))

    def _label_pixel(self, position) -> tuple[float, float]:
        """The level-0 pixel of the cell labels under a world position.

        Through the class overlay's (or the contours') transform when the
        user kept one of them, else the store's pixel size: the layers may
        have been deleted, the labels are still there.
        """
        layers = {layer.name: layer for layer in self.viewer.layers}
        layer = layers.get(CLASS_LAYER) or layers.get("cells")
        if layer is not None:
            y, x = layer.world_to_data(position)[-2:]
            return float(y), float(x)
        ps = self.session.pixel_size_um
        return float(position[-2]) / ps, float(position[-1]) / ps

    def select_cell(self, cell_id: int) -> None:
        """Show a cell's row and outline its membrane ring (0: clear)."""
        if cell_id == 0:
            self.cell_table.setRowCount(0)
            if SELECTED_LAYER in self.viewer.layers:
                self.viewer.layers[SELECTED_LAYER].visible = False
            return
        row = self.session.cell_row(cell_id)
        self.cell_table.setRowCount(len(row))
        for i, (key, value) in enumerate(row.items()):
            self.cell_table.setItem(i, 0, QTableWidgetItem(str(key)))
            self.cell_table.setItem(i, 1, QTableWidgetItem(_text(value)))
        ring, (y0, x0) = self.session.membrane(cell_id)
        ps = self.session.pixel_size_um
        if SELECTED_LAYER in self.viewer.layers:
            layer = self.viewer.layers[SELECTED_LAYER]
            layer.data, layer.translate, layer.visible = ring, (y0 * ps, x0 * ps), True
        else:
            self.viewer.add_labels(ring, name=SELECTED_LAYER, scale=(ps, ps), translate=(y0 * ps, x0 * ps),
                                   units=("µm", "µm"), colormap={None: [0, 0, 0, 0], 0: [0, 0, 0, 0],
                                                                 1: [0.0, 1.0, 1.0, 1.0]})
