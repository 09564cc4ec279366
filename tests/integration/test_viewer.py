"""The napari face: reader layers, live re-scoring against a pipeline run, the class overlay on screen.

Needs napari with a Qt binding and an OpenGL context: CI runs these under
Xvfb with Mesa (pytest-xvfb starts the display).
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import repo_config

napari = pytest.importorskip("napari")

from qdquant import io, pipeline, scoring  # noqa: E402
from qdquant.colours import HER2_CLASS_COLOURS, emission_colour  # noqa: E402
from qdquant.config import load_config  # noqa: E402
from qdquant.viewer import layers as vlayers  # noqa: E402
from qdquant.viewer.reader import napari_get_reader  # noqa: E402
from qdquant.viewer.results import locate  # noqa: E402

SAMPLE = "her2_2plus"


@pytest.fixture(scope="module")
def sample_results(tmp_path_factory):
    """One 512² slide of the test cohort (every HER2 class present) through the pipeline, scored over
    tumour cells (E-cadherin gate), as a user's run with a tumour gate would be."""
    from qdquant import simulate

    root = tmp_path_factory.mktemp("viewer")
    simulate.write_slide(simulate.simulate_slide(**simulate.test_cohort()[SAMPLE]), root, SAMPLE)
    (root / "samples.tsv").write_text(f"sample_id\timage\n{SAMPLE}\t{root / SAMPLE}.ome.tif\n")
    config = repo_config(root / "config.yaml", root / "samples.tsv", root / "results", tumour={"marker": "ECAD"})
    cfg = load_config(config)
    pipeline.run_sample(cfg, SAMPLE)
    pipeline.cohort(cfg)
    return root, config


def test_the_reader_claims_results_and_nothing_else(sample_results, tmp_path):
    root, _ = sample_results
    folder = root / "results" / SAMPLE
    assert napari_get_reader(str(folder)) is not None
    assert napari_get_reader(str(folder / "unmixed.ome.zarr")) is not None
    (tmp_path / "other.zarr").mkdir()
    (tmp_path / "note.txt").write_text("x")
    for path in (tmp_path, tmp_path / "other.zarr", tmp_path / "note.txt", root / f"{SAMPLE}.ome.tif",
                 tmp_path / "missing", [str(folder), str(folder)]):
        assert napari_get_reader(path if isinstance(path, list) else str(path)) is None


