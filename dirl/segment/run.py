"""`dirl segment`: nuclei of every tile of a slide, tiles store -> cells store.

Reads `tiles/{slide}.zarr` one shard (store.SHARD_TILES tiles) at a time, segments it with the chosen
backend (dirl.segment.base), measures every nucleus (dirl.segment.features) and writes
`cells/{slide}.zarr`: `labels` uint32 (N, T, T) row-aligned with the tiles, and the `cells` table.
The next shard is read while the current one is segmented; memory is one or two shards whatever the
slide size. The store is written atomically (a temporary sibling renamed at the end).
"""
from __future__ import annotations

import argparse
import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dirl.segment import base, features

log = logging.getLogger(__name__)


def _blocks(tiles: Any, step: int, pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
    """Shards of the tile store in order, the next one read in the background."""
    n = len(tiles)
    starts = list(range(0, n, step))
    if not starts:
        return
    nxt = pool.submit(tiles.read, 0, min(n, step))
    for i in range(len(starts)):
        block = nxt.result()
        if i + 1 < len(starts):
            s2 = starts[i + 1]
            nxt = pool.submit(tiles.read, s2, min(n, s2 + step))
        yield block


def segment_store(tiles_path: str | Path, out: str | Path, backend: base.Backend, *,
                  threads: int = 2, block: int | None = None) -> dict[str, Any]:
    """Segment every tile of `tiles_path` into the cells store `out`. Returns a summary."""
    from tqdm import tqdm

    from dirl import store

    t0 = time.perf_counter()
    tiles = store.open_tiles(tiles_path)
    n, tp, mpp = len(tiles), tiles.tile_px, tiles.mpp
    scale = float(tiles.attrs["tile_px_level0"]) / tp if n else 1.0  # a failed slide's store has none
    step = block or store.SHARD_TILES
    attrs = {**backend.describe(), "slide_id": tiles.slide_id, "mpp": mpp, "tile_px": tp,
             "tiles": str(Path(tiles_path)), "tile_px_level0": tiles.attrs["tile_px_level0"],
             **({"failed": tiles.failed} if tiles.failed else {})}
    n_nuc = 0
    oom = getattr(backend, "net_batch", None)   # dirl.oom.HalvingBatch of GPU backends: name the slide
    if oom is not None:
        oom.slide = tiles.slide_id
    with store.map_store_writer(out, "labels", n=n, tile_px=tp, dtype="uint32", attrs=attrs) as (root, arr), \
            ThreadPoolExecutor(max(1, threads)) as pool, \
            ThreadPoolExecutor(1) as reader, \
            tqdm(total=n, unit="tile", desc=f"segment {tiles.slide_id}", disable=None, mininterval=2) as bar:
        table = features.TableWriter(root, {"mpp": mpp, "units": {"x": "level-0 px", "y": "level-0 px",
                                                                  "area_um2": "µm²"}})
        start = 0
        for labels, images in _zip_stream(backend, _blocks(tiles, step, reader), mpp):
            m = len(labels)
            arr[start:start + m] = labels

            def feats(i: int, start: int = start, labels: np.ndarray = labels,
                      images: np.ndarray = images) -> Mapping[str, np.ndarray]:
                x0, y0 = tiles.coords[start + i]
                return features.tile_features(images[i], labels[i], mpp, tile=start + i,
                                              origin=(float(x0), float(y0)), scale=scale)

            parts = list(pool.map(feats, range(m)))
            cols = features.concat(parts)
            table.append(cols)
            n_nuc += len(cols["tile"])
            start += m
            bar.update(m)
        if start != n:
            raise RuntimeError(f"backend returned {start} label tiles for {n} tiles")
        table.close()
        root.attrs.update({"n_nuclei": n_nuc})
    dt = time.perf_counter() - t0
    log.info("slide %r: %d nuclei in %d tiles (%s) in %.1f s (%.1f tiles/s)", tiles.slide_id, n_nuc, n,
             backend.name, dt, n / max(dt, 1e-9))
    return {"tiles": n, "nuclei": n_nuc, "seconds": dt}


class _Tee:
    """Remember the image blocks a backend consumes, to pair them with the label blocks it yields
    (in the same order; a pipelining backend runs ahead by a block or two)."""

    def __init__(self, it: Iterator[np.ndarray]):
        self.it, self.seen = it, deque()

    def __iter__(self) -> Iterator[np.ndarray]:
        for b in self.it:
            self.seen.append(b)
            yield b


def _zip_stream(backend: base.Backend, blocks: Iterator[np.ndarray], mpp: float
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    tee = _Tee(blocks)
    for labels in backend.stream(iter(tee), mpp):
        images = tee.seen.popleft()
        if len(images) != len(labels):
            raise RuntimeError("backend returned a block of a different size")
        yield labels, images


# --------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from dirl.segment.cellpose_backend import CellposeParams
    from dirl.segment.watershed import WatershedParams

    w, c = WatershedParams(), CellposeParams()
    p.add_argument("tiles", help="tile store, results/<cohort>/tiles/{slide}.zarr")
    p.add_argument("out", help="cells store to write, results/<cohort>/cells/{slide}.zarr")
    p.add_argument("--backend", default="watershed",
                   help=f"{' | '.join(base.BACKENDS)} | package.module:Class (default watershed)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (tiles, features, mask post-processing)")
    p.add_argument("--diameter-um", type=float, default=w.diameter_um,
                   help="typical nucleus diameter, µm (cellpose: 0 = no rescaling)")
    p.add_argument("--min-area-um2", type=float, default=w.min_area_um2)
    p.add_argument("--max-area-um2", type=float, default=w.max_area_um2)
    g = p.add_argument_group("cellpose")
    g.add_argument("--model", default=c.model, help="Cellpose model name (e.g. cpsam) or path to weights")
    g.add_argument("--gpu", default=c.gpu, type=str.lower, choices=["auto", "true", "false"])
    g.add_argument("--batch-size", type=int, default=c.batch_size, help="256-px network patches per forward")
    g.add_argument("--flow-threshold", type=float, default=c.flow_threshold)
    g.add_argument("--cellprob-threshold", type=float, default=c.cellprob_threshold)
    g.add_argument("--precision", default=c.precision, choices=["auto", "bf16", "fp32"],
                   help="network precision (auto: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--masks-device", default=c.masks_device, choices=["auto", "cpu"],
                   help="where Cellpose's flow dynamics run (auto: with the network)")
    g.add_argument("--net-tiles", type=int, default=c.net_tiles,
                   help="tiles per network call; masks of one call overlap the next call")
    g.add_argument("--download", type=_bool, default=c.download,
                   help="download missing Cellpose weights (true) or fail saying where to put them (false)")
    g.add_argument("--no-download", dest="download", action="store_false", help="same as --download false")
    g = p.add_argument_group("watershed")
    g.add_argument("--background-um", type=float, default=w.background_um)
    g.add_argument("--sigma-um", type=float, default=w.sigma_um)
    g.add_argument("--threshold", type=_auto_float, default=None,
                   help="fixed hematoxylin OD threshold, or auto (per-tile Otsu in [min, max])")
    g.add_argument("--threshold-min", type=float, default=w.threshold_min)
    g.add_argument("--threshold-max", type=float, default=w.threshold_max)
    g.add_argument("--split-h-um", type=float, default=w.split_h_um)
    g.add_argument("--split-sigma-um", type=float, default=w.split_sigma_um)
    g.add_argument("--split-intensity", type=float, default=w.split_intensity)
    g.add_argument("--min-solidity", type=float, default=w.min_solidity)


def _bool(v: str) -> bool:
    s = str(v).lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def _auto_float(v: str) -> float | None:
    return None if str(v).lower() in ("auto", "none", "null", "") else float(v)


def options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("tiles", "out", "backend", "verbose")}


def main(args: argparse.Namespace) -> None:
    with base.create(args.backend, options(args)) as backend:
        segment_store(args.tiles, args.out, backend, threads=args.threads)
