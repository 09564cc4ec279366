# Writes labels/nuclei and labels/cells into the sample's unmixed.ome.zarr
# (atomically); the QC overlay and the nucleus size used (qc/nucleus_size.csv)
# are the rule's declared outputs.
rule segment:
    input:
        zarr=f"{RESULTS}/{{sample}}/unmixed.ome.zarr",
    output:
        qc=report(f"{RESULTS}/{{sample}}/qc/segmentation.png", category="QC", subcategory="segmentation",
                  labels={"sample": "{sample}", "figure": "segmentation overlay"}),
        nucleus_size=f"{RESULTS}/{{sample}}/qc/nucleus_size.csv",
    params:
        settings=settings("segment"),
    log:
        "logs/segment/{sample}.log",
    benchmark:
        "benchmarks/snakemake/segment/{sample}.tsv"
    threads: 2
    resources:
        mem_mb=step_mem_mb("segment"),
        runtime=step_runtime("segment"),
    shell:
        step("segment") + " 2> {log}"
