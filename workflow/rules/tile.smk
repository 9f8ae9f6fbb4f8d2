"""Stage 1: tissue detection and tiling into results/<cohort>/tiles/{slide}.zarr."""

# What a slide that cannot be read becomes (allow_failed_slides): a job resource, not a param, because it is
# no property of a good slide's tiles (a changed param would re-tile every slide when the setting is
# toggled; resources are no rerun trigger, and each job, local or on the cluster, evaluates it from the
# same config). A store already marked failed stays so (listed in failed_slides.txt) until it is deleted
# or `--forcerun tile`.
TILE_ON_ERROR = "empty" if config["allow_failed_slides"] else "fail"


rule tile:
    input:
        slide_path,
    output:
        tiles=directory(f"{RESULTS}/tiles/{{slide}}.zarr"),
        qc=report(
            f"{RESULTS}/qc/{{slide}}.png",
            caption="../report/tile_qc.rst",
            category="1. Tiling",
            labels={"slide": "{slide}"},
        ),
    log:
        f"{LOGS}/tile/{{slide}}.log",
    benchmark:
        f"{BENCH}/tile/{{slide}}.tsv"
    conda:
        ENV
    threads: config["tiling"]["threads"]
    resources:
        **job(config["tiling"]["threads"]),
        mem_mb=4000,
        runtime=60,
        on_error=TILE_ON_ERROR,
    params:
        slide=lambda w: SAMPLES[w.slide].path,
        settings=settings("tiling"),
        mpp=slide_mpp_arg,
    shell:
        "dirl tile {params.slide:q} {output.tiles:q} --slide-id {wildcards.slide:q} {params.mpp} "
        "--qc {output.qc:q} --threads {threads} --on-error {resources.on_error} --settings {params.settings:q} "
        "> {log:q} 2>&1"


rule failed_slides:
    """The slides whose tiling failed under allow_failed_slides (empty when none did)."""
    input:
        store_list("tiles"),
    output:
        report(f"{RESULTS}/failed_slides.txt", caption="../report/failed_slides.rst", category="1. Tiling"),
    log:
        f"{LOGS}/failed_slides.log",
    conda:
        ENV
    shell:
        "dirl failed-slides @{input:q} --out {output:q} > {log:q} 2>&1"
