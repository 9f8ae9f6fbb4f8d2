"""Benchmark of the QuPath round trip, same slide, same run. Prints JSON.

- `dirl export` (GeoJSON for QuPath): nuclei/s against the per-nucleus loop people write by hand
  (skimage.measure.find_contours on the whole tile's mask of each nucleus, one json.dump at the end);
- `dirl segment` with backend import, reading that file back: tiles/s against the watershed stage on the
  same tiles (the issue's goal: import at least as fast), each a `dirl segment` process on 1 thread, and
  the import process's peak RSS.

    python bench/export.py [--small] [--side 4096] [--workdir DIR] [--out FILE]

Set-up (not timed): a synthetic slide written by `dirl synth`, tiled, segmented (watershed) and
phenotyped (k = 4) by the real commands.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from emit import emit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def naive_export(tiles_path: Path, cells_path: Path, out: Path) -> int:
    """The hand-written way: every nucleus's contour traced on its tile's full-size mask."""
    from skimage import measure

    from dirl import store

    ts = store.open_tiles(tiles_path)
    scale = ts.attrs["tile_px_level0"] / ts.tile_px
    labels = store.open_map(cells_path, "labels", len(ts))
    tab = store.read_nuclei(cells_path, ["tile", "label"])
    feats = []
    for t, lab in zip(tab["tile"].tolist(), tab["label"].tolist()):
        mask = np.asarray(labels[t]) == lab
        c = max(measure.find_contours(np.pad(mask, 1).astype(float), 0.5), key=len) - 1
        x0, y0 = ts.coords[t]
        ring = [[float(x0 + (x + 0.5) * scale), float(y0 + (y + 0.5) * scale)] for y, x in c]
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}})
    out.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return len(feats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=4096, help="synthetic slide side, level-0 px at 0.5 µm/px")
    ap.add_argument("--small", action="store_true", help="a 2048 px slide")
    ap.add_argument("--workdir")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.small:
        a.side = 2048
    from dirl.cli import main as cli
    from dirl.export import export_slide

    work = Path(a.workdir or tempfile.mkdtemp(prefix="dirl-bench-export-"))
    slide, tiles, cells, model = (work / f"s{a.side}.{x}" for x in ("svs", "tiles.zarr", "cells.zarr", "json"))
    if not cells.exists():
        size = ["--width", str(a.side), "--height", str(a.side), "--mpp", "0.5", "--seed", "1"]
        assert cli(["synth", str(slide), *size]) == 0
        assert cli(["tile", str(slide), str(tiles)]) == 0
        assert cli(["segment", str(tiles), str(cells), "--threads", "2"]) == 0
        assert cli(["phenotype", str(cells), "--out", str(model)]) == 0
    t0 = time.perf_counter()
    counts = export_slide(tiles, work / "dirl.geojson", cells, model)
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_naive = naive_export(tiles, cells, work / "naive.geojson")
    dt_naive = time.perf_counter() - t0
    nuclei = counts["nuclei"]
    seg = [sys.executable, "-m", "dirl.cli", "segment", str(tiles), "--threads", "1"]
    t0 = time.perf_counter()
    subprocess.run(
        [
            *seg,
            str(work / "imported.zarr"),
            "--settings",
            '{"backend": "import"}',
            "--nuclei",
            str(work / "dirl.geojson"),
        ],
        check=True,
        capture_output=True,
    )
    dt_import = time.perf_counter() - t0
    import_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    t0 = time.perf_counter()
    subprocess.run([*seg, str(work / "watershed.zarr")], check=True, capture_output=True)
    dt_ws = time.perf_counter() - t0
    emit(
        {
            "bench": "export",
            "side_px": a.side,
            "tiles": counts["tiles"],
            "nuclei": nuclei,
            "dirl_nuclei_per_s": nuclei / dt,
            "naive_nuclei_per_s": n_naive / dt_naive,
            "dirl_over_naive": (nuclei / dt) / (n_naive / dt_naive),
            "geojson_mb": (work / "dirl.geojson").stat().st_size / 2**20,
            "import_tiles_per_s": counts["tiles"] / dt_import,
            "watershed_tiles_per_s": counts["tiles"] / dt_ws,
            "import_over_watershed": dt_ws / dt_import,
            "import_process_max_rss_mb": import_rss,
            "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
        a.out,
    )


if __name__ == "__main__":
    main()
