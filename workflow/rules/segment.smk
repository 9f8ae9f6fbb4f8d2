"""Stages 2-3: nuclei (per slide), cohort cell classes, and per-pixel prior maps (per slide)."""



rule segment:
    input:
        tiles=f"{RESULTS}/tiles/{{slide}}.zarr",
    output:
        cells=directory(f"{RESULTS}/cells/{{slide}}.zarr"),
    params:
        settings=settings("segmentation"),
    log:
        f"{LOGS}/segment/{{slide}}.log",
    benchmark:
        f"{BENCH}/segment/{{slide}}.tsv"
    threads: config["segmentation"]["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
        **job(config["segmentation"]["threads"], segment_gpu()),
    conda:
        ENV
    shell:
        "dirl segment {input.tiles:q} {output.cells:q} --threads {threads} --settings {params.settings:q} > {log:q} 2>&1"


rule phenotype:
    input:
        cells=lambda w: expand(f"{RESULTS}/cells/{{slide}}.zarr", slide=SLIDES),
        tiles=lambda w: expand(f"{RESULTS}/tiles/{{slide}}.zarr", slide=SLIDES),
    output:
        model=f"{RESULTS}/phenotypes/model.json",
        gallery=report(
            f"{RESULTS}/phenotypes/gallery.png",
            caption="../report/phenotypes.rst",
            category="2. Nuclei and cell classes",
        ),
    params:
        settings=settings("phenotypes", "dirl.segment.phenotype:PhenotypeSettings"),
    log:
        f"{LOGS}/phenotype.log",
    benchmark:
        f"{BENCH}/phenotype.tsv"
    resources:
        mem_mb=8000,
        runtime=60,
        **job(1),
    conda:
        ENV
    shell:
        "dirl phenotype {input.cells:q} --tiles {input.tiles:q} --out {output.model:q} "
        "--gallery {output.gallery:q} --settings {params.settings:q} > {log:q} 2>&1"


rule priors:
    input:
        tiles=f"{RESULTS}/tiles/{{slide}}.zarr",
        cells=f"{RESULTS}/cells/{{slide}}.zarr",
        model=f"{RESULTS}/phenotypes/model.json",
    output:
        priors=directory(f"{RESULTS}/priors/{{slide}}.zarr"),
        overlay=report(
            f"{RESULTS}/priors/{{slide}}.png",
            caption="../report/priors.rst",
            category="2. Nuclei and cell classes",
            labels={"slide": "{slide}"},
        ),
    params:
        settings=settings("phenotypes", "dirl.segment.priors:PriorSettings"),
    log:
        f"{LOGS}/priors/{{slide}}.log",
    benchmark:
        f"{BENCH}/priors/{{slide}}.tsv"
    threads: config["segmentation"]["threads"]
    resources:
        mem_mb=4000,
        runtime=60,
        **job(config["segmentation"]["threads"]),
    conda:
        ENV
    shell:
        "dirl priors {input.tiles:q} {input.cells:q} {input.model:q} {output.priors:q} "
        "--overlay {output.overlay:q} --threads {threads} --settings {params.settings:q} > {log:q} 2>&1"
