"""QuPath export (qupath_export: true): per slide, the tissue pieces and tiles (with every MIL model's attention
when MIL runs) as GeoJSON, and the nuclei with their cell class in a gzipped GeoJSON of their own."""


rule export:
    input:
        tiles=f"{RESULTS}/tiles/{{slide}}.zarr",
        cells=f"{RESULTS}/cells/{{slide}}.zarr",
        priors=f"{RESULTS}/priors/{{slide}}.zarr",
        diagnostics=rules.attention.output.json,
        attention=lambda w: (
            expand(
                f"{RESULTS}/mil/{{source}}/{{model}}/attention.npz",
                source=feature_sources(),
                model=[m for m in config["mil"]["models"] if m != "meanpool"],
            )
            if RUN_MIL
            else []
        ),
    output:
        geojson=f"{RESULTS}/export/{{slide}}.geojson",
        nuclei=f"{RESULTS}/export/{{slide}}.nuclei.geojson.gz",
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
    params:
        attention=lambda w, input: named_paths(
            "--mil-attention", input.attention, lambda p: f"{p.parts[-3]}/{p.parts[-2]}"
        ),
    shell:
        "dirl export {input.tiles:q} --cells {input.cells:q} --priors {input.priors:q} {params.attention} "
        "--attention {input.diagnostics:q} --out {output.geojson:q} --nuclei-out {output.nuclei:q} > {log:q} 2>&1"
