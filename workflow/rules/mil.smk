"""Stage 6: cross-validated slide-level MIL classifiers per feature source and model, and the summary.

All feature sources and models share one splits file (`dirl splits`), so DiRL and DINO features are
compared on identical patient-level folds.
"""


rule mil_splits:
    """Patient-level stratified folds, made once per cohort; every source and model reads the same file."""
    input:
        samples=config["samples"],
    output:
        f"{RESULTS}/mil/splits.json",
    log:
        f"{LOGS}/mil/splits.log",
    conda:
        ENV
    params:
        settings=settings("mil", "dirl.mil.splits:SplitSettings"),
    shell:
        "dirl splits --samples {input.samples:q} --out {output:q} --settings {params.settings:q} > {log:q} 2>&1"


rule mil:
    input:
        samples=config["samples"],
        splits=f"{RESULTS}/mil/splits.json",
        features=lambda w: store_list(f"features.{w.source}", "labelled"),
        tiles=store_list("tiles", "labelled"),
    output:
        metrics=f"{RESULTS}/mil/{{source}}/{{model}}/metrics.json",
        predictions=f"{RESULTS}/mil/{{source}}/{{model}}/predictions.csv",
        attention=f"{RESULTS}/mil/{{source}}/{{model}}/attention.npz",
        application=f"{RESULTS}/mil/{{source}}/{{model}}/model.json",  # what applying the models needs
        final=[f"{RESULTS}/mil/{{source}}/{{model}}/final/model.pt"] if config["mil"]["final"] else [],
        roc=report(
            f"{RESULTS}/mil/{{source}}/{{model}}/roc.png",
            caption="../report/mil_roc.rst",
            category="5. Slide classification",
            subcategory="{model}",
            labels={"features": "{source}", "model": "{model}"},
        ),
    log:
        f"{LOGS}/mil/{{source}}/{{model}}.log",
    benchmark:
        f"{BENCH}/mil/{{source}}/{{model}}.tsv"
    conda:
        ENV
    threads: config["mil"]["threads"]
    resources:
        **job(config["mil"]["threads"]),
        mem_mb=8000,
        runtime=120,
    params:
        settings=settings("mil", "dirl.mil.train:MilSettings"),
        features=lambda w: f"{RESULTS}/features/{w.source}",
        out=lambda w, output: str(Path(output.metrics).parent),
        tiles=f"{RESULTS}/tiles",
        encoder=encoder_spec_arg,
    shell:
        "dirl mil --samples {input.samples:q} --features {params.features:q} --model {wildcards.model} "
        "--splits {input.splits:q} --tiles {params.tiles:q} --out {params.out:q} --threads {threads} "
        "--encoder-spec {params.encoder} "
        "--settings {params.settings:q} > {log:q} 2>&1"


rule summary:
    input:
        metrics=(
            expand(
                f"{RESULTS}/mil/{{source}}/{{model}}/metrics.json",
                source=feature_sources(),
                model=config["mil"]["models"],
            )
            if RUN_MIL
            else []
        ),
        attention=[] if DEPLOY else rules.attention.output.json,
        probes=expand(f"{RESULTS}/probe/{{dataset}}/summary.json", dataset=PROBE_DATASETS),
        deployed=[f"{RESULTS}/deploy/{s}/{m}/metrics.json" for s, m in DEPLOY_PLAN.pairs] if DEPLOY else [],
    output:
        tsv=f"{RESULTS}/summary.tsv",
        md=report(f"{RESULTS}/summary.md", caption="../report/summary.rst", category="0. Summary"),
    log:
        f"{LOGS}/summary.log",
    conda:
        ENV
    params:
        named=lambda w, input: named_paths("--metrics", input.metrics, lambda p: f"{p.parts[-3]}/{p.parts[-2]}"),
        probes=lambda w, input: named_paths("--probe", input.probes, lambda p: p.parent.name),
        deployed=lambda w, input: named_paths("--deploy", input.deployed, lambda p: f"{p.parts[-3]}/{p.parts[-2]}"),
        attention=lambda w, input: f"--attention {shlex.quote(input.attention)}" if input.attention else "",
        out=lambda w, output: str(Path(output.tsv).parent),
    shell:
        "dirl summary {params.named} {params.probes} {params.deployed} {params.attention} --out {params.out:q} "
        "> {log:q} 2>&1"
