# Seeing the hierarchy of a GLMM analysis: variance partition and ICC of the most expressed genes, and shrinkage
# (BLUPs vs unpooled donor effects) of the most significant ones. Only the selected genes are read from the input.


rule hierarchy:
    input:
        data=config["input"],
        results=out("{analysis}/results.csv"),
    output:
        report(
            directory(out("{analysis}/hierarchy")),
            patterns=["{figure}.png"],
            caption="../report/hierarchy.rst",
            category="{analysis}",
            labels={"analysis": "{analysis}", "figure": "{figure}"},
        ),
    log:
        out("logs/{analysis}/hierarchy.log"),
    benchmark:
        out("benchmarks/{analysis}/hierarchy.tsv")
    wildcard_constraints:
        analysis=names_regex("glmm"),
    conda:
        "../envs/scmlm.yaml"
    threads: 1
    resources:
        mem_mb=hierarchy_mem_mb,
        runtime=runtime("hierarchy", 60),
    params:
        args=hierarchy_args,
    shell:
        "scmlm -v hierarchy {input.data:q} --results {input.results:q} {params.args} --outdir {output:q} > {log:q} 2>&1"
