# HTML report (`snakemake --report report.html`): the workflow description, a summary table over all analyses, the
# result tables and the plots.


report: "../report/workflow.rst"


rule summary:
    input:
        expand(out("{analysis}/results.csv"), analysis=ANALYSES),
    output:
        report(
            out("summary.csv"),
            caption="../report/summary.rst",
            category="Summary",
            labels={"file": "summary.csv"},
        ),
    log:
        out("logs/summary.log"),
    benchmark:
        out("benchmarks/summary.tsv")
    conda:
        "../envs/scmlm.yaml"
    threads: 1
    resources:
        mem_mb=mem_from_input("summary", 5),
        runtime=runtime("summary", 10),
    params:
        analyses=list(ANALYSES),
    script:
        "../scripts/summary.py"
