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
            # priors and the phenotype fit run nucleus classifiers at the segmentation's threads
            expected = THREADS["segment"] if rule in ("priors", "phenotype") else THREADS.get(rule, 1)
            assert int(j["cpus"]) == expected, (rule, j)
    # each job used the CPUs SLURM gave it, not the submitting machine's single core
    seg = (tmp_path / "logs" / "slurm" / "segment" / "s1.log").read_text()
    assert "2 CPU threads (the SLURM allocation" in seg, seg[-2000:]
    assert (tmp_path / "results" / "slurm" / "features" / "dirl" / "s1.h5").exists()
    again = snakemake(cluster, tmp_path, "-n")
    out = again.stdout + again.stderr  # (with groups, Snakemake prints an empty job table)
    assert again.returncode == 0 and ("Nothing to be done" in out or re.search(r"^total\s+0$", out, re.M)), out[-2000:]


def test_per_slide_jobs_run_in_bundles(cluster, tmp_path):
    """Snakemake's job grouping, set in the site profile (`groups`, `group-components`): 16 slides and one
    unreadable file in bundles of 8 submit 3 jobs per per-slide stage instead of 17, a bundle asks for the
    CPUs its jobs run on at once (here 2: `--cores 2` stacks the rest in series), the unreadable slide still
    fails alone (allow_failed_slides) and is listed, a second run does nothing, and every store equals the
    ungrouped local run's."""
    import numpy as np

    from dirl import store

    slides = {f"g{i:02d}": {"populations": ["lymphocyte"], "width": 512, "height": 512, "seed": i, "tissue": "full"}
              for i in range(16)}  # fmt: skip
    (tmp_path / "broken.svs").write_text("not a slide\n" * 50)
    sheet = "slide_id\tpath\n" + "".join(f"{s}\tresources/synth/{s}.svs\n" for s in slides) + "bad\tbroken.svs\n"
    config = {**CONFIG, "synth": slides, "allow_failed_slides": True, "tiling": {**CONFIG["tiling"], "mpp": 0.5}}
    grouped, local = tmp_path / "grouped", tmp_path / "local"
    for work in (grouped, local):
        work.mkdir()
        (work / "config.yaml").write_text(yaml.safe_dump(config))
        (work / "samples.tsv").write_text(sheet)
        shutil.copy(tmp_path / "broken.svs", work / "broken.svs")
    profile = site_profile(grouped / "site")
    settings = yaml.safe_load((profile / "config.yaml").read_text())
    shipped = (ROOT / "profiles" / "slurm" / "config.yaml").read_text()
    for key in ("cores", "groups", "group-components"):  # the shipped profile's bundling block, switched on
        settings |= yaml.safe_load(re.search(rf"^# ({key}: .*)$", shipped, re.M)[1])
    assert settings["group-components"] == ["bundle_tile=8", "bundle_priors=8", "bundle_export=8"]
    bundled = ("synth", "tile", "segment")  # and two more per-slide rules this test runs
    settings["groups"] += ["synth=bundle_synth", "segment=bundle_segment"]
    settings["group-components"] += ["bundle_synth=8", "bundle_segment=8"]
    (profile / "config.yaml").write_text(yaml.safe_dump(settings))
    before = {j["id"] for j in cluster.jobs()}
    proc = snakemake(cluster, grouped, "--cores", "2", "--until", "failed_slides", "segment")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    jobs = [j for j in cluster.jobs() if j["id"] not in before]
    assert all(j["state"] == "COMPLETED" for j in jobs), jobs
    per_rule = {r: sum(r in j["comment"] for j in jobs) for r in bundled}
    assert per_rule == {"synth": 2, "tile": 3, "segment": 3}, jobs  # 16 synthetic slides; 17 to tile and segment
    assert all(int(j["cpus"]) <= 2 for j in jobs), jobs
    again = snakemake(cluster, grouped, "-n", "--until", "failed_slides", "segment")
    out = again.stdout + again.stderr  # (with groups, Snakemake prints an empty job table)
    assert again.returncode == 0 and ("Nothing to be done" in out or re.search(r"^total\s+0$", out, re.M)), out[-2000:]
    env = {k: v for k, v in cluster.env.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    ungrouped = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "-s", str(ROOT / "Snakefile"), "--cores", "2",
         "--configfile", "config.yaml", "--until", "failed_slides", "segment"],
        cwd=local, env={**env, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert ungrouped.returncode == 0, ungrouped.stderr[-3000:]
    a, b = grouped / "results" / "slurm", local / "results" / "slurm"
    assert (a / "failed_slides.txt").read_text() == (b / "failed_slides.txt").read_text()
    assert (a / "failed_slides.txt").read_text().startswith("bad\t")
    for sid in slides:
        ta, tb = store.open_tiles(a / "tiles" / f"{sid}.zarr"), store.open_tiles(b / "tiles" / f"{sid}.zarr")
        assert len(ta) == len(tb) > 0 and np.array_equal(ta.read(0, len(ta)), tb.read(0, len(tb)))
        la = store.open_map(a / "cells" / f"{sid}.zarr", "labels", len(ta))
        lb = store.open_map(b / "cells" / f"{sid}.zarr", "labels", len(tb))
        assert np.array_equal(la[:], lb[:])
