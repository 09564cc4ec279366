rule unmix:
    input:
        images=lambda wc: UNMIX_IMAGES[wc.sample],
        spectra=config["spectra"],
        panel=config["panel"],
    output:
        zarr=directory(f"{RESULTS}/{{sample}}/unmixed.ome.zarr"),
        spectra=f"{RESULTS}/{{sample}}/spectra_used.csv",
        qc=report(f"{RESULTS}/{{sample}}/qc/unmixing.png", category="QC", subcategory="unmixing",
                  labels={"sample": "{sample}", "figure": "unmixing fit and residual"}),
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