def test_reader_layers_have_names_colours_scale_and_visibility(sample_results):
    root, _ = sample_results
    folder = root / "results" / SAMPLE
    read = napari_get_reader(str(folder))
    layers = {kw["name"]: (data, kw, kind) for data, kw, kind in read(str(folder))}
    library = pd.read_csv(folder / "spectra_used.csv")
    wl = library.pop("wavelength_nm").to_numpy()
    expected_names = {"HER2 (QD655)", "ER (QD565)", "DAPI", "ECAD (QD705)", "AF", "Offset", "residual",
                      "nuclei", "cells", "flagged", "HER2 class"}
    assert expected_names <= set(layers)
    for name, (data, kw, kind) in layers.items():
        assert kw["scale"] == (0.5, 0.5), name
        assert kw["multiscale"] and len(data) >= 4, name
        assert [level.shape[-1] for level in data] == [512 // 2**i for i in range(len(data))], name
    hidden = {name for name, (_, kw, _) in layers.items() if not kw.get("visible", True)}
    # every autofluorescence kind the slide gave (AF, AF_2, ...) hidden too
    assert hidden == {"Offset", "residual", "flagged"} | {n for n in layers if n == "AF" or n.startswith("AF_")}
    # each endmember in the colour of its library peak, additive
    for endmember, name in (("QD655", "HER2 (QD655)"), ("QD565", "ER (QD565)"), ("DAPI", "DAPI")):
        _, kw, kind = layers[name]
        assert kind == "image" and kw["blending"] == "additive"
        peak = wl[np.argmax(library[endmember].to_numpy())]
        assert kw["colormap"]["colors"][-1][:3] == pytest.approx(vlayers._hex_rgba(emission_colour(peak))[:3])
        lo, hi = kw["contrast_limits"]
        coarse = np.asarray(layers[name][0][-1])
        assert 0 <= lo < hi <= coarse.max() and hi >= np.percentile(coarse, 99)
    assert layers["HER2 (QD655)"][1]["colormap"]["colors"][-1] != layers["ECAD (QD705)"][1]["colormap"]["colors"][-1]
    # the class overlay: every cell's pixels carry its cells.csv class
    cells = pd.read_csv(folder / "cells.csv", dtype={"her2_class": str})
    labels = np.asarray(io.read_labels(folder / "unmixed.ome.zarr", "cells"))
    overlay = np.asarray(layers["HER2 class"][0][0])
    code = dict(zip(cells["CellID"], pd.Categorical(cells["her2_class"], categories=scoring.HER2_CLASSES).codes))
    expected = np.vectorize(lambda i: 0 if i == 0 else code[i] + 1)(labels)
    np.testing.assert_array_equal(overlay, expected)
    assert set(np.unique(overlay)) == {0, 1, 2, 3, 4}
    # cell contours: only boundary pixels of the cells, with their ids
    contour = np.asarray(layers["cells"][0][0])
    assert np.all((contour == 0) | (contour == labels)) and 0 < (contour > 0).sum() < (labels > 0).sum() / 2


def _scored_with(root, config, thresholds: dict, name: str) -> pd.DataFrame:
    """The score step run with other HER2 thresholds in the config, on a copy of the results."""
    raw = yaml.safe_load(config.read_text())
    raw["results"] = str(root / name)
    raw["her2"].update(thresholds)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    shutil.copytree(root / "results" / SAMPLE, root / name / SAMPLE, dirs_exist_ok=True)
    pipeline.score_sample(load_config(path), SAMPLE)
    return (pd.read_csv(root / name / SAMPLE / "cells.csv", dtype={"her2_class": str}),
            pd.read_csv(root / name / SAMPLE / "summary.csv", dtype={"her2_score": str}).iloc[0])


def test_moving_a_threshold_reclassifies_as_a_pipeline_run_does(sample_results, make_napari_viewer):
    from qdquant.viewer.app import open_results

    root, config = sample_results
    viewer, widget = open_results(root / "results" / SAMPLE, viewer=make_napari_viewer())
    run = pd.read_csv(root / "results" / SAMPLE / "cells.csv", dtype={"her2_class": str})
    assert widget.session.codes is None  # the run's classes until a threshold moves
    widget.session.rescore()
    np.testing.assert_array_equal(np.asarray(scoring.HER2_CLASSES)[widget.session.codes], run["her2_class"])
    labels = np.asarray(io.read_labels(root / "results" / SAMPLE / "unmixed.ome.zarr", "cells"))
    for i, thresholds in enumerate(({"t_faint": 8.0, "t_weak": 30.0, "t_strong": 90.0},
                                    {"t_faint": 35.0, "t_weak": 60.0, "t_strong": 150.0, "complete_fraction": 0.5})):
        widget.set_thresholds(**thresholds)
        cells, summary = _scored_with(root, config, thresholds, f"rescored{i}")
        klass = np.asarray(scoring.HER2_CLASSES)[widget.session.codes]
        np.testing.assert_array_equal(klass, cells["her2_class"])
        assert (klass != run["her2_class"]).sum() > 10  # the thresholds did move cells
        assert widget.session.summary["her2_score"] == summary["her2_score"]
        assert 0 < widget.session.table.population.sum() < len(cells)  # the score is over tumour cells
        for key in ("her2_pct_0", "her2_pct_1plus", "her2_pct_2plus", "her2_pct_3plus"):
            assert widget.session.summary[key] == pytest.approx(summary[key], abs=1e-12)
        assert f"HER2 score <b>{summary['her2_score']}</b>" in widget.summary_label.text()
        # the overlay follows, without any mask recomputed
        overlay = np.asarray(viewer.layers["HER2 class"].data[0])
        code = dict(zip(cells["CellID"], pd.Categorical(cells["her2_class"], scoring.HER2_CLASSES).codes + 1))
        np.testing.assert_array_equal(overlay[labels > 0], np.vectorize(code.get)(labels[labels > 0]))
    widget.set_thresholds(t_faint=200.0)  # above t_weak: refused, nothing changes
    assert "t_faint" in widget.message.text() and widget.session.settings.t_faint == 35.0


def open_at_largest_cell(sample_results, make_napari_viewer):
    """The sample opened as ``qdquant view`` does; its cell labels, cells.csv, largest cell and a pixel of it."""
    from qdquant.viewer.app import open_results

    root, _ = sample_results
    folder = root / "results" / SAMPLE
    viewer, widget = open_results(folder, viewer=make_napari_viewer())
    labels = np.asarray(io.read_labels(folder / "unmixed.ome.zarr", "cells"))
    cells = pd.read_csv(folder / "cells.csv").set_index("CellID")
    cell = int(cells["Area"].idxmax())
    return viewer, widget, labels, cells, cell, np.argwhere(labels == cell)[0]


def test_clicking_a_cell_shows_its_row_and_membrane_ring(sample_results, make_napari_viewer):
    from qdquant.segmentation import membrane_ring

    viewer, widget, labels, cells, cell, (y, x) = open_at_largest_cell(sample_results, make_napari_viewer)
    assert widget.session.cell_at(y + 0.5, x + 0.5) == cell
    widget.select_cell(cell)
    shown = {widget.cell_table.item(i, 0).text(): widget.cell_table.item(i, 1).text()
             for i in range(widget.cell_table.rowCount())}
    assert shown["CellID"] == str(cell) and shown["Area"] == str(cells.loc[cell, "Area"])
    assert shown["her2_class"] == str(cells.loc[cell, "her2_class"])
    assert "her2_completeness" in shown and "HER2_membrane_mean" in shown
    ring_layer = viewer.layers["selected cell"]
    y0, x0 = (np.asarray(ring_layer.translate) / 0.5).round().astype(int)
    ring = np.zeros_like(labels, dtype=bool)
    h, w = ring_layer.data.shape
    ring[y0 : y0 + h, x0 : x0 + w] = ring_layer.data > 0
    np.testing.assert_array_equal(ring, membrane_ring(labels, 2) & (labels == cell))
    widget.select_cell(0)
    assert widget.cell_table.rowCount() == 0 and not ring_layer.visible


def test_screenshot_shows_each_class_colour_at_its_cells(sample_results, make_napari_viewer, tmp_path):
    from qdquant.viewer.app import open_results

    root, _ = sample_results
    folder = root / "results" / SAMPLE
    viewer, _ = open_results(folder, viewer=make_napari_viewer(show=True))
    for layer in viewer.layers:
        layer.visible = layer.name == "HER2 class"
    viewer.layers["HER2 class"].opacity = 1.0
    viewer.canvas.overlays.scale_bar.visible = False  # it would cover a corner's cells
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float)
    canvas = np.asarray(shot.shape[:2], dtype=float)
    labels = np.asarray(io.read_labels(folder / "unmixed.ome.zarr", "cells"))
    cells = pd.read_csv(folder / "cells.csv", dtype={"her2_class": str})
    palette = {c: np.asarray(vlayers._hex_rgba(h)[:3]) * 255 for c, h in HER2_CLASS_COLOURS.items()}
    # napari draws pixel (i, j) centred on world (i, j) x scale
    zoom, centre = viewer.scene.camera.zoom, np.asarray(viewer.scene.camera.center[-2:])
    checked = {}
    for klass in scoring.HER2_CLASSES:
        # the class's largest cells whose centroid lies inside them
        rows = cells[cells["her2_class"] == klass].sort_values("Area", ascending=False)
        for _, row in rows.head(5).iterrows():
            yx = np.array([row["Y_centroid"], row["X_centroid"]])
            if labels[tuple(yx.astype(int))] != row["CellID"]:
                continue
            screen = (yx * 0.5 - centre) * zoom + canvas / 2
            colour = shot[tuple(screen.astype(int))]
            nearest = min(palette, key=lambda c: np.abs(palette[c] - colour).sum())
            assert nearest == klass, (klass, row["CellID"], colour)
            assert np.abs(palette[klass] - colour).max() < 20
            checked[klass] = checked.get(klass, 0) + 1
    assert set(checked) == set(scoring.HER2_CLASSES)


