rule segment:
    input:
        image=[STORE_IMAGE["zattrs"], STORE_IMAGE["level0"]],
        flagged=f"{STORE}/labels/flagged",  # listed in the labels group with nuclei and cells
    output:
        # the labels group of unmixed.ome.zarr (its metadata lists every label image in it)
        # and the two label images in it
        labels_group=[f"{STORE}/labels/.zgroup", f"{STORE}/labels/.zattrs"],
        nuclei=directory(f"{STORE}/labels/nuclei"),
        cells=directory(f"{STORE}/labels/cells"),
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
