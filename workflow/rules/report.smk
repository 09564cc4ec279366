from qdquant.report import report_figures


rule report:
    input:
        cells=f"{RESULTS}/{{sample}}/cells.csv",
        summary=f"{RESULTS}/{{sample}}/summary.csv",
        qc=[f"{RESULTS}/{{sample}}/qc/unmixing.png", f"{RESULTS}/{{sample}}/qc/segmentation.png"],
        unmix_qc=unmix_qc_files(),  # the fit's statistics (warnings) and library refinement (provenance)
        image=[STORE_IMAGE["zattrs"], STORE_IMAGE["level0"]],  # the nuclear channel under the maps
        spectra=f"{RESULTS}/{{sample}}/spectra_used.csv",  # named on the page (provenance)
    output:
        page=report(f"{RESULTS}/{{sample}}/report.html", category="Samples", labels={"sample": "{sample}"}),
        figures=[
            report(f"{RESULTS}/{{sample}}/qc/{name}.png", category="QC", labels={"sample": "{sample}", "figure": name})
            for name in report_figures(CFG)
        ],
    params:
        settings=settings("report"),
    log:
        "logs/report/{sample}.log",
    resources:
        mem_mb=step_mem_mb("report"),
        runtime=step_runtime("report"),
    shell:
        step("report") + " 2> {log}"


rule cohort:
    input:
        expand(f"{RESULTS}/{{sample}}/summary.csv", sample=SAMPLES),
        expand(f"{RESULTS}/{{sample}}/report.html", sample=SAMPLES),
        expand(f"{RESULTS}/{{sample}}/qc/unmixing.json", sample=SAMPLES),  # each sample's warnings
    output:
        summary=f"{RESULTS}/cohort_summary.csv",
        report=report(f"{RESULTS}/cohort_report.html", category="Cohort", labels={"page": "cohort report"}),
        provenance=f"{RESULTS}/provenance/params.yml",
    params:
        settings=settings("cohort"),
    log:
        "logs/cohort.log",
    shell:
        step("cohort", sample=False) + " 2> {log}"
