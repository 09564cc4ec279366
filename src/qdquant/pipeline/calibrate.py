"""The HER2 thresholds in force: from the config, or fitted on the control slides (the
calibrate step), or the contract's defaults."""

from __future__ import annotations

import pandas as pd

from qdquant import io, scoring
from qdquant.config import Config
from qdquant.pipeline.common import sector_arrays
from qdquant.pipeline.paths import calibration_path, outputs


def calibrate(cfg: Config) -> None:
    """Fit the HER2 thresholds so the control slides score as known; write them."""
    from qdquant import report

    her2 = cfg.her2
    controls = []
    for sample in cfg.controls:
        table = io.read_csv(outputs(cfg, sample.sample_id)["measurements"], "measurements")
        controls.append((*sector_arrays(table, her2.sectors), sample.control_score))
    fitted = scoring.calibrate_her2_thresholds(
        controls, complete_fraction=her2.complete_fraction, ultralow_min_pct=her2.ultralow_min_pct
    )
    path = calibration_path(cfg)
    io.write_csv(
        pd.DataFrame([{**fitted, "n_controls": len(controls),
                       "controls": ";".join(f"{s.sample_id}={s.control_score}" for s in cfg.controls)}]),
        path,
    )
    report.plot_calibration(controls, fitted, path.with_suffix(".png"))


def her2_thresholds(cfg: Config) -> tuple[dict, str]:
    """The HER2 thresholds in force and where they come from.

    Explicit thresholds in the config win; else those fitted on the control
    slides when the sample sheet has any; else the contract's defaults.
    """
    her2 = cfg.her2
    config_values = her2.thresholds
    if her2.thresholds_explicit or not cfg.controls:
        return config_values, "config" if her2.thresholds_explicit else "default"
    fitted = io.read_csv(calibration_path(cfg), "HER2 calibration").iloc[0]
    return {k: float(fitted[k]) for k in config_values}, "calibrated on control slides"
