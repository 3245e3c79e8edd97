# Pseudobulk analyses: one job fits all genes of every group (the empirical-Bayes steps need all genes), padj included.
# GLMM analyses: one job per gene shard "{i}-of-{n}" (1-based); padj is left to merge.


rule fit_pseudobulk:
    input:
        out("pseudobulk.h5ad"),
    output:
        report(
            out("{analysis}/results.csv"),
            caption="../report/results.rst",
            category="{analysis}",
            labels={"analysis": "{analysis}", "file": "results.csv"},
        ),
    log:
        out("logs/{analysis}/fit_pseudobulk.log"),
    benchmark:
        out("benchmarks/{analysis}/fit_pseudobulk.tsv")
    wildcard_constraints:
        analysis=names_regex("pseudobulk"),
    conda:
        "../envs/scmlm.yaml"
    threads: 1
    resources:
        mem_mb=mem_from_input("fit_pseudobulk", 4, 2000),
        runtime=runtime("fit_pseudobulk", 60),
    params:
        args=de_args,
    shell:
        "scmlm -v de {input:q} {params.args} --out {output:q} > {log:q} 2>&1"


rule split_shards:
    input:
        config["input"],
    output:
        temp(directory(out("split/{n}-shards"))),
    log:
        out("logs/split_{n}-shards.log"),
    benchmark:
        out("benchmarks/split_{n}-shards.tsv")
    conda:
        "../envs/scmlm.yaml"
    threads: 1
    resources:
        mem_mb=fixed_mem("split_shards", 4000),
        runtime=runtime("split_shards", 120),
    params:
        layer=config["layer"],
        tmm=tmm_specs,
    script:
        "../scripts/split_shards.py"


rule fit_glmm:
    input:
        shards=out("split/{n}-shards"),
        warmup=out("logs/warmup.txt"),
    output:
        out("{analysis}/shards/{i}-of-{n}.csv"),
    log:
        out("logs/{analysis}/fit_glmm_{i}-of-{n}.log"),
    benchmark:
        out("benchmarks/{analysis}/fit_glmm_{i}-of-{n}.tsv")
    wildcard_constraints:
        analysis=names_regex("glmm"),
    conda:
        "../envs/scmlm.yaml"
    threads: glmm_threads
    resources:
        mem_mb=shard_mem_mb,
        runtime=runtime("fit_glmm", 240),
    params:
        args=de_args,
        offset=lambda w: shard_offset(w.analysis),
    shell:
        "scmlm -v de {input.shards:q}/{wildcards.i}-of-{wildcards.n}.h5ad {params.args}"
        " --offset {params.offset} --shard {wildcards.i}/{wildcards.n}"
        " --n-jobs {threads} --out {output:q} > {log:q} 2>&1"
