"""Stage 4: self-supervised pretraining, DiRL and the DINO baseline, one run per method and seed.

The checkpoint and log.jsonl are not declared outputs on purpose: Snakemake deletes a job's outputs
before it reruns it, and a killed pretraining job must resume from its last checkpoint instead of
starting over. The trainer itself restarts from scratch when the settings of the checkpoint differ.
"""


rule pretrain:
    input:
        tiles=store_list("tiles"),
        priors=lambda w: store_list("priors") if RUNS[w.run][0] == "dirl" else [],
        failed=rules.failed_slides.output,
        init=PRETRAIN_INIT,  # a changed warm-start file reruns pretraining
    output:
        backbone=f"{RESULTS}/pretrain/{{run}}/backbone.pt",
        meta=f"{RESULTS}/pretrain/{{run}}/backbone.json",
        curves=report(
            f"{RESULTS}/pretrain/{{run}}/loss_curves.png",
            caption="../report/pretrain.rst",
            category="3. Pretraining",
            labels={"run": "{run}"},
        ),
    log:
        f"{LOGS}/pretrain/{{run}}.log",
    benchmark:
        f"{BENCH}/pretrain/{{run}}.tsv"
    wildcard_constraints:
        run="|".join(re.escape(r) for r in RUNS),
    conda:
        ENV
    threads: config["pretrain"]["threads"]
    resources:
        **pretrain_job(),
        mem_mb=16000,
        runtime=1440,
    params:
        settings=lambda w: pretrain_settings(w.run),
        priors=lambda w, input: f"--priors @{shlex.quote(input.priors)}" if input.priors else "",
        outdir=lambda w, output: str(Path(output.backbone).parent),
        launcher=pretrain_launcher,
    shell:
        "{params.launcher} pretrain {params.outdir:q} --tiles @{input.tiles:q} {params.priors} "
        "--settings {params.settings:q} --threads {threads} --restart-on-mismatch >> {log:q} 2>&1"
