# Optional: write `input` from a bundled dataset (demo) or a simulation (tests, benchmarks).
# Defined only when config.create_input is set, so a user's own input file is never touched.

if "dataset" in config.get("create_input", {}):

    rule bundled_input:
        output:
            config["input"],
        log:
            out("logs/create_input.log"),
        benchmark:
            out("benchmarks/create_input.tsv")
        conda:
            "../envs/scmlm.yaml"
        threads: 1
        resources:
            mem_mb=fixed_mem("bundled_input", 4000),
            runtime=runtime("bundled_input", 30),
        params:
            name=config["create_input"]["dataset"],
        shell:
            "scmlm -v dataset {params.name:q} {output:q} > {log:q} 2>&1"


if "simulate" in config.get("create_input", {}):

    rule simulate_input:
        output:
            config["input"],
        log:
            out("logs/create_input.log"),
        benchmark:
            out("benchmarks/create_input.tsv")
        conda:
            "../envs/scmlm.yaml"
        threads: 1
        resources:
            mem_mb=fixed_mem("simulate_input", 4000),
            runtime=runtime("simulate_input", 120),
        params:
            args=simulate_args,
        shell:
            "scmlm -v simulate {output:q} {params.args} > {log:q} 2>&1"
