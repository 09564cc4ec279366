"""napari viewer on a whole slide: time to the first frame, to a full-resolution view, and peak memory.

Opens a sample's results in a fresh process as ``qdquant view`` does
(:func:`qdquant.viewer.app.open_results` with no viewer: it makes the
window, adds the layers and the HER2 widget), sizes the window to 1400 x 900
and prints, from that one run:

- ``first frame``: seconds from the process start (napari imported, viewer
  created, every layer added, the whole slide drawn from its coarsest
  pyramid level) to the first screenshot, and the CPU time the process
  used till then (the machine's other load inflates the former more);
- ``open``: the same without napari's own start-up (import + window);
- ``zoom``: to a full-resolution view of the slide's centre, then ``pan``
  by one canvas width;
- ``rescore``: a HER2 threshold moved in the widget (reads the per-sector
  sums of every cell the first time) until the overlay is drawn again;
- the peak RSS of the process.

Targets (issue: whole slides in napari): first frame < 5 s, peak RSS < 1 GiB while viewing.

    python benchmarks/bench_viewer.py RESULTS/SAMPLE [--screenshot docs/images/napari_view.png]

RESULTS/SAMPLE is a sample's results folder, e.g. from
``python benchmarks/bench_wholeslide.py --sizes 16384 --keep`` (then
``/tmp/qdquant-wholeslide/results/ws16384``). Without a display, it runs
itself under ``xvfb-run`` (Debian's ``xvfb``; Mesa renders).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
t0, c0 = time.perf_counter(), time.process_time()
import napari
from qdquant.viewer.app import open_results

path, screenshot = sys.argv[1], sys.argv[2]
marks = {}
_init = napari.Viewer.__init__
def _timed_init(self, *args, **kwargs):  # when the window is up, before any layer
    _init(self, *args, **kwargs)
    marks["window"] = time.perf_counter()
napari.Viewer.__init__ = _timed_init
viewer, widget = open_results(path)  # as `qdquant view` does
viewer.window.resize(1400, 900)
viewer.reset_view()
viewer.screenshot(canvas_only=True, flash=False)  # draws what is in view
t_first, c_first = time.perf_counter(), time.process_time()
t_window = marks["window"]
rss_first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
levels = [lvl.shape for lvl in viewer.layers["cells"].data]
camera = viewer.scene.camera
# full resolution (1 screen pixel per image pixel) at the slide's centre, then one canvas width east
ps = float(viewer.layers["cells"].scale[-1])
camera.zoom = 1.0 / ps
camera.center = (levels[0][0] * ps / 2, levels[0][1] * ps / 2)
viewer.screenshot(canvas_only=True, flash=False)
t_zoom = time.perf_counter()
width = viewer.screenshot(canvas_only=True, flash=False).shape[1]
t_pan0 = time.perf_counter()
camera.center = (camera.center[-2], camera.center[-1] + width * ps)
viewer.screenshot(canvas_only=True, flash=False)
t_pan = time.perf_counter()
rss_viewing = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
camera.center = (levels[0][0] * ps / 2, levels[0][1] * ps / 2)
widget.set_thresholds(t_faint=widget.session.settings.t_faint * 0.8)
viewer.screenshot(canvas_only=True, flash=False)
t_rescore = time.perf_counter()
rss_rescore = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if screenshot:
    from qtpy.QtWidgets import QApplication
    from skimage.io import imsave

    viewer.reset_view()
    camera.zoom = camera.zoom * (2.5 if levels[0][0] < 2048 else 16)
    widget.set_thresholds(t_faint=widget.session.run_settings.t_faint)
    # the cell nearest the centre of the view
    import pandas as pd
    cells = pd.read_csv(widget.session.results.table("cells.csv"), usecols=["CellID", "Y_centroid", "X_centroid"],
                        index_col="CellID")
    centre = [c / ps for c in camera.center[-2:]]
    nearest = ((cells["Y_centroid"] - centre[0]) ** 2 + (cells["X_centroid"] - centre[1]) ** 2).idxmin()
    widget.select_cell(int(nearest))
    viewer.layers.selection.active = viewer.layers["HER2 class"]
    QApplication.processEvents()
    imsave(screenshot, viewer.screenshot(canvas_only=False, flash=False))
print("RESULT", json.dumps({
    "shape": levels[0], "levels": len(levels), "n_cells": int(widget.session.table.cell_id.size),
    "first_frame_s": t_first - t0, "first_frame_cpu_s": c_first - c0, "open_s": t_first - t_window,
    "zoom_s": t_zoom - t_first,
    "pan_s": t_pan - t_pan0, "rescore_s": t_rescore - t_pan,
    "peak_rss_first_frame_mib": rss_first, "peak_rss_viewing_mib": rss_viewing,
    "peak_rss_rescore_mib": rss_rescore, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
viewer.close()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a sample's results folder (results/SAMPLE)")
    parser.add_argument("--screenshot", default="", help="also save a screenshot of the window here (PNG)")
    args = parser.parse_args()
    command = [sys.executable, "-c", CHILD, str(Path(args.results).resolve()), args.screenshot]
    if not os.environ.get("DISPLAY"):
        if shutil.which("xvfb-run") is None:
            raise SystemExit("bench_viewer: no display and no xvfb-run (apt-get install xvfb)")
        command = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", *command]
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"bench_viewer failed:\n{proc.stderr[-3000:]}")
    r = json.loads(lines[-1].removeprefix("RESULT "))
    (y, x), gib = r["shape"], 1024.0
    print(f"{args.results}: {y}x{x} px, {r['levels']} pyramid levels, {r['n_cells']} cells; "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    print(f"  first frame (from process start) {r['first_frame_s']:6.2f} s   target < 5 s: "
          f"{'met' if r['first_frame_s'] < 5 else 'NOT met'} (ratio {r['first_frame_s'] / 5:.2f})")
    print(f"  CPU time of this process till then {r['first_frame_cpu_s']:5.2f} s   (less sensitive to other load)")
    print(f"  open (napari already up)          {r['open_s']:6.2f} s")
    print(f"  zoom to full resolution           {r['zoom_s']:6.2f} s")
    print(f"  pan one canvas width              {r['pan_s']:6.2f} s")
    print(f"  re-score at a new t_faint         {r['rescore_s']:6.2f} s")
    print(f"  peak RSS at the first frame       {r['peak_rss_first_frame_mib']:6.0f} MiB")
    print(f"  peak RSS after zoom and pan       {r['peak_rss_viewing_mib']:6.0f} MiB   target < 1 GiB: "
          f"{'met' if r['peak_rss_viewing_mib'] < gib else 'NOT met'} (ratio {r['peak_rss_viewing_mib'] / gib:.2f})")
    print(f"  peak RSS after re-scoring         {r['peak_rss_rescore_mib']:6.0f} MiB   target < 1 GiB: "
          f"{'met' if r['peak_rss_rescore_mib'] < gib else 'NOT met'} (every cell's sector sums in memory)")
    if args.screenshot:
        print(f"  peak RSS after the screenshot     {r['peak_rss_mib']:6.0f} MiB   (a click: the cell's row and ring)")


if __name__ == "__main__":
    main()
