"""The paper's diagnostic: last-layer attention sparsity of DiRL vs DINO on a sample of tiles."""


rule attention:
    input:
        backbones=expand(f"{RESULTS}/pretrain/{{method}}/backbone.pt", method=config["pretrain"]["methods"]),
        tiles=expand(f"{RESULTS}/tiles/{{slide}}.zarr", slide=SLIDES),
        priors=expand(f"{RESULTS}/priors/{{slide}}.zarr", slide=SLIDES),
    output:
        json=expand(f"{RESULTS}/analysis/attention_{{method}}.json", method=config["pretrain"]["methods"]),
        overlays=report(
            directory(f"{RESULTS}/analysis/attention_overlays"),
            patterns=["{name}.png"],
            caption="../report/attention.rst",
            category="4. Attention",
        ),
    params:
        backbones=lambda w, input: named_paths("--backbone", input.backbones, lambda p: p.parent.name),
        cohort=COHORT,
        out=lambda w: f"{RESULTS}/analysis/attention_{{method}}.json",  # the tool fills {method}
        settings=cli_args(config["attention"]),
    log:
        f"{LOGS}/attention.log",
    benchmark:
        f"{BENCH}/attention.tsv"
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=config["extract"]["gpus"],
    conda:
        ENV
    shell:
        "dirl attention {params.backbones} --tiles {input.tiles:q} --priors {input.priors:q} "
        "--out {params.out:q} --overlays {output.overlays:q} --cohort {params.cohort} {params.settings} "
        "> {log:q} 2>&1"