def test_locate_a_bare_store_has_no_tables(sample_results, tmp_path):
    root, _ = sample_results
    bare = tmp_path / "slide7.ome.zarr"
    shutil.copytree(root / "results" / SAMPLE / "unmixed.ome.zarr", bare)
    found = locate(bare)
    assert found.folder is None and found.sample_id == "slide7" and found.table("cells.csv") is None
    names = [kw["name"] for _, kw, _ in vlayers.results_layers(found)]
    assert "HER2 class" not in names and {"cells", "nuclei", "HER2 (QD655)"} <= set(names)


def test_a_store_without_qdquant_roles_hides_what_is_not_a_marker(sample_results, tmp_path):
    import json

    root, _ = sample_results
    folder = tmp_path / SAMPLE
    shutil.copytree(root / "results" / SAMPLE, folder)
    attrs = json.loads((folder / "unmixed.ome.zarr" / ".zattrs").read_text())
    del attrs["qdquant"]  # as another writer would leave it
    (folder / "unmixed.ome.zarr" / ".zattrs").write_text(json.dumps(attrs))
    roles = {c["label"]: c["role"] for c in vlayers.channels(locate(folder))}
    assert roles["residual"] == "residual" and roles["AF"] == "autofluorescence"
    assert roles["Offset"] == "background"  # flat in spectra_used.csv
    assert roles["QD655"] == roles["DAPI"] == "marker"


