"""QuPath export (qupath_export: true): per slide, the tissue pieces and tiles (with every MIL model's attention
when MIL runs) as GeoJSON, and the nuclei with their cell class in a gzipped GeoJSON of their own."""


rule export:
    input:
        tiles=f"{RESULTS}/tiles/{{slide}}.zarr",
        cells=[] if DEPLOY else f"{RESULTS}/cells/{{slide}}.zarr",
        priors=[] if DEPLOY else f"{RESULTS}/priors/{{slide}}.zarr",
        diagnostics=[] if DEPLOY else rules.attention.output.json,
        attention=lambda w: mil_attention_files(),
    output:
        geojson=f"{RESULTS}/export/{{slide}}.geojson",
        nuclei=[] if DEPLOY else f"{RESULTS}/export/{{slide}}.nuclei.geojson.gz",
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
        nuclei=lambda w, input, output: (
            ""
            if DEPLOY
            else f"--cells {shlex.quote(input.cells)} --priors {shlex.quote(input.priors)} "
            f"--attention {shlex.quote(input.diagnostics)} --nuclei-out {shlex.quote(output.nuclei)}"
        ),
    shell:
        "dirl export {input.tiles:q} {params.nuclei} {params.attention} --out {output.geojson:q} > {log:q} 2>&1"
