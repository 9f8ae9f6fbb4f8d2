"""The paper's diagnostic: last-layer attention sparsity of every pretraining run against the untrained
backbone of the same seed, on one fixed sample of tiles."""


rule attention:
    input:
        backbones=expand(f"{RESULTS}/pretrain/{{run}}/backbone.pt", run=RUNS),
        tiles=store_list("tiles", "attention"),
        priors=store_list("priors", "attention"),
    output:
        json=f"{RESULTS}/analysis/attention.json",
        overlays=report(
            directory(f"{RESULTS}/analysis/attention_overlays"),
            patterns=["{name}.png"],
            caption="../report/attention.rst",
            category="4. Attention",
        ),
    log:
        f"{LOGS}/attention.log",
    benchmark:
        f"{BENCH}/attention.tsv"
    conda:
        ENV
    threads: config["extract"]["threads"]
    resources:
        **job(config["extract"]["threads"], config["extract"]["gpus"]),
        mem_mb=8000,
        runtime=60,
    params:
        backbones=lambda w, input: named_paths("--backbone", input.backbones, lambda p: p.parent.name),
        cohort=COHORT,
        settings=settings("attention"),
    shell:
        "dirl attention {params.backbones} --untrained --tiles @{input.tiles:q} --priors @{input.priors:q} "
        "--out {output.json:q} --overlays {output.overlays:q} --cohort {params.cohort} --threads {threads} "
        "--settings {params.settings:q} > {log:q} 2>&1"