def test_a_click_without_the_class_layer_still_shows_the_cell(sample_results, make_napari_viewer):
    """The user may delete the overlay (or the contours too): a click maps through what is left."""
    from types import SimpleNamespace

    viewer, widget, labels, cells, cell, (y, x) = open_at_largest_cell(sample_results, make_napari_viewer)
    click = SimpleNamespace(type="mouse_press", position=((y + 0.5) * 0.5, (x + 0.5) * 0.5))  # world: µm
    for gone in ("HER2 class", "cells"):
        viewer.layers.remove(gone)
        widget.select_cell(0)
        assert widget._on_click in viewer.mouse_drag_callbacks
        widget._on_click(viewer, click)
        assert widget.cell_table.item(0, 1).text() == str(cell), gone
        assert viewer.layers["selected cell"].visible
    widget.set_thresholds(t_faint=widget.session.settings.t_faint * 0.9)  # no overlay to update: no error
    assert widget.message.text() == ""


def test_contours_of_a_chunked_label_image_are_those_of_the_whole_image(tmp_path):
    import dask
    import zarr
    from dask.cache import Cache

    rng = np.random.default_rng(7)
    labels = rng.integers(0, 5, (37, 45)).repeat(3, 0).repeat(3, 1).astype(np.int32)  # 111 x 135
    store = zarr.open_array(str(tmp_path / "labels.zarr"), mode="w", shape=labels.shape, chunks=(16, 20),
                            dtype=labels.dtype, zarr_format=2)
    store[:] = labels
    chunked = vlayers.outline_level(dask.array.from_zarr(store))
    whole = vlayers.outline(labels)
    cache = Cache(1e9)
    with cache, dask.config.set({"optimization.fuse.active": False}):  # as napari reads
        np.testing.assert_array_equal(np.asarray(chunked), whole)
        np.testing.assert_array_equal(np.asarray(chunked[16:48, 20:60]), whole[16:48, 20:60])
    # no cached piece keeps a larger block alive (a cache counts a view by its own bytes)
    for value in cache.cache.data.values():
        base = value
        while isinstance(base.base, np.ndarray):
            base = base.base
        assert base.nbytes <= value.nbytes


