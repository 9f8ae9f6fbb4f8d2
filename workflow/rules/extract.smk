"""Stage 5: tile features into HDF5 (CLAM/TRIDENT layout), per slide and feature source.

Feature sources are the pretrained methods (`pretrain.methods`) plus any encoder named under
`extract.encoders` (a timm model with local weights, e.g. an ImageNet or a public pathology encoder).

With `extract.slides_per_job: N` > 1, one job extracts a bundle of N slides and loads the encoder once
(on a GPU, starting Python, torch and CUDA and loading the weights costs as much as a short slide).
Snakemake's `group:` cannot do that: a group still runs one process, and asks one GPU, per slide.
A bundle's outputs are named file by file, so each bundle is its own rule (`extract_<source>_<k>`)
without wildcards: Snakemake finds a file's producer by its whole path. Planning still costs more (a
10,000-slide plan with N = 8: ~600 s of CPU against 220 s; README), hence the default of 1.
"""

if config["extract"]["slides_per_job"] == 1:

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

else:
    for source, k, members in extract_bundles():

        rule:
            name:
                f"extract_{source}_{k}"
            input:
                tiles=[f"{RESULTS}/tiles/{slide}.zarr" for slide in members],
                encoder=encoder_files(source),
            output:
                [f"{RESULTS}/features/{source}/{slide}.h5" for slide in members],
            log:
                f"{LOGS}/extract/{source}/bundle-{k}.log",
            benchmark:
                f"{BENCH}/extract/{source}/bundle-{k}.tsv"
            conda:
                ENV
            threads: config["extract"]["threads"]
            resources:
                **job(config["extract"]["threads"], config["extract"]["gpus"]),
                mem_mb=8000,
                runtime=60 * len(members),
            params:
                encoder=encoder_command_args(source),
                out=lambda w, output: os.path.dirname(output[0]),
                settings=settings("extract"),
            shell:
                "dirl extract {input.tiles:q} {params.encoder} --out {params.out:q} --threads {threads} "
                "--settings {params.settings:q} > {log:q} 2>&1"
