rule calibrate:
    input:
        expand(f"{RESULTS}/{{sample}}/measurements.csv", sample=CONTROLS),
    output:
        f"{RESULTS}/calibration/her2_thresholds.csv",
        report(f"{RESULTS}/calibration/her2_thresholds.png", category="QC", subcategory="calibration",
               labels={"figure": "HER2 calibration on control slides"}),
    params:
        settings=settings("calibrate"),
    log:
        "logs/calibrate.log",
    resources:
        mem_mb=2000,
    shell:
        step("calibrate", sample=False) + " 2> {log}"


def calibration_input(wildcards):
    """The fitted thresholds, when control slides calibrate them (explicit config thresholds win)."""
    if CFG.her2 is None or CFG.her2.thresholds_explicit or not CONTROLS:
        return []
    return f"{RESULTS}/calibration/her2_thresholds.csv"


rule score:
    input:
        measurements=f"{RESULTS}/{{sample}}/measurements.csv",
        calibration=calibration_input,
    output:
        cells=f"{RESULTS}/{{sample}}/cells.csv",
        summary=f"{RESULTS}/{{sample}}/summary.csv",
        h5ad=f"{RESULTS}/{{sample}}/cells.h5ad",
    params:
        settings=settings("score"),
    log:
        "logs/score/{sample}.log",
    resources:
        mem_mb=step_mem_mb("score"),
        runtime=step_runtime("score"),
    shell:
        step("score") + " 2> {log}"
