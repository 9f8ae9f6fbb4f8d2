"""External validation (`deploy.from`): a trained cohort's MIL models applied to this cohort's slides.

This cohort's slides are tiled at the trained cohort's µm/px and tile size and encoded by the encoders its
models were trained on (their model.json); no segmentation, pretraining or cross-validation runs here.
"""


rule deploy:
    input:
        samples=config["samples"],
        features=lambda w: store_list(f"features.{w.source}"),
        tiles=store_list("tiles"),
        trained=lambda w: deploy_inputs(w),
    output:
        predictions=f"{RESULTS}/deploy/{{source}}/{{model}}/predictions.csv",
        attention=f"{RESULTS}/deploy/{{source}}/{{model}}/attention.npz",
        metrics=f"{RESULTS}/deploy/{{source}}/{{model}}/metrics.json",
        roc=report(
            f"{RESULTS}/deploy/{{source}}/{{model}}/roc.png",
            caption="../report/deploy_roc.rst",
            category="5. Slide classification",
            subcategory="external: {model}",
            labels={"features": "{source}", "model": "{model}"},
        ),
    log:
        f"{LOGS}/deploy/{{source}}/{{model}}.log",
    benchmark:
        f"{BENCH}/deploy/{{source}}/{{model}}.tsv"
    conda:
        ENV
    resources:
        **job(1),
        mem_mb=8000,
        runtime=60,
    params:
        trained=lambda w: str(DEPLOY_PLAN.pairs[(w.source, w.model)]),
        use=config["deploy"]["use"],
        features=lambda w: f"{RESULTS}/features/{w.source}",
        out=lambda w, output: str(Path(output.metrics).parent),
        tiles=f"{RESULTS}/tiles",
    shell:
        "dirl deploy --model {params.trained:q} --use {params.use} --features {params.features:q} "
        "--samples {input.samples:q} --tiles {params.tiles:q} --out {params.out:q} > {log:q} 2>&1"
