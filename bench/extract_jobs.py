"""Benchmark of extraction jobs: one `dirl extract` process per slide against one process for a bundle of
slides (`extract.slides_per_job`), in one run. Prints JSON.

    python bench/extract_jobs.py [--small] [--slides 4] [--tiles 64] [--out FILE]

Each job is the real command as the workflow runs it (a fresh Python, torch import, encoder built and its
weights file loaded, then the slides): per-slide jobs pay that start-up once per slide, a bundle once.
Reported: tiles/s per job for both, their ratio, and the start-up seconds a job pays (the difference per
slide). The slides are synthetic tile stores (bench/extract.py's), the weights a locally written timm
state dict. 64 tiles of ViT-S/16 take this CPU about as long as a whole slide takes a GPU (seconds); on a
GPU a job also starts CUDA, which this CPU figure leaves out.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from emit import add_run_arguments, emit
from extract import make_store

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def dirl_extract(stores: list[Path], out: Path, arch: str, weights: Path, img: int, threads: int) -> float:
    """Wall seconds of one `dirl extract` job over `stores`."""
    cmd = [str(Path(sys.executable).with_name("dirl")), "extract", *map(str, stores), "--encoder", f"timm:{arch}"]
    cmd += ["--weights", str(weights), "--img-size", str(img), "--out", str(out), "--threads", str(threads)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit_small_patch16_224")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--tiles", type=int, default=64, help="tiles per slide (a slide of seconds, as on a GPU)")
    ap.add_argument("--threads", type=int, default=2)
    add_run_arguments(ap, "ViT-Tiny, 32 tiles per slide")
    a = ap.parse_args()
    if a.small:
        a.arch, a.tiles = "vit_tiny_patch16_224", 32

    import timm
    import torch

    work = Path(a.workdir or tempfile.mkdtemp(prefix="dirl-bench-extract-jobs-"))
    stores = [work / f"slide{i}.zarr" for i in range(a.slides)]
    for s in stores:
        if not s.exists():
            make_store(s, a.tiles, a.img, "zstd")
    weights = work / f"{a.arch}.pth"
    if not weights.exists():
        torch.save(timm.create_model(a.arch, pretrained=False, num_classes=0).state_dict(), weights)

    # alternated, so that drifts of a shared machine hit both alike
    per_slide, bundle = [], []
    for rep in range(2):
        per_slide.append(sum(dirl_extract([s], work / f"one{rep}", a.arch, weights, a.img, a.threads) for s in stores))
        bundle.append(dirl_extract(stores, work / f"bundle{rep}", a.arch, weights, a.img, a.threads))
    t_one, t_bundle = min(per_slide), min(bundle)
    n = a.slides * a.tiles
    emit(
        {
            "bench": "extract_jobs",
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "arch": a.arch,
            "img": a.img,
            "slides": a.slides,
            "tiles_per_slide": a.tiles,
            "per_slide_jobs_tiles_per_s": round(n / t_one, 1),
            "bundle_job_tiles_per_s": round(n / t_bundle, 1),
            "bundle_vs_per_slide": round(t_one / t_bundle, 3),
            "startup_s_per_job": round((t_one - t_bundle) / (a.slides - 1), 2) if a.slides > 1 else None,
            "slide_s_in_bundle": round(t_bundle / a.slides, 2),
            "seconds": {"per_slide": [round(t, 2) for t in per_slide], "bundle": [round(t, 2) for t in bundle]},
        },
        a.out,
    )


if __name__ == "__main__":
    main()
