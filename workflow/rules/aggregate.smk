# Pseudobulk: sum counts per sample (× group) once, shared by every pseudobulk analysis.


rule aggregate:
    input:
        config["input"],
    output:
        out("pseudobulk.h5ad"),
    log:
        out("logs/aggregate.log"),
    benchmark:
        out("benchmarks/aggregate.tsv")
    conda:
        "../envs/scmlm.yaml"
    threads: 1
    resources:
        mem_mb=fixed_mem("aggregate", 4000),  # streams the input in row blocks
        runtime=runtime("aggregate", 60),
    params:
        args=aggregate_args,
    shell:
        "scmlm -v pseudobulk {input:q} {output:q} {params.args} > {log:q} 2>&1"
