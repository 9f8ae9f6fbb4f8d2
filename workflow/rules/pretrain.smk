"""Stage 4: self-supervised pretraining, DiRL and the DINO baseline, on every tile of the cohort.

The checkpoint and log.jsonl are not declared outputs on purpose: Snakemake deletes a job's outputs
before it reruns it, and a killed pretraining job must resume from its last checkpoint instead of
starting over. The trainer itself restarts from scratch when the settings of the checkpoint differ.
"""
import json


def pretrain_settings(method):
    cfg = {k: v for k, v in config["pretrain"].items() if k not in ("methods", "gpus", "threads")}
    return json.dumps({**cfg, "method": method}, sort_keys=True)


def pretrain_launcher(wildcards, resources):
    """torchrun with one process per GPU when a job holds several; plain `dirl` otherwise."""
    if int(resources.gpu) > 1:
        return f"torchrun --standalone --nproc_per_node {int(resources.gpu)} -m dirl.cli"
    return "dirl"


rule pretrain:
    input:
        tiles=expand(f"{RESULTS}/tiles/{{slide}}.zarr", slide=SLIDES),
        priors=lambda w: expand(f"{RESULTS}/priors/{{slide}}.zarr", slide=SLIDES) if w.method == "dirl" else [],
    output:
        backbone=f"{RESULTS}/pretrain/{{method}}/backbone.pt",
        meta=f"{RESULTS}/pretrain/{{method}}/backbone.json",
        curves=report(
            f"{RESULTS}/pretrain/{{method}}/loss_curves.png",
            caption="../report/pretrain.rst",
            category="3. Pretraining",
            labels={"method": "{method}"},
        ),
    wildcard_constraints:
        method="dirl|dino",
    params:
        settings=lambda w: pretrain_settings(w.method),
        priors=lambda w, input: ("--priors " + " ".join(shlex.quote(p) for p in input.priors)) if input.priors else "",
        outdir=lambda w, output: str(Path(output.backbone).parent),
        launcher=pretrain_launcher,
    log:
        f"{LOGS}/pretrain/{{method}}.log",
    benchmark:
        f"{BENCH}/pretrain/{{method}}.tsv"
    threads: config["pretrain"]["threads"]
    resources:
        mem_mb=16000,
        runtime=1440,
        gpu=config["pretrain"]["gpus"],
    conda:
        ENV
    shell:
        "{params.launcher} pretrain {params.outdir:q} --tiles {input.tiles:q} {params.priors} "
        "--settings {params.settings:q} --restart-on-mismatch >> {log:q} 2>&1"
