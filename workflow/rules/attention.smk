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
        backbones=lambda w, input: " ".join(
            f"--backbone {shlex.quote(Path(b).parent.name + '=' + b)}" for b in input.backbones),
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
        "--out {params.out:q} --overlays {output.overlays:q} --cohort {COHORT} {params.settings} "
        "> {log:q} 2>&1"
