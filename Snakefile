"""DiRL: whole slides -> tiles -> nuclei and priors -> DiRL/DINO pretraining -> features -> MIL.

snakemake --cores all                                # the demo cohort (config/config.yaml)
snakemake --cores all --configfile config/cohorts/<name>.yaml
snakemake --profile profiles/slurm                   # on a SLURM cluster
"""

# The demo cohort is the default, never a base: with --configfile a cohort's settings are its own file
# (and --config) plus the schema's defaults (Snakemake would otherwise merge the file over the demo's).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


# the form of a slide id, not the list of them: Snakemake inlines a constraint into every path pattern it
# matches, and a 10,000-slide alternation made each match scan it (planning grew with the square of the
# cohort); a path of an id outside the sheet is refused by slide_path
wildcard_constraints:
    slide=dirl.samples.SLIDE_ID.pattern.strip("^$"),


include: "workflow/rules/synth.smk"
include: "workflow/rules/lists.smk"
include: "workflow/rules/tile.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/attention.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/mil.smk"
include: "workflow/rules/deploy.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/probe.smk"


rule all:
    default_target: True
    input:
        expand(f"{RESULTS}/qc/{{slide}}.png", slide=SLIDES),
        [] if DEPLOY else expand(f"{RESULTS}/priors/{{slide}}.png", slide=SLIDES),
        [] if DEPLOY else f"{RESULTS}/phenotypes/gallery.png",
        expand(f"{RESULTS}/pretrain/{{run}}/loss_curves.png", run=RUNS),
        [] if DEPLOY else rules.attention.output,
        expand(f"{RESULTS}/features/{{source}}/{{slide}}.h5", source=feature_sources(), slide=SLIDES),
        f"{RESULTS}/failed_slides.txt",
        f"{RESULTS}/summary.tsv" if RUN_MIL or PROBE_DATASETS or DEPLOY else [],
        expand(f"{RESULTS}/probe/{{dataset}}/summary.json", dataset=PROBE_DATASETS),
        [f"{RESULTS}/deploy/{s}/{m}/metrics.json" for s, m in DEPLOY_PLAN.pairs] if DEPLOY else [],
        (expand(f"{RESULTS}/export/{{slide}}.geojson", slide=SLIDES) if config["qupath_export"] else []),
