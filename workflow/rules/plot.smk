# Diagnostic plots of one analysis (config.plots: volcano, pvalue_hist, ...), one PNG per kind (and group).


rule plot:
    input:
        out("{analysis}/results.csv"),
    output:
        report(
            directory(out("{analysis}/plots")),
            patterns=["{kind}__{group}__{contrast}.png"],
            caption="../report/plots.rst",
            category="{analysis}",
            labels={"analysis": "{analysis}", "plot": "{kind}", "group": "{group}"},
        ),
    log:
        out("logs/{analysis}/plot.log"),
    benchmark:
        out("benchmarks/{analysis}/plot.tsv")
    wildcard_constraints:
        analysis=names_regex("pseudobulk", "glmm"),  # abundance plots: rule fit_abundance
    conda:
        "../envs/scmlm.yaml"
    threads: 1
    resources:
        mem_mb=mem_from_input("plot", 5, 2000),
        runtime=runtime("plot", 30),
    params:
        args=plot_args,
    shell:
        "scmlm -v plot {input:q} --outdir {output:q} {params.args} > {log:q} 2>&1"
