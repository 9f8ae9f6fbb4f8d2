"""Stages 2-3: nuclei (per slide), cohort cell classes, and per-pixel prior maps (per slide)."""


rule segment:
    input:
        tiles=f"{RESULTS}/tiles/{{slide}}.zarr",
        nuclei=nuclei_file,
        weights=SEGMENT_WEIGHTS,  # backend unet: its network
    output:
        cells=directory(f"{RESULTS}/cells/{{slide}}.zarr"),
    log:
        f"{LOGS}/segment/{{slide}}.log",
    benchmark:
        f"{BENCH}/segment/{{slide}}.tsv"
    conda:
        ENV
    threads: config["segmentation"]["threads"]
    resources:
        **job(config["segmentation"]["threads"], segment_gpu()),
        mem_mb=8000,
        runtime=120,
    params:
        settings=settings("segmentation"),
        # with pretrain.tiles_per_slide, only the tiles pretraining and attention use are segmented
        cap=config["pretrain"]["tiles_per_slide"],
        nuclei=nuclei_arg,  # backend import: the slide's typed nuclei (sample sheet column `nuclei`)
    shell:
        "dirl segment {input.tiles:q} {output.cells:q} --threads {threads} --tiles-per-slide {params.cap} "
        "{params.nuclei} --settings {params.settings:q} > {log:q} 2>&1"


rule phenotype:
    input:
        cells=store_list("cells"),
        tiles=store_list("tiles"),
        failed=rules.failed_slides.output,  # the cohort-level stages list what they skip
        cell_labels=CELL_LABELS.values(),
    output:
        model=f"{RESULTS}/phenotypes/model.json",
        gallery=report(
            f"{RESULTS}/phenotypes/gallery.png",
            caption="../report/phenotypes.rst",
            category="2. Nuclei and cell classes",
        ),
        validation=report(
            f"{RESULTS}/phenotypes/validation.png",
            caption="../report/phenotypes.rst",
            category="2. Nuclei and cell classes",
        ),
    log:
        f"{LOGS}/phenotype.log",
    benchmark:
        f"{BENCH}/phenotype.tsv"
    conda:
        ENV
    threads: config["segmentation"]["threads"]  # the trained classifier's CNN
    resources:
        **job(config["segmentation"]["threads"]),
        mem_mb=8000,
        runtime=60,
    params:
        settings=settings("phenotypes", "dirl.segment.phenotype:PhenotypeSettings"),
        cell_labels=" ".join(f"--cell-labels {shlex.quote(f'{sid}={path}')}" for sid, path in CELL_LABELS.items()),
    shell:
        "dirl phenotype @{input.cells:q} --tiles @{input.tiles:q} --out {output.model:q} "
        "--gallery {output.gallery:q} --validation {output.validation:q} {params.cell_labels} --threads {threads} "
        "--settings {params.settings:q} > {log:q} 2>&1"


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
    log:
        f"{LOGS}/priors/{{slide}}.log",
    benchmark:
        f"{BENCH}/priors/{{slide}}.tsv"
    conda:
        ENV
    threads: config["segmentation"]["threads"]
    resources:
        **job(config["segmentation"]["threads"]),
        mem_mb=4000,
        runtime=60,
    params:
        settings=settings("phenotypes", "dirl.segment.priors:PriorSettings"),
    shell:
        "dirl priors {input.tiles:q} {input.cells:q} {input.model:q} {output.priors:q} "
        "--overlay {output.overlay:q} --threads {threads} --settings {params.settings:q} > {log:q} 2>&1"
