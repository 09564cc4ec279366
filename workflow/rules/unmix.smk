rule unmix:
    input:
        images=lambda wc: UNMIX_IMAGES[wc.sample],
        spectra=config["spectra"],
        panel=config["panel"],
    output:
        # unmixed.ome.zarr: the parts this step writes (common.smk, STORE); the store is
        # built under a temporary name and renamed into place, so a rerun removes the labels
        # the segment step wrote, and Snakemake reruns that step
        zgroup=STORE_IMAGE["zgroup"],
        zattrs=STORE_IMAGE["zattrs"],
        level0=directory(STORE_IMAGE["level0"]),
        flagged=directory(f"{STORE}/labels/flagged"),
        spectra=f"{RESULTS}/{{sample}}/spectra_used.csv",
        qc=report(f"{RESULTS}/{{sample}}/qc/unmixing.png", category="QC", subcategory="unmixing",
                  labels={"sample": "{sample}", "figure": "unmixing fit and residual"}),
        qc_files=unmix_qc_files(),
    params:
        settings=settings("unmix"),
        sample=sample_settings,
    log:
        "logs/unmix/{sample}.log",
    benchmark:
        "benchmarks/snakemake/unmix/{sample}.tsv"
    threads: 2
    resources:
        mem_mb=step_mem_mb("unmix"),
        runtime=step_runtime("unmix"),
    shell:
        step("unmix") + " 2> {log}"
