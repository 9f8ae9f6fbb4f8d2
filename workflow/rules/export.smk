"""QuPath export (qupath_export: true): per slide, the tiles and the nuclei with their cell class as GeoJSON."""


rule export:
    input:
        tiles=f"{RESULTS}/tiles/{{slide}}.zarr",
        cells=f"{RESULTS}/cells/{{slide}}.zarr",
        model=f"{RESULTS}/phenotypes/model.json",
    output:
        geojson=f"{RESULTS}/export/{{slide}}.geojson",
    log:
        f"{LOGS}/export/{{slide}}.log",
    benchmark:
        f"{BENCH}/export/{{slide}}.tsv"
    conda:
        ENV
    resources:
        **job(1),
        mem_mb=4000,
        runtime=60,
    shell:
        "dirl export {input.tiles:q} --cells {input.cells:q} --phenotypes {input.model:q} "
        "--out {output.geojson:q} > {log:q} 2>&1"
