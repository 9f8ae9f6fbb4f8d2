"""What an encoder is worth: every feature source (each run, the untrained backbone of each seed, the
`extract.encoders`, colour statistics) probed on labelled tissue with frozen features (`dirl probe`).

`snakemake --until probe` runs what the probes need (no MIL). Datasets: `probe.datasets` (manifests or
ImageFolders, cut into tiles as slides are) and, with `probe.regions`, the tiles that the sample sheet's
classified regions cover (dataset `regions`).
"""


rule probe_tiles:
    """A manifest's images as a probe tile store, cut at the cohort's µm/px and tile size."""
    input:
        manifest=lambda w: PROBE["datasets"][w.dataset]["manifest"],
    output:
        tiles=directory(f"{RESULTS}/probe/{{dataset}}/tiles.zarr"),
        splits=f"{RESULTS}/probe/{{dataset}}/splits.json",
    log:
        f"{LOGS}/probe/{{dataset}}/tiles.log",
    benchmark:
        f"{BENCH}/probe/{{dataset}}/tiles.tsv"
    wildcard_constraints:
        dataset="|".join(re.escape(d) for d in PROBE["datasets"]) or "(?!)",
    conda:
        ENV
    resources:
        **job(1),
        mem_mb=8000,
        runtime=120,
    params:
        mpp=lambda w: PROBE["datasets"][w.dataset]["mpp"],
        tiling=f"--mpp {config['tiling']['mpp']} --tile-px {config['tiling']['tile_px']}",
        settings=settings("probe"),
    shell:
        "dirl probe-tiles {output.tiles:q} --dataset {wildcards.dataset} --manifest {input.manifest:q} "
        "--image-mpp {params.mpp} {params.tiling} --splits {output.splits:q} --settings {params.settings:q} "
        "> {log:q} 2>&1"


rule probe_regions:
    """The slides' region-labelled tiles (sample sheet column `regions`) as the probe dataset `regions`."""
    input:
        tiles=expand(f"{RESULTS}/tiles/{{slide}}.zarr", slide=REGION_SLIDES),
        regions=[SAMPLES[s].regions for s in REGION_SLIDES],
    output:
        tiles=directory(f"{RESULTS}/probe/regions/tiles.zarr"),
        splits=f"{RESULTS}/probe/regions/splits.json",
    log:
        f"{LOGS}/probe/regions/tiles.log",
    conda:
        ENV
    resources:
        **job(1),
        mem_mb=8000,
        runtime=60,
    params:
        regions=" ".join(shlex.quote(f"{s}={SAMPLES[s].regions}") for s in REGION_SLIDES),
        tiling=f"--mpp {config['tiling']['mpp']} --tile-px {config['tiling']['tile_px']}",
        settings=settings("probe"),
    shell:
        "dirl probe-tiles {output.tiles:q} --dataset regions --regions {params.regions} --tiles {input.tiles:q} "
        "{params.tiling} --splits {output.splits:q} --settings {params.settings:q} > {log:q} 2>&1"


rule probe_extract:
    """One feature source's features of one probe dataset's tiles (the extraction every slide gets)."""
    input:
        tiles=f"{RESULTS}/probe/{{dataset}}/tiles.zarr",
        encoder=encoder_inputs,
    output:
        f"{RESULTS}/probe/{{dataset}}/features/{{source}}.h5",
    log:
        f"{LOGS}/probe/{{dataset}}/extract/{{source}}.log",
    wildcard_constraints:
        source="|".join(re.escape(s) for s in probe_sources()),
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


rule probe:
    """k-NN and logistic regression of every source on one dataset; per-source JSON, summary and figure."""
    input:
        tiles=f"{RESULTS}/probe/{{dataset}}/tiles.zarr",
        features=lambda w: expand(f"{RESULTS}/probe/{w.dataset}/features/{{source}}.h5", source=probe_sources()),
    output:
        summary=f"{RESULTS}/probe/{{dataset}}/summary.json",
        sources=[f"{RESULTS}/probe/{{dataset}}/{s}.json" for s in probe_sources()],
        png=report(
            f"{RESULTS}/probe/{{dataset}}/summary.png",
            caption="../report/probe.rst",
            category="5. What the encoders are worth",
            labels={"dataset": "{dataset}"},
        ),
    log:
        f"{LOGS}/probe/{{dataset}}/probe.log",
    benchmark:
        f"{BENCH}/probe/{{dataset}}/probe.tsv"
    conda:
        ENV
    resources:
        **job(1),
        mem_mb=8000,
        runtime=60,
    params:
        features=lambda w, input: named_paths("--features", input.features, lambda p: p.stem),
        out=lambda w, output: str(Path(output.summary).parent),
        settings=settings("probe"),
    shell:
        "dirl probe {input.tiles:q} {params.features} --out {params.out:q} --settings {params.settings:q} "
        "> {log:q} 2>&1"
