"""Config and sample sheet: loaded, typed, validated against workflow/schemas/ and checked once, at
start-up, by the same code `dirl` uses (dirl.config, dirl.samples).

Every setting reaches its job through `params:` built here, so Snakemake's params
rerun-trigger reruns exactly the stages whose settings changed (and what depends on them).
"""

import json
import math
import os
import re
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import min_version

min_version("9.0")

# Every job runs the `dirl` package next to this Snakefile (`python -m dirl.cli`), whichever environment
# runs it: the venv, where it is installed too, or `--sdm conda`, where envs/dirl.yaml holds only its
# dependencies (profiles/default sets conda-not-block-search-path-envvars: Snakemake otherwise
# clears PYTHONPATH in conda environments). Workflow and library are versioned together.
SRC = str(Path(workflow.basedir).resolve())
_paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if SRC not in _paths:
    os.environ.update(PYTHONPATH=os.pathsep.join([SRC, *_paths]))
if SRC not in sys.path:
    sys.path.insert(0, SRC)
# Jobs run the interpreter that runs Snakemake (the venv's), whatever the caller's PATH, so that
# `.venv/bin/snakemake` works without an activated venv, locally and in SLURM jobs (their inner snakemake
# runs under the same interpreter); under --sdm conda, the environment's own `python`. Shell commands
# call it through the shell functions `dirl <command>` and `dirl_distributed N <command>` (torchrun with
# N processes) defined in the prefix below: the interpreter's path is in no rule's code or params, so
# moving the venv reruns nothing. `set -euo pipefail` is Snakemake's default prefix, kept.
PY = (
    "python"
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    else shlex.quote(sys.executable)
)
_py = PY.replace("{", "{{").replace("}", "}}")  # Snakemake formats the prefix: braces doubled
shell.prefix(
    "set -euo pipefail; "
    f'dirl() {{{{ {_py} -m dirl.cli "$@"; }}}}; '
    f'dirl_distributed() {{{{ n=$1; shift; {_py} -m torch.distributed.run --standalone --nproc_per_node "$n" '
    '-m dirl.cli "$@"; }}; '
    f'dirl_nodes() {{{{ n=$1; g=$2; shift 2; srun --nodes "$n" --ntasks-per-node 1 --kill-on-bad-exit=1 '
    f'{_py} -m dirl.ssl.launch --gpus "$g" -- "$@"; }}}}; '
)

import dirl.atomic
import dirl.config
import dirl.mil.deploy
import dirl.encoders
import dirl.probe.data
import dirl.runs
import dirl.segment.examples
import dirl.segment.unet
import dirl.ssl.init
import dirl.samples
import dirl.settings
from dirl.errors import DirlError

_schema_path = workflow.source_path("../schemas/config.schema.yaml")
with open(_schema_path) as f:
    _schema = yaml.safe_load(f)
try:
    config.update(dirl.config.load(dict(config), _schema))  # --config values arrive as strings: typed here
    SAMPLE_LIST = dirl.samples.read_samples(config["samples"])
except DirlError as e:
    raise WorkflowError(str(e)) from None

COHORT = config["cohort"]
RESULTS = f"results/{COHORT}"
LOGS = f"logs/{COHORT}"
BENCH = f"benchmarks/{COHORT}"
ENV = "../../envs/dirl.yaml"
SAMPLES = {s.slide_id: s for s in SAMPLE_LIST}
SLIDES = list(SAMPLES)
ATTENTION_SLIDES = config["attention"]["slides"] or SLIDES
IMPORT_NUCLEI = config["segmentation"]["backend"] == "import"
_no_nuclei = [s.slide_id for s in SAMPLE_LIST if IMPORT_NUCLEI and not s.nuclei]
if config["phenotypes"]["source"] == "imported" and not IMPORT_NUCLEI:
    raise WorkflowError("phenotypes.source imported classes imported nuclei: set segmentation.backend: import")
if _no_nuclei:
    raise WorkflowError(
        f"segmentation.backend import reads each slide's typed nuclei from the sample sheet's `nuclei` column; "
        f"{config['samples']} names none for {_no_nuclei}"
    )
# backend unet: its weights, an input of every segment job (checked here: a missing or foreign file would
# fail each job)
SEGMENT_WEIGHTS = []
if config["segmentation"]["backend"] == "unet":
    try:
        SEGMENT_WEIGHTS = [str(dirl.segment.unet.weights_file(config["segmentation"]["weights"]))]
    except DirlError as e:
        raise WorkflowError(str(e)) from None
