# Merge the gene shards of a GLMM analysis; scmlm merge refuses an incomplete shard set and computes padj (BH) over
# all genes of each group and contrast.


rule merge:
    input:
        shard_csvs,
    output:
        report(
            out("{analysis}/results.csv"),
            caption="../report/results.rst",
            category="{analysis}",
            labels={"analysis": "{analysis}", "file": "results.csv"},
        ),
    log:
        out("logs/{analysis}/merge.log"),
    benchmark:
        out("benchmarks/{analysis}/merge.tsv")
    wildcard_constraints:
        analysis=names_regex("glmm"),
    conda:
        "../envs/scmlm.yaml"
    threads: 1
    resources:
        mem_mb=mem_from_input("merge", 5),
        runtime=runtime("merge", 30),
    shell:
        "scmlm -v merge {input:q} --out {output:q} > {log:q} 2>&1"