def test_class_overlay_reads_cells_h5ad_as_cells_csv(sample_results, tmp_path):
    import os

    root, _ = sample_results
    folder = tmp_path / SAMPLE
    shutil.copytree(root / "results" / SAMPLE, folder)
    assert (folder / "cells.h5ad").is_file()
    from_h5ad = vlayers.cell_classes(locate(folder))
    cells = pd.read_csv(folder / "cells.csv", dtype={"her2_class": str})
    np.testing.assert_array_equal(from_h5ad[0], cells["CellID"])
    np.testing.assert_array_equal(from_h5ad[1], pd.Categorical(cells["her2_class"], scoring.HER2_CLASSES).codes)
    # a cells.csv newer than cells.h5ad (rewritten since) is what counts
    cells.loc[0, "her2_class"] = "3+" if cells.loc[0, "her2_class"] != "3+" else "0"
    cells.to_csv(folder / "cells.csv", index=False)
    h5ad_time = (folder / "cells.h5ad").stat().st_mtime
    os.utime(folder / "cells.csv", (h5ad_time + 10, h5ad_time + 10))
    from_csv = vlayers.cell_classes(locate(folder))
    np.testing.assert_array_equal(from_csv[1], pd.Categorical(cells["her2_class"], scoring.HER2_CLASSES).codes)
    (folder / "cells.h5ad").unlink()
    np.testing.assert_array_equal(vlayers.cell_classes(locate(folder))[1], from_csv[1])


def test_contrast_limits_without_stored_windows_come_from_the_coarsest_level(sample_results, tmp_path):
    import json

    root, _ = sample_results
    store = tmp_path / "slide.ome.zarr"
    shutil.copytree(root / "results" / SAMPLE / "unmixed.ome.zarr", store)
    levels = vlayers.read_levels(store)
    stored = vlayers.contrast_limits(locate(store), levels[-1])
    attrs = json.loads((store / ".zattrs").read_text())
    assert stored == [[c["window"]["start"], c["window"]["end"]] for c in attrs["omero"]["channels"]]
    del attrs["qdquant"]  # another writer's windows are not trusted
    (store / ".zattrs").write_text(json.dumps(attrs))
    computed = vlayers.contrast_limits(locate(store), levels[-1])
    coarse = np.asarray(levels[-1])
    for c, (lo, hi) in enumerate(computed):
        assert 0 <= lo < hi <= coarse[c].max() and hi >= np.percentile(coarse[c], 99)
        assert hi == pytest.approx(stored[c][1], rel=1e-6)  # the same 99.5th percentile


def test_qdquant_view_keeps_its_chunk_cache_size(sample_results, make_napari_viewer, monkeypatch):
    """napari's window sets the cache to napari's own setting when it is made: the size must be set after."""
    import dask
    from napari.utils import resize_dask_cache

    from qdquant.viewer.app import open_results

    root, _ = sample_results
    monkeypatch.setattr(napari, "Viewer", lambda **kwargs: make_napari_viewer(**kwargs))
    with dask.config.set(scheduler=None):  # open_results sets it in a process of its own
        viewer, _ = open_results(root / "results" / SAMPLE, cache_mb=48)
    assert resize_dask_cache().cache.available_bytes == 48 * 2**20
    assert [layer.name for layer in viewer.layers][-1] == "flagged" == viewer.layers.selection.active.name
