"""Benchmark of planning: a dry run of the TCGA template with the SLURM profile on a sheet of N slides,
its CPU time and peak memory, against the same dry run on N/10 slides (same run). Prints JSON.

    python bench/plan.py [--small] [--slides 10000] [--out FILE]

Every `snakemake` call pays for planning — each rerun, `--forcerun`, the SLURM executor's own status
cycles — so it must grow linearly with the cohort: `per_slide_ratio` is the CPU seconds per slide at N
over those at N/10 (1.0: linear). Slides are empty files (a dry run opens none); the site settings of
the profile are filled in as a user would. Goal: <= 5 min and <= 2 GB at 10,000 slides on one core.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from emit import emit

ROOT = Path(__file__).resolve().parents[1]


def make_sheet(d: Path, n: int) -> Path:
    (d / "slides").mkdir(parents=True, exist_ok=True)
    rows = ["slide_id\tpath\tpatient_id\tlabel"]
    for i in range(n):
        path = d / "slides" / f"TCGA-{i:05d}.svs"
        path.touch()
        rows.append(f"TCGA-{i:05d}\t{path}\tP{i // 2:05d}\t{'IDC' if (i // 2) % 3 else 'ILC'}")
    sheet = d / "samples.tsv"
    sheet.write_text("\n".join(rows) + "\n")
    return sheet


def site_profile(d: Path) -> Path:
    prof = d / "profile"
    shutil.copytree(ROOT / "profiles" / "slurm", prof, dirs_exist_ok=True)
    cfg = prof / "config.yaml"
    cfg.write_text(cfg.read_text().replace('"CHANGE_ME"', '"site"'))
    return prof


def dry_run(work: Path, n: int, profile: Path) -> dict:
    sheet = make_sheet(work / f"n{n}", n)
    snakemake = Path(sys.executable).parent / "snakemake"
    cmd = [
        str(snakemake), "-n", "--profile", str(profile), "--configfile", str(ROOT / "config/cohorts/tcga_brca.yaml"),
        "--config", f"samples={sheet}", f"cohort=plan{n}", "--quiet", "rules", "host", "reason",
        "-d", str(work / f"n{n}"), "-s", str(ROOT / "Snakefile"),
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"dry run of {n} slides failed:\n{proc.stderr[-3000:]}")
    total = re.search(r"^total\s+(\d+)$", proc.stdout + proc.stderr, re.M)
    return {
        "slides": n,
        "jobs": int(total[1]) if total else None,
        "wall_s": round(wall, 2),
        "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 2),
        "peak_rss_mb": round(after.ru_maxrss / 1024),  # the largest child so far: the bigger run comes last
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=10000)
    ap.add_argument("--small", action="store_true", help="2,000 slides against 200")
    ap.add_argument("--workdir")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.small:
        a.slides = 2000
    with tempfile.TemporaryDirectory(prefix="dirl-bench-plan-") as tmp:
        work = Path(a.workdir or tmp)
        profile = site_profile(work)
        base = dry_run(work, max(1, a.slides // 10), profile)
        big = dry_run(work, a.slides, profile)
    res = {
        "bench": "plan",
        "template": "config/cohorts/tcga_brca.yaml with profiles/slurm",
        "baseline": base,
        "cohort": big,
        "cpu_s_per_slide": round(big["cpu_s"] / a.slides, 5),
        "baseline_cpu_s_per_slide": round(base["cpu_s"] / base["slides"], 5),
        "per_slide_ratio": round((big["cpu_s"] / a.slides) / (base["cpu_s"] / base["slides"]), 3),
        "goal_cpu_s_at_10000": 300,
        "goal_peak_rss_mb_at_10000": 2048,
    }
    emit(res, a.out)


if __name__ == "__main__":
    main()