# phenotypes.source trained: the slides' typed examples (sample sheet column cell_labels), checked here
TRAINED = config["phenotypes"]["source"] == "trained"
CELL_LABELS = {s.slide_id: s.cell_labels for s in SAMPLE_LIST if s.cell_labels} if TRAINED else {}
if TRAINED:
    try:
        dirl.segment.examples.check_cell_labels(CELL_LABELS, config["samples"], config["phenotypes"])
    except DirlError as e:
        raise WorkflowError(str(e)) from None
_unknown = sorted(set(ATTENTION_SLIDES) - set(SLIDES))
if _unknown:
    raise WorkflowError(f"config attention.slides: {_unknown} are not slide ids of {config['samples']}")
# MIL is part of the plan when the sheet has labels and mil.models names a model; otherwise every stage up
# to features runs (self-supervised pretraining on unlabelled slides is DiRL's main use).
LABELLED = [s.slide_id for s in dirl.samples.labelled(SAMPLE_LIST)]
# deploy: a trained cohort's models applied to this cohort's slides (external validation); no segmentation,
# pretraining or cross-validation here, the trained cohort's encoders and models
DEPLOY = config["deploy"]["from"]
if DEPLOY:
    try:
        DEPLOY_PLAN = dirl.mil.deploy.plan(
            config["deploy"], config["tiling"], [s.label for s in SAMPLE_LIST if s.label]
        )
    except DirlError as e:
        raise WorkflowError(str(e)) from None
    DEPLOY_SPECS = DEPLOY_PLAN.specs


def deploy_inputs(wildcards):
    """The trained model files a deployment reads: a retrained model reruns it."""
    d = DEPLOY_PLAN.pairs[(wildcards.source, wildcards.model)]
    meta = DEPLOY_PLAN.meta[(wildcards.source, wildcards.model)]
    models = [meta["final"]["model"]] if config["deploy"]["use"] == "final" else [f["model"] for f in meta["folds"]]
    return [str(d / "model.json"), *(str(d / m) for m in models)]


RUN_MIL = bool(LABELLED) and bool(config["mil"]["models"]) and not DEPLOY
if RUN_MIL:
    try:
        dirl.samples.check_mil_labels(config["samples"], SAMPLE_LIST, config["mil"]["folds"])
    except DirlError as e:
        raise WorkflowError(str(e)) from None
elif workflow.is_main_process and not DEPLOY:  # cluster jobs re-read the Snakefile: say it once
    logger.warning(
        f"note: {'no slide has a label' if not LABELLED else 'mil.models is empty'}: "
        "MIL and the summary are left out; every stage up to features runs"
    )


def settings(section, target=None, **extra):
    """The `--settings` JSON of a command: its config section without the workflow's keys (job
    resources, run lists: dirl.settings.SECTIONS), for a shared section only the keys of `target`."""
    d = dirl.settings.command_settings(section, config[section], target)
    return json.dumps({**d, **extra}, sort_keys=True)


def slide_path(wildcards):
    """The slide file as input when it exists or a rule makes it (synthetic and demo slides); a missing
    slide is left out, so that it fails its own tile job (naming it), not the whole run at start-up."""
    if wildcards.slide not in SAMPLES:
        raise WorkflowError(f"{wildcards.slide} is no slide_id of {config['samples']}")
    path = SAMPLES[wildcards.slide].path
    if os.path.exists(path) or any(r.is_producer(path) for r in workflow.rules if r.name != "tile"):
        return path
    return []


def nuclei_file(wildcards):
    """The slide's typed nuclei (backend import) as input when the file exists; a missing one fails the
    slide's own segment job, naming it."""
    path = SAMPLES[wildcards.slide].nuclei if IMPORT_NUCLEI else None
    return path if path and os.path.exists(path) else []


def nuclei_arg(wildcards):
    path = SAMPLES[wildcards.slide].nuclei if IMPORT_NUCLEI else None
    return f"--nuclei {shlex.quote(path)}" if path else ""


def slide_mpp_arg(wildcards):
    mpp = SAMPLES[wildcards.slide].mpp
    return "" if mpp is None else f"--slide-mpp {mpp}"


def named_paths(flag, paths, name):
    """`--flag NAME=PATH` for each path, NAME from the path (e.g. its directory)."""
    return " ".join(f"{flag} {shlex.quote(f'{name(Path(p))}={p}')}" for p in paths)


