"""Benchmark of `dirl mil` training: bags/s of ABMIL and TransMIL against the mean-pooling baseline,
same bags, same run. Prints JSON.

    python bench/mil.py [--small] [--bags 64] [--dim 384] [--out FILE]

Bags are random features of whole-slide sizes (log-normal tile counts, median `--median-tiles`), held
on the device as `dirl mil` does when they fit; one bag per step, class-weighted cross-entropy, AdamW,
the training loop of dirl.mil.train (train_fold), timed over whole epochs after a warm-up epoch.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
from emit import emit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bags", type=int, default=64)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--median-tiles", type=int, default=4000)
    ap.add_argument("--max-tiles", type=int, default=30000)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    ap.add_argument("--models", default="meanpool,abmil,transmil")
    ap.add_argument("--transmil-attention", default="exact", choices=["exact", "nystrom"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="16 bags of ~500 tiles, D=192: a quick CPU check")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.small:
        a.bags, a.dim, a.median_tiles, a.max_tiles, a.epochs = 16, 192, 500, 2000, 3

    import torch

    from dirl.mil.data import Bags
    from dirl.mil.train import MilSettings, _DeviceBags, train_fold
    from dirl.runtime import resolve_device

    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    rng = np.random.default_rng(0)
    sizes = np.clip(rng.lognormal(np.log(a.median_tiles), 0.7, a.bags).astype(int), 16, a.max_tiles)
    cache = {f"b{i:03d}": rng.normal(size=(n, a.dim)).astype(np.float32) for i, n in enumerate(sizes)}
    y = {s: i % 2 for i, s in enumerate(cache)}
    bags = Bags(paths={}, n_tiles={s: len(x) for s, x in cache.items()}, dim=a.dim, encoder="random", _cache=cache)
    ids = sorted(cache)
    get = _DeviceBags(bags, ids, device, cache_gb=8.0)
    tiles = int(sizes.sum())
    res = {
        "bench": "mil",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "bags": a.bags,
        "dim": a.dim,
        "tiles": tiles,
        "tiles_per_bag": {"median": int(np.median(sizes)), "max": int(sizes.max())},
        "transmil_attention": a.transmil_attention,
        "models": {},
    }
    for name in a.models.split(","):
        # warm-up epoch, then timed epochs; no validation split: pure training throughput
        warm = MilSettings(epochs=1, seed=0, standardize=False, transmil_attention=a.transmil_attention)
        train_fold(name, bags, ids, [], y, 2, warm, device, get=get)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        _, info = train_fold(
            name,
            bags,
            ids,
            [],
            y,
            2,
            MilSettings(
                epochs=a.epochs, min_epochs=a.epochs, seed=0, standardize=False, transmil_attention=a.transmil_attention
            ),
            device,
            get=get,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        entry = {
            "bags_per_s": round(a.bags * a.epochs / dt, 2),
            "tiles_per_s": round(tiles * a.epochs / dt),
            "seconds": round(dt, 3),
        }
        if device.type == "cuda":
            entry["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        res["models"][name] = entry
    base = res["models"].get("meanpool", {}).get("bags_per_s")
    if base:
        for e in res["models"].values():
            e["vs_meanpool"] = round(e["bags_per_s"] / base, 3)
    emit(res, a.out)


if __name__ == "__main__":
    main()
