# Differential abundance (method: abundance): which cell types change in share between conditions, tested between
# samples. One job per analysis reads the input's obs only (no gene shards) and writes the table, the fitted design
# (params.json, read by the report) and the composition and effect plots.


rule fit_abundance:
    input:
        config["input"],
    output:
        results=report(
            out("{analysis}/results.csv"),
            caption="../report/results.rst",
            category="{analysis}",
            labels={"analysis": "{analysis}", "file": "results.csv"},
        ),
        params=out("{analysis}/params.json"),
        plots=report(
            directory(out("{analysis}/plots")),
            patterns=["{kind}.png"],
            caption="../report/plots.rst",
            category="{analysis}",
            labels={"analysis": "{analysis}", "plot": "{kind}"},
        ),
    log:
        out("logs/{analysis}/fit_abundance.log"),
    benchmark:
        out("benchmarks/{analysis}/fit_abundance.tsv")
    wildcard_constraints:
        analysis=names_regex("abundance"),
    conda:
        "../envs/scmlm.yaml"
    threads: 1
    resources:
        mem_mb=fixed_mem("fit_abundance", 4000),
        runtime=runtime("fit_abundance", 30),
    params:
        args=abundance_args,
    shell:
        "scmlm -v abundance --input {input:q} {params.args} --out {output.results:q}"
        " --out-params {output.params:q} --plots {output.plots:q} > {log:q} 2>&1"
