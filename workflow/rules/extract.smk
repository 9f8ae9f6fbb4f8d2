"""Stage 5: tile features into HDF5 (CLAM/TRIDENT layout), per slide and feature source.

Feature sources are the pretrained methods (`pretrain.methods`) plus any encoder named under
`extract.encoders` (a timm model with local weights, e.g. an ImageNet or a public pathology encoder).
"""


rule extract:
    input:
        tiles=f"{RESULTS}/tiles/{{slide}}.zarr",
        encoder=encoder_inputs,
    output:
        f"{RESULTS}/features/{{source}}/{{slide}}.h5",
    log:
        f"{LOGS}/extract/{{source}}/{{slide}}.log",
    benchmark:
        f"{BENCH}/extract/{{source}}/{{slide}}.tsv"
    conda:
        ENV
    threads: config["extract"]["threads"]
    resources:
        **job(config["extract"]["threads"], config["extract"]["gpus"]),
        mem_mb=8000,
        runtime=60,
    params:
        encoder=encoder_args,
        settings=settings("extract"),
    shell:
        "dirl extract {input.tiles:q} {params.encoder} --out {output:q} --threads {threads} "
        "--settings {params.settings:q} > {log:q} 2>&1"