# ---- job resources on a cluster: CPUs and GPUs follow the cohort config, partitions and GPU model
# are the site's (config section `slurm`, set by the SLURM profile); ignored when running locally
def job(threads, gpus=0):
    """resources of a job: `cpus_per_task` (the configured threads, not capped by the submitting
    machine's cores), `gpu`, and the partition and GPU model for that many GPUs."""
    site = config["slurm"]
    return {
        "cpus_per_task": int(threads),
        "gpu": int(gpus),
        "slurm_partition": lambda w: site["gpu_partition" if gpus else "cpu_partition"],
        "gpu_model": lambda w: site["gpu_model"] if gpus else None,
    }


# ---- segment
def segment_gpu():
    seg = config["segmentation"]
    return 1 if seg["backend"] == "cellpose" and str(seg["gpu"]).lower() != "false" else 0


# ---- pretrain: one run per method and seed (replicates), named `<method>` with one seed, else
# `<method>-s<seed>`; the name is the run's directory under pretrain/, its feature source and MIL source
RUNS = {} if DEPLOY else dirl.runs.runs(config["pretrain"]["methods"], config["pretrain"]["seeds"])
try:  # the warm-start weights exist and are a kind dirl reads (their keys are checked when the job starts)
    PRETRAIN_INIT = str(dirl.ssl.init.resolve(config["pretrain"]["init"])[0]) if config["pretrain"]["init"] else []
except DirlError as e:
    raise WorkflowError(str(e)) from None
try:
    dirl.runs.check_encoder_names(list(config["extract"]["encoders"]), list(RUNS))
except DirlError as e:
    raise WorkflowError(str(e)) from None


def pretrain_settings(run):
    method, seed = RUNS[run]
    return settings("pretrain", method=method, seed=seed)


def pretrain_job():
    """A pretraining job's resources. On several nodes (`pretrain.nodes`): one SLURM job of that many nodes,
    one task per node (`srun` in the shell command starts a torchrun agent on each: the executor plugin's
    `mpi` resource says the command launches its own tasks), `pretrain.gpus` GPUs per node as generic
    resources (`--gpus` would be a total that SLURM may spread unevenly)."""
    p, site = config["pretrain"], config["slurm"]
    r = job(p["threads"], p["gpus"])
    if p["nodes"] > 1:
        r |= {"nodes": p["nodes"], "tasks": p["nodes"], "mpi": "srun", "gpu": 0, "gpu_model": None}
        if p["gpus"]:  # tasks_per_gpu 0: the plugin would otherwise read `tasks` as tasks per GPU
            model = f"{site['gpu_model']}:" if site["gpu_model"] else ""
            r |= {"gres": f"gpu:{model}{p['gpus']}", "tasks_per_gpu": 0}
    return r


def pretrain_launcher(wildcards, resources):
    """`dirl_nodes N G` (srun, a torchrun agent per node, G processes each) on several nodes, torchrun
    with one process per GPU when a job holds several (`dirl_distributed N`; both in the shell prefix
    above), plain `dirl` otherwise."""
    p = config["pretrain"]
    if p["nodes"] > 1:
        return f"dirl_nodes {p['nodes']} {p['gpus']}"
    if p["gpus"] > 1:
        return f"dirl_distributed {p['gpus']}"
    return "dirl"


# ---- extract
def feature_sources():
    if DEPLOY:
        return list(DEPLOY_SPECS)
    return list(RUNS) + list(config["extract"]["encoders"])


# the probe's references beside the runs and encoders: the untrained backbone of each seed (built as the
# seed's first run was, from its backbone.json) and the colour statistics (dirl.encoders)
UNTRAINED_OF = {
    dirl.runs.untrained_name(seed if len(config["pretrain"]["seeds"]) > 1 else None): run
    for run, (method, seed) in reversed(list(RUNS.items()))
}


def encoder_spec(source):
    """How `dirl extract` builds a feature source's encoder (dirl.encoders.SPEC_KEYS): a run's backbone, the
    untrained backbone of a seed, colour statistics, an `extract.encoders` entry, or, deploying, the encoder
    the trained cohort's model was trained on."""
    if source == dirl.runs.COLOUR:
        return {"encoder": "colour", "img_size": config["tiling"]["tile_px"]}
    if DEPLOY:
        return DEPLOY_SPECS[source]
    if source in RUNS:
        return {"encoder": f"{RESULTS}/pretrain/{source}/backbone.pt"}
    if source in UNTRAINED_OF:
        return {"encoder": f"untrained:{RESULTS}/pretrain/{UNTRAINED_OF[source]}/backbone.pt"}
    return dict(config["extract"]["encoders"][source])


def encoder_inputs(wildcards):
    """The files a source's encoder is built from: a changed one reruns the source's extraction."""
    return encoder_files(wildcards.source)


