rule quantify:
    input:
        zarr=f"{RESULTS}/{{sample}}/unmixed.ome.zarr",
        segmentation=f"{RESULTS}/{{sample}}/qc/segmentation.png",
    output:
        f"{RESULTS}/{{sample}}/measurements.csv",
    params:
        settings=settings("quantify"),
    log:
        "logs/quantify/{sample}.log",
    benchmark:
        "benchmarks/snakemake/quantify/{sample}.tsv"
    threads: 2
    resources:
        mem_mb=step_mem_mb("quantify"),
        runtime=step_runtime("quantify"),
    shell:
        step("quantify") + " 2> {log}"
