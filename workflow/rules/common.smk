"""Config and sample sheet: loaded, validated against workflow/schemas/ and checked once, at start-up.

Everything a rule needs from the config passes through `params:` built here, so Snakemake's params
rerun-trigger reruns exactly the stages whose settings changed (and what depends on them).
"""
import math
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


SAMPLES = load_samples(config["samples"])
SLIDES = list(SAMPLES.index)


wildcard_constraints:
    slide="|".join(re.escape(s) for s in SLIDES),


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
