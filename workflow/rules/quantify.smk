rule quantify:
    input:
        image=[STORE_IMAGE["zattrs"], STORE_IMAGE["level0"]],
        nuclei=f"{STORE}/labels/nuclei",
        cells=f"{STORE}/labels/cells",
        flagged=f"{STORE}/labels/flagged",  # pixels left out of every mean
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
