"""Benchmark of `dirl tile` against a naive per-tile loop and bare reads, in one run. Prints JSON.

    python bench/tile.py [--size 20000] [--small]

- dirl:  `dirl tile` as a subprocess (start-up, tissue detection, reads, compression, QC included),
         and its tile loop alone (reads, resizing, compression, writes; the plan made beforehand)
- naive: one read_region per tile, converted and saved as a PNG file each (how older pipelines work)
- bare:  read_region of the same tiles on the same number of threads, nothing else (the floor), in
         dirl's tile order (column bands) and in the row-major order of a usual per-tile loop
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_child(cmd: list[str]) -> tuple[float, float]:
    """Wall time and peak RSS (MiB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"{cmd} failed: {proc.stderr.read().decode()[-2000:]}")
    return dt, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=None, help="slide side, px (default 20000; 6000 with --small)")
    ap.add_argument("--slide-mpp", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--naive-tiles", type=int, default=None, help="tiles timed for the naive loop")
    ap.add_argument("--small", action="store_true", help="6000 px slide, quick check")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    a.size = a.size or (6000 if a.small else 20000)
    a.naive_tiles = a.naive_tiles or (150 if a.small else 400)

    import openslide
    from PIL import Image

    from dirl import store, synth
    from dirl.slide import Slide
    from dirl.tiling import TileSettings, plan, tile_slide

    work = Path(a.workdir or tempfile.mkdtemp(prefix="dirl-bench-tile-"))
    work.mkdir(parents=True, exist_ok=True)
    slide_path = work / f"synth_{a.size}.svs"
    t0 = time.perf_counter()
    if not slide_path.exists():
        synth.write_slide(slide_path, a.size, a.size, mpp=a.slide_mpp, seed=0)
    synth_s = time.perf_counter() - t0

    s = TileSettings()
    with Slide.open(slide_path) as slide:
        t0 = time.perf_counter()
        g = plan(slide, s)
        plan_s = time.perf_counter() - t0
        # the tile loop alone (reads, resize, compression, writes), in this process
        t0 = time.perf_counter()
        tile_slide(slide, work / "loop.zarr", s, threads=a.threads, grid=g)
        loop_s = time.perf_counter() - t0
    coords = g.coords
    n = len(coords)

    # dirl tile, end to end in its own process
    out = work / "tiles.zarr"
    dirl_s, dirl_rss = run_child(
        [
            sys.executable,
            "-m",
            "dirl.cli",
            "tile",
            str(slide_path),
            str(out),
            "--threads",
            str(a.threads),
            "--qc",
            str(work / "qc.png"),
        ]
    )
    assert len(store.open_tiles(out)) == n

    osr = openslide.OpenSlide(str(slide_path))
    size = (g.read_px, g.read_px)

    # bare reads on the same threads: the floor
    def bare(xy: np.ndarray) -> None:
        osr.read_region((int(xy[0]), int(xy[1])), g.level, size)

    def bare_rate(order: np.ndarray) -> float:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.threads) as pool:
            list(pool.map(bare, order))
        return len(order) / (time.perf_counter() - t0)

    bare_rate_band = bare_rate(coords)
    bare_rate_rows = bare_rate(coords[np.lexsort((coords[:, 0], coords[:, 1]))])

    # naive loop: read, convert, one PNG per tile, one thread
    png_dir = work / "naive_png"
    png_dir.mkdir(exist_ok=True)
    m = min(n, a.naive_tiles)
    t0 = time.perf_counter()
    for x, y in coords[:m]:
        Image.fromarray(np.asarray(osr.read_region((int(x), int(y)), g.level, size))[..., :3]).save(
            png_dir / f"{x}_{y}.png"
        )
    naive_s = time.perf_counter() - t0

    dirl_rate, naive_rate = n / dirl_s, m / naive_s
    print(
        json.dumps(
            {
                "bench": "tile",
                "slide_px": [a.size, a.size],
                "slide_mpp": a.slide_mpp,
                "tiles": n,
                "tile_px": s.tile_px,
                "threads": a.threads,
                "codec": s.codec,
                "dirl_tiles_per_s": round(dirl_rate, 1),
                "dirl_peak_rss_mib": round(dirl_rss, 1),
                "dirl_loop_tiles_per_s": round(n / loop_s, 1),
                "tissue_plan_s": round(plan_s, 2),
                "dirl_process_s": round(dirl_s, 2),
                "loop_over_bare": round(n / loop_s / bare_rate_band, 3),
                "bare_read_tiles_per_s": round(bare_rate_band, 1),
                "naive_png_tiles_per_s": round(naive_rate, 1),
                "bare_read_row_major_tiles_per_s": round(bare_rate_rows, 1),
                "dirl_over_naive": round(dirl_rate / naive_rate, 2),
                "dirl_over_bare": round(dirl_rate / bare_rate_band, 3),
                "dirl_over_bare_row_major": round(dirl_rate / bare_rate_rows, 3),
                "store_mib": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 1),
                "synth_s": round(synth_s, 1),
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
            }
        )
    )


if __name__ == "__main__":
    main()
