"""Config and sample sheet: loaded, validated against workflow/schemas/ and checked once, at start-up.

Every setting reaches its job through `params:` built here, so Snakemake's params
rerun-trigger reruns exactly the stages whose settings changed (and what depends on them).
"""
import json
import math
import os
import re
import shlex
from pathlib import Path

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")

validate(config, workflow.source_path("../schemas/config.schema.yaml"))

COHORT = config["cohort"]
RESULTS = f"results/{COHORT}"
LOGS = f"logs/{COHORT}"
BENCH = f"benchmarks/{COHORT}"
ENV = "../../envs/dirl.yaml"
# Every job runs the `dirl` package next to this Snakefile (`python -m dirl.cli`), whichever environment
# runs it: the venv, where it is installed too, or `--sdm conda`, where envs/dirl.yaml holds only its
# dependencies (profiles/default sets conda-not-block-search-path-envvars: Snakemake otherwise
# clears PYTHONPATH in conda environments). Workflow and library are versioned together.
SRC = str(Path(workflow.basedir).resolve())
_paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if SRC not in _paths:
    os.environ.update(PYTHONPATH=os.pathsep.join([SRC, *_paths]))


def load_samples(path):
    """Read and check the sample sheet; every error names the row and the column to fix."""
    if not Path(path).exists():
        raise WorkflowError(f"sample sheet {path} not found (config key `samples`)")
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in ("slide_id", "path") if c not in df.columns]
    if missing:
        raise WorkflowError(f"sample sheet {path}: missing column(s) {missing}; "
                            f"expected slide_id, path[, patient_id, label, mpp]")
    unknown = sorted(set(df.columns) - {"slide_id", "path", "patient_id", "label", "mpp"})
    if unknown:
        raise WorkflowError(f"sample sheet {path}: unknown column(s) {unknown}")
    schema = workflow.source_path("../schemas/samples.schema.yaml")
    rows = []
    for i, rec in enumerate(df.to_dict("records"), start=2):  # line 1 is the header
        rec = {k: v.strip() for k, v in rec.items() if v.strip() != ""}
        if "mpp" in rec:
            try:
                rec["mpp"] = float(rec["mpp"])
            except ValueError:
                raise WorkflowError(f"sample sheet {path}, line {i}: mpp {rec['mpp']!r} is not a number")
        try:
            validate(rec, schema)
        except WorkflowError as e:
            raise WorkflowError(f"sample sheet {path}, line {i} ({rec.get('slide_id', '?')!r}): {e}")
        rec.setdefault("patient_id", rec["slide_id"])
        rows.append(rec)
    out = pd.DataFrame(rows, columns=["slide_id", "path", "patient_id", "label", "mpp"])
    dup = out.slide_id[out.slide_id.duplicated()].tolist()
    if dup:
        raise WorkflowError(f"sample sheet {path}: duplicate slide_id(s) {dup}: each slide needs its own id")
    if out.empty:
        raise WorkflowError(f"sample sheet {path} has no slides")
    return out.set_index("slide_id", drop=False)


def check_labels(samples, folds):
    """MIL needs at least two classes, each with at least `folds` patients: say so before any job runs."""
    lab = samples[samples.label.notna() & (samples.label != "")]
    if lab.empty:
        raise WorkflowError(f"sample sheet {config['samples']}: no slide has a label; the mil stage needs "
                            "the `label` column (empty cells mark unlabelled, pretraining-only slides)")
    patients = lab.groupby("label").patient_id.nunique()
    if len(patients) < 2:
        raise WorkflowError(f"sample sheet {config['samples']}: only one label ({patients.index[0]!r}); "
                            "slide classification needs at least two")
    few = patients[patients < folds]
    if len(few):
        counts = {k: int(v) for k, v in few.items()}
        raise WorkflowError(f"sample sheet {config['samples']}: label(s) {counts} have fewer patients than "
                            f"mil.folds = {folds}; lower mil.folds or add patients")


SAMPLES = load_samples(config["samples"])
SLIDES = list(SAMPLES.index)
check_labels(SAMPLES, config["mil"]["folds"])


def cli_args(section, prefix=""):
    """Config section -> `--key value` flags (nested dicts become --section-key). None means "the
    command's own default" and is left out; booleans are passed as true/false."""
    out = []
    for key, value in section.items():
        flag = f"--{prefix}{key.replace('_', '-')}"
        if value is None:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        if isinstance(value, dict):
            out.append(cli_args(value, prefix=f"{prefix}{key.replace('_', '-')}-"))
        elif isinstance(value, list):
            out.append(" ".join([flag] + [shlex.quote(str(v)) for v in value]) if value else "")
        else:
            out.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(a for a in out if a)


def slide_path(wildcards):
    return SAMPLES.loc[wildcards.slide, "path"]


def slide_mpp_arg(wildcards):
    mpp = SAMPLES.loc[wildcards.slide, "mpp"]
    return "" if mpp is None or (isinstance(mpp, float) and math.isnan(mpp)) else f"--slide-mpp {mpp}"


def named_paths(flag, paths, name):
    """`--flag NAME=PATH` for each path, NAME from the path (e.g. its directory)."""
    return " ".join(f"{flag} {shlex.quote(f'{name(Path(p))}={p}')}" for p in paths)


# ---- segment
def segment_gpu():
    seg = config["segmentation"]
    return 1 if seg["backend"] == "cellpose" and str(seg["gpu"]).lower() != "false" else 0


# ---- pretrain
def pretrain_settings(method):
    cfg = {k: v for k, v in config["pretrain"].items() if k not in ("methods", "gpus", "threads")}
    return json.dumps({**cfg, "method": method}, sort_keys=True)


def pretrain_launcher(wildcards, resources):
    """torchrun with one process per GPU when a job holds several; plain `python -m dirl.cli` otherwise."""
    if int(resources.gpu) > 1:
        return f"torchrun --standalone --nproc_per_node {int(resources.gpu)} -m dirl.cli"
    return "python -m dirl.cli"


# ---- extract
def feature_sources():
    return list(config["pretrain"]["methods"]) + list(config["extract"]["encoders"])


def encoder_inputs(wildcards):
    if wildcards.source in config["pretrain"]["methods"]:
        return [f"{RESULTS}/pretrain/{wildcards.source}/backbone.pt",
                f"{RESULTS}/pretrain/{wildcards.source}/backbone.json"]
    weights = config["extract"]["encoders"][wildcards.source].get("weights")
    return [weights] if weights else []


def encoder_args(wildcards):
    if wildcards.source in config["pretrain"]["methods"]:
        return f"--encoder {shlex.quote(f'{RESULTS}/pretrain/{wildcards.source}/backbone.pt')}"
    enc = config["extract"]["encoders"][wildcards.source]
    args = cli_args({k: v for k, v in enc.items() if k != "model_kwargs"})
    if enc.get("model_kwargs"):
        args += f" --model-kwargs {shlex.quote(json.dumps(enc['model_kwargs']))}"
    return args


# ---- mil
def labelled_slides():
    return [s for s in SLIDES if isinstance(SAMPLES.loc[s, "label"], str) and SAMPLES.loc[s, "label"]]


def mil_settings():
    return cli_args({k: v for k, v in config["mil"].items() if k not in ("models", "threads")})
