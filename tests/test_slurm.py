"""The workflow on a real SLURM cluster (single node, tests/slurm_cluster.py), run as the README tells a
user: a site profile copied from profiles/slurm with account and partitions filled in, the README's
command with the venv not activated. Every job must run as a SLURM job asking for what the cohort implies
(CPUs from the stage's threads, no GPU for watershed and gpus: 0, hence the CPU partition), use the CPUs
it was given even when submitted with `--cores 1`, and a second run must do nothing.

Skipped, saying why, where SLURM and munge are not installed (.ci/run installs them) or not root."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import slurm_cluster
import yaml
from helpers_workflow import tiny_stages

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.slurm,
    pytest.mark.skipif(
        slurm_cluster.available() is not None, reason=f"no SLURM test cluster: {slurm_cluster.available()}"
    ),
]

THREADS = {"tile": 1, "segment": 2, "pretrain": 2, "extract": 1}
CONFIG = {
    "cohort": "slurm",
    "samples": "samples.tsv",
    "synth": {
        "s1": {"populations": ["lymphocyte"], "width": 768, "height": 768, "seed": 1, "tissue": "full"},
        "s2": {"populations": ["tumour"], "width": 768, "height": 768, "seed": 2, "tissue": "full"},
    },
    **tiny_stages(THREADS),
}
SAMPLES = "slide_id\tpath\ns1\tresources/synth/s1.svs\ns2\tresources/synth/s2.svs\n"  # no labels


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    yield c
    c.stop()


def site_profile(dest: Path) -> Path:
    """profiles/slurm copied and filled in as the README says (account, partitions). This cluster keeps
    no accounting database, so job states come from squeue (README: clusters without sacct)."""
    shutil.copytree(ROOT / "profiles" / "slurm", dest)
    text = (dest / "config.yaml").read_text()
    text = text.replace('slurm_account: "CHANGE_ME"', 'slurm_account: "lab"')
    text = text.replace('cpu_partition: "CHANGE_ME"', 'cpu_partition: "cpu"')
    text = text.replace('gpu_partition: "CHANGE_ME"', 'gpu_partition: "gpu"')
    profile = yaml.safe_load(text)
    assert "CHANGE_ME" not in yaml.safe_dump(profile)  # every value to set was set
    profile.update({"slurm-status-command": "squeue", "jobs": 4, "latency-wait": 5, "seconds-between-status-checks": 2})
    (dest / "config.yaml").write_text(yaml.safe_dump(profile))
    return dest


def snakemake(cluster, work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`.venv/bin/snakemake --profile <site> --configfile config.yaml` from a shell without the venv."""
    env = {k: v for k, v in cluster.env.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "snakemake"),
            "-s",
            str(ROOT / "Snakefile"),
            "--profile",
            str(work / "site"),
            "--configfile",
            "config.yaml",
            *args,
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )


def test_cohort_runs_as_slurm_jobs_with_the_resources_the_cohort_implies(cluster, tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    (tmp_path / "samples.tsv").write_text(SAMPLES)
    site_profile(tmp_path / "site")
    proc = snakemake(cluster, tmp_path, "--cores", "1")  # a small login node: 1 core
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    jobs = cluster.jobs()
    by_rule: dict[str, list[dict[str, str]]] = {}
    for j in jobs:
        m = re.match(r"rule_(\w+?)(_wildcards_.*)?$", j["comment"])
        assert m, j
        by_rule.setdefault(m[1], []).append(j)
    assert {r: len(v) for r, v in by_rule.items()} == {
        "synth": 2,
        "tile": 2,
        "segment": 2,
        "phenotype": 1,
        "priors": 2,
        "failed_slides": 1,
        "pretrain": 2,
        "attention": 1,
        "extract": 4,
    }, by_rule
    for rule, js in by_rule.items():
        for j in js:
            assert j["state"] == "COMPLETED" and j["partition"] == "cpu" and j["gres"] in ("N/A", ""), j
            assert int(j["cpus"]) == THREADS.get(rule, 1 if rule != "priors" else THREADS["segment"]), (rule, j)
    # each job used the CPUs SLURM gave it, not the submitting machine's single core
    seg = (tmp_path / "logs" / "slurm" / "segment" / "s1.log").read_text()
    assert "2 CPU threads (the SLURM allocation" in seg, seg[-2000:]
    assert (tmp_path / "results" / "slurm" / "features" / "dirl" / "s1.h5").exists()
    again = snakemake(cluster, tmp_path, "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
