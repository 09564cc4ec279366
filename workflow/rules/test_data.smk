# The bundled test slides are simulated deterministically on first use
# (`qdquant simulate --cohort`), so the repository stays small.


rule simulate_test_slide:
    output:
        "test_data/slides/{name}.ome.tif",
    log:
        "logs/simulate/{name}.log",
    shell:
        "qdquant simulate --cohort --preset {wildcards.name:q} --out test_data/slides 2> {log}"
