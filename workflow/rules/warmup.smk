# One job compiles every numba kernel before the fit jobs start, so that the GLMM shard jobs load the machine code
# from numba's cache instead of each compiling it (tens of seconds to minutes per job).
# The cache is numba's default (next to the installed package, or ~/.cache/numba for a read-only installation), or
# NUMBA_CACHE_DIR when it is set in the environment that starts Snakemake: on a cluster, export it to a directory that
# every node sees (cluster jobs inherit the environment), and NUMBA_CPU_NAME=generic if the nodes' CPUs differ.


rule warmup:
    output:
        out("logs/warmup.txt"),
    log:
        out("logs/warmup.log"),
    benchmark:
        out("benchmarks/warmup.tsv")
    conda:
        "../envs/scmlm.yaml"
    threads: 1
    resources:
        mem_mb=fixed_mem("warmup", 2000),
        runtime=runtime("warmup", 60),
    shell:
        "scmlm -v warmup > {output:q} 2> {log:q}"
