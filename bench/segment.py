#!/usr/bin/env python
"""Segmentation throughput: each backend against its own per-tile unbatched call, in the same run.

    python bench/segment.py [--small] [--threads N] [--cellpose-tiles N] [--out result.json]

- watershed: tiles/s of `WatershedBackend.segment` on blocks of tiles with a thread pool, against the
  same code called one tile at a time on one thread; plus the whole `dirl segment` stage (read,
  segment, per-nucleus table, write) on a tile store.
- unet: tiles/s of the unet backend (its network alone beside) against the watershed on the same tiles,
  and its whole stage; the ratio is what choosing it costs on this CPU.
- cellpose: a randomly initialised Cellpose-SAM network (no weights are downloaded), on the GPU in
  bf16 when there is one, else fp32 on the CPU with a handful of tiles: the pipelined backend
  (`stream`: batched network, masks in a thread pool overlapping the next batch) against
  `CellposeModel.eval` per tile, and against `eval` on the stacked batch (batched network, serial
  masks). A random network's cell probability is arbitrary, so `cellprob_threshold` is set at the
  quantile that makes ~25 % of pixels foreground (about a nucleus-dense H&E tile) to give the flow
  dynamics a realistic amount of work; the masks themselves mean nothing.
Prints one JSON object (and writes it with --out). Synthetic tiles come from dirl.synth.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from emit import emit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_tiles(n: int, tile_px: int, mpp: float = 0.5, seed: int = 0) -> np.ndarray:
    from dirl import synth

    side = int(np.ceil(np.sqrt(n)))
    pops = (synth.POPULATIONS["lymphocyte"], synth.POPULATIONS["tumour"])
    rgb, _, _ = synth.render(0, 0, side * tile_px, side * tile_px, mpp=mpp, populations=pops, seed=seed, tissue="full")
    t = rgb.reshape(side, tile_px, side, tile_px, 3).transpose(0, 2, 1, 3, 4).reshape(-1, tile_px, tile_px, 3)
    return np.ascontiguousarray(t[:n])


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_watershed(tiles: np.ndarray, threads: int, mpp: float) -> dict:
    from dirl.segment.watershed import WatershedBackend, WatershedParams

    n = len(tiles)
    with WatershedBackend(WatershedParams(threads=1)) as one:
        one.segment(tiles[:2], mpp)  # warm-up (imports, caches)
        t_seq = timed(lambda: [one.segment(tiles[i : i + 1], mpp) for i in range(n)])
        ref = one.segment(tiles, mpp)
    res = {"tiles": n, "tile_px": int(tiles.shape[1]), "per_tile_sequential_tiles_per_s": n / t_seq}
    for th in sorted({2, threads} if threads > 1 else {1}):
        with WatershedBackend(WatershedParams(threads=th)) as b:
            b.segment(tiles[:th], mpp)
            t = timed(lambda: b.segment(tiles, mpp))
            assert np.array_equal(b.segment(tiles, mpp), ref), "threaded result differs"
        res[f"batched_threads{th}_tiles_per_s"] = n / t
        res[f"speedup_threads{th}"] = t_seq / t
    res["nuclei_per_tile"] = float(np.mean([x.max() for x in ref]))
    return res


def bench_unet(tiles: np.ndarray, threads: int, mpp: float) -> dict:
    """The unet backend (network + outlines) against the watershed on the same tiles, same run."""
    from dirl.segment import base

    n = len(tiles)
    res: dict = {"tiles": n}
    for name in ("watershed", "unet"):
        with base.create(name, {"threads": threads}) as b:
            b.segment(tiles[:threads], mpp)  # warm-up
            res[f"{name}_tiles_per_s"] = n / timed(lambda b=b: b.segment(tiles, mpp))
            if name == "unet":  # where its time goes: the network alone
                res["unet_network_tiles_per_s"] = n / timed(lambda b=b: unet_maps(b, tiles))
    res["unet_vs_watershed_time"] = res["watershed_tiles_per_s"] / res["unet_tiles_per_s"]
    return res


def unet_maps(backend, tiles: np.ndarray) -> np.ndarray:
    from dirl.segment import unet

    return unet.centre_maps(backend.net, tiles)


def bench_stage(tiles: np.ndarray, threads: int, mpp: float, backend: str = "watershed") -> dict:
    """The whole `dirl segment` stage on a tile store (read + segment + table + atomic write)."""
    from dirl import store
    from dirl.segment import base
    from dirl.segment.run import segment_store

    with tempfile.TemporaryDirectory() as d:
        tp = tiles.shape[1]
        n = len(tiles)
        attrs = store.TileAttrs.without_slide("bench", tp, mpp=mpp)
        coords = np.stack([np.arange(n) * tp, np.zeros(n)], 1).astype(np.int64)
        with store.tile_store_writer(
            Path(d) / "t.zarr", coords=coords, tissue=np.ones(n), tile_px=tp, attrs=attrs
        ) as w:
            for s in range(0, n, w.shard):
                w.write(s, tiles[s : s + w.shard])
        out = {}
        with base.create(backend, {"threads": 1}) as b:  # warm-up: first imports and codecs
            segment_store(Path(d) / "t.zarr", Path(d) / "warm.zarr", b, threads=1)
        for th in sorted({1, threads}):
            with base.create(backend, {"threads": th}) as b:
                t = time.perf_counter()
                r = segment_store(Path(d) / "t.zarr", Path(d) / f"c{th}.zarr", b, threads=th)
                out[f"stage_threads{th}_tiles_per_s"] = n / (time.perf_counter() - t)
        out["nuclei"] = r["nuclei"]
        return out


def bench_cellpose(n: int, tile_px: int, mpp: float, threads: int, diameter_um: float) -> dict:
    import torch
    from cellpose import models
    from cellpose.vit import CPSAM

    from dirl.segment.cellpose_backend import CellposeBackend, CellposeParams, diameter_px

    gpu = torch.cuda.is_available()
    tiles = synthetic_tiles(n, tile_px, mpp, seed=1)
    res: dict = {
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "tiles": n,
        "tile_px": tile_px,
        "diameter_um": diameter_um,
        "dtype": "bfloat16" if gpu else "float32",
    }
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        w = Path(d) / "cpsam_random.pt"
        torch.save(CPSAM(dtype=torch.float32).state_dict(), w)
        p = CellposeParams(
            model=str(w),
            gpu="auto",
            precision="auto",
            diameter_um=diameter_um,
            threads=threads,
            batch_size=32 if gpu else 4,
            net_tiles=64 if gpu else max(1, n // 2),
        )
        with CellposeBackend(p) as b:
            # calibrate cellprob_threshold so ~25 % of pixels are foreground
            _, prob = b.network(tiles[: min(n, 8)], mpp)
            thr = float(np.quantile(prob, 0.75))
            p = CellposeParams(**{**p.__dict__, "cellprob_threshold": thr})
            b.params = p
            res["cellprob_threshold"] = thr
            if gpu:
                torch.cuda.synchronize()
            t_net = timed(lambda: b.network(tiles, mpp))
            dP, prob = b.network(tiles, mpp)
            t_masks = timed(lambda: [b.masks(dP[:, i], prob[i], mpp) for i in range(n)])
            res["network_only_tiles_per_s"] = n / t_net
            res["masks_only_serial_tiles_per_s"] = n / t_masks
            blocks = [tiles[s : s + max(1, n // 2)] for s in range(0, n, max(1, n // 2))]
            t_pipe = timed(lambda: list(b.stream(iter(blocks), mpp)))
            res["pipelined_tiles_per_s"] = n / t_pipe
            cp: models.CellposeModel = b.cp
            dpx = diameter_px(diameter_um, mpp)
            kw = dict(diameter=dpx, flow_threshold=p.flow_threshold, cellprob_threshold=thr, batch_size=p.batch_size)
            t_one = timed(lambda: [cp.eval(tiles[i], **kw) for i in range(n)])
            res["eval_per_tile_tiles_per_s"] = n / t_one
            t_stack = timed(lambda: cp.eval(tiles, **kw))
            res["eval_stacked_tiles_per_s"] = n / t_stack
            res["speedup_vs_eval_per_tile"] = t_one / t_pipe
            res["speedup_vs_eval_stacked"] = t_stack / t_pipe
            if gpu:
                res["gpu_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a quick run (CI-sized)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--tile-px", type=int, default=224)
    ap.add_argument("--cellpose-tiles", type=int, default=None)
    ap.add_argument(
        "--cellpose-diameter-um",
        type=float,
        default=None,
        help="default 8 on GPU; 15 on CPU (30 px at 0.5 µm/px: one network patch per tile)",
    )
    ap.add_argument("--no-cellpose", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    mpp = 0.5
    n = 128 if a.small else 256  # fewer tiles and a stage's per-slide set-up would dominate its rate
    tiles = synthetic_tiles(n, a.tile_px, mpp)
    result: dict = {
        "bench": "segment",
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "threads": a.threads,
        "python": platform.python_version(),
    }
    result["watershed"] = bench_watershed(tiles, a.threads, mpp)
    result["watershed_stage"] = bench_stage(tiles, a.threads, mpp)
    result["peak_rss_mb_after_watershed"] = rss_mb()
    result["unet"] = bench_unet(tiles, a.threads, mpp)
    result["unet_stage"] = bench_stage(tiles, a.threads, mpp, "unet")
    if not a.no_cellpose:
        try:
            import torch

            gpu = torch.cuda.is_available()
            nc = a.cellpose_tiles or ((256 if not a.small else 64) if gpu else 2)
            diam = a.cellpose_diameter_um or (8.0 if gpu else 15.0)
            result["cellpose"] = bench_cellpose(nc, a.tile_px, mpp, a.threads, diam)
        except ImportError as e:
            result["cellpose"] = {"skipped": str(e)}
    result["peak_rss_mb"] = rss_mb()
    emit(result, a.out)


if __name__ == "__main__":
    main()
