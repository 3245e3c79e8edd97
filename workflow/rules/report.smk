# The landing page (`{outdir}/report.html`, rule report_html): one self-contained HTML file with the genes called per
# analysis and group, the top genes as sortable tables, the figures and the methods; written by `scmlm report`.
# Snakemake's own report (`snakemake --report snakemake_report.html`) lists it first, under "1. Overview", then the
# summary table, the result tables and the plots.


report: "../report/workflow.rst"


rule summary:
    input:
        expand(out("{analysis}/results.csv"), analysis=ANALYSES),
    output:
        report(
            out("summary.csv"),
            caption="../report/summary.rst",
            category="2. Summary",
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


rule report_html:
    input:
        data=config["input"],
        results=expand(out("{analysis}/results.csv"), analysis=ANALYSES),
        plots=expand(out("{analysis}/plots"), analysis=ANALYSES),
        hierarchy=hierarchy_dirs(),
    output:
        report(
            out("report.html"),
            caption="../report/landing.rst",
            category="1. Overview",
            labels={"page": "results at a glance"},
        ),
    log:
        out("logs/report_html.log"),
    benchmark:
        out("benchmarks/report_html.tsv")
    conda:
        "../envs/scmlm.yaml"
    threads: 1
    resources:
        mem_mb=fixed_mem("report_html", 4000),
        runtime=runtime("report_html", 10),
    params:
        args=report_args,
    shell:
        "scmlm -v report {output:q} {params.args} > {log:q} 2>&1"
