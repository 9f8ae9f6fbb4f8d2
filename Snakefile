"""DiRL: whole slides -> tiles -> nuclei and priors -> DiRL/DINO pretraining -> features -> MIL.

    snakemake --cores all                                # the demo cohort (config/config.yaml)
    snakemake --cores all --configfile config/cohorts/<name>.yaml
    snakemake --profile workflow/profiles/slurm          # on a SLURM cluster
"""


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/synth.smk"
include: "workflow/rules/tile.smk"


rule all:
    input:
        expand(f"{RESULTS}/tiles/{{slide}}.zarr", slide=SLIDES),
    default_target: True