def encoder_files(source):
    spec = encoder_spec(source)
    path = spec["encoder"].removeprefix("untrained:")
    if path.endswith("backbone.pt"):
        meta = str(Path(path).with_suffix(".json"))
        return [meta] if spec["encoder"].startswith("untrained:") else [path, meta]
    return [spec["weights"]] if spec.get("weights") else []


def encoder_args(wildcards):
    return encoder_command_args(wildcards.source)


def encoder_command_args(source):
    return " ".join(shlex.quote(a) for a in dirl.encoders.spec_args(encoder_spec(source)))


def extract_bundles():
    """(source, k, slides) of each extract job when `extract.slides_per_job` > 1: runs of the sample sheet
    in its order, so that slides appended to the sheet change only the last bundle (a bundle whose slides
    change reruns whole)."""
    n = config["extract"]["slides_per_job"]
    return [(source, i // n, SLIDES[i : i + n]) for source in feature_sources() for i in range(0, len(SLIDES), n)]


def encoder_spec_arg(wildcards):
    """The source's encoder as the MIL job records it in a final model (absolute paths): what deployment
    and `dirl predict` rebuild it from."""
    spec = dict(encoder_spec(wildcards.source))
    for key in ("encoder", "weights"):
        value = spec.get(key)
        if value and key == "encoder" and value.startswith("untrained:"):
            spec[key] = f"untrained:{Path(value.split(':', 1)[1]).resolve()}"
        elif value and (key == "weights" or value.endswith(".pt")):
            spec[key] = str(Path(value).resolve())
    return shlex.quote(json.dumps(spec, sort_keys=True))


# ---- probe: labelled datasets (manifests, ImageFolders) and the slides' classified regions, checked here
PROBE = config["probe"]
REGION_SLIDES = [s.slide_id for s in SAMPLE_LIST if s.regions] if PROBE["regions"] else []
if PROBE["regions"] and not REGION_SLIDES:
    raise WorkflowError(f"probe.regions: true, but the sample sheet {config['samples']} names no `regions` file")
try:
    for _name, _d in PROBE["datasets"].items():
        dirl.probe.data.read_dataset(_d["manifest"])
    for _sid in REGION_SLIDES:
        dirl.probe.data.check_regions_file(SAMPLES[_sid].regions, SAMPLES[_sid].path)
except DirlError as e:
    raise WorkflowError(str(e)) from None
PROBE_DATASETS = list(PROBE["datasets"]) + (["regions"] if REGION_SLIDES else [])


def probe_sources():
    """Every feature source the probe compares: the runs, the untrained backbone of each seed, the
    `extract.encoders` and the colour statistics."""
    if DEPLOY:  # the trained cohort's encoders, on this cohort's tissue
        return [*DEPLOY_SPECS, dirl.runs.COLOUR]
    return list(RUNS) + list(UNTRAINED_OF) + list(config["extract"]["encoders"]) + [dirl.runs.COLOUR]


# ---- export
def mil_attention_files():
    """The attention of every MIL model with attention (not meanpool): cross-validated, or deployed."""
    models = [m for m in config["mil"]["models"] if m != "meanpool"]
    if DEPLOY:
        return [f"{RESULTS}/deploy/{s}/{m}/attention.npz" for s, m in DEPLOY_PLAN.pairs if m != "meanpool"]
    return (
        expand(f"{RESULTS}/mil/{{source}}/{{model}}/attention.npz", source=feature_sources(), model=models)
        if RUN_MIL
        else []
    )


# ---- store lists (lists.smk): how cohort-level jobs name every slide's store
LIST_SETS = {"all": SLIDES, "labelled": LABELLED, "attention": ATTENTION_SLIDES}


def list_kinds():
    """Stores a list can name: {kind: path pattern under RESULTS}."""
    kinds = {"tiles": "tiles/{slide}.zarr", "cells": "cells/{slide}.zarr", "priors": "priors/{slide}.zarr"}
    return kinds | {f"features.{s}": f"features/{s}/{{slide}}.h5" for s in feature_sources()}


def store_list(kind, subset="all"):
    """The list file of every `subset` slide's `kind` store (input of the job that reads them)."""
    return f"{RESULTS}/lists/{subset}/{kind}.txt"


def listed_stores(wildcards):
    return expand(f"{RESULTS}/{list_kinds()[wildcards.kind]}", slide=LIST_SETS[wildcards.subset])


def write_list(paths, out, log):
    """One path per line, atomically: `dirl <command> @out` reads them as arguments."""
    with dirl.atomic.atomic_path(out) as tmp:
        tmp.write_text("".join(f"{p}\n" for p in paths))
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    Path(log).write_text(f"{len(paths)} paths -> {out}\n")
