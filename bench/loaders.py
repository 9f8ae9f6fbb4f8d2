"""What the data loaders deliver per CPU core, the model replaced by nothing (prints JSON).

    python bench/loaders.py [--small] [--img 224] [--tiles 1024] [--out FILE]

A GPU is only as fast as the loaders that feed it: on a node with 16 cores and one GPU, pretraining at
1,500 images/s needs ~100 images/s from each core, extraction at 8,000 tiles/s ~500 tiles/s per core.
Measured here on one core (one process, one torch thread, the DataLoader's batching included), over a
synthetic H&E tile store (zstd, as the tile stage writes it) with a prior map per tile:

- pretrain_dino:      two global views (crop, flips, rotation, colour and HED jitter, blur) per image
- pretrain_dirl:      the same plus the prior maps' token occupancy and the crops' overlap masks
- pretrain_multicrop: DiRL's views plus 8 local crops of 96 px (DINO's cluster-scale recipe)
- extract:            shard-aligned blocks decoded from the store, to normalised float tensors
- decode:             the store read alone (the floor of `extract`)
Goals (per core): pretraining >= 100 images/s, extraction >= 500 tiles/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from emit import emit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from extract import make_store  # noqa: E402  (bench/extract.py)

GOALS = {"pretrain_images_per_s_per_core": 100.0, "extract_tiles_per_s_per_core": 500.0}


def make_priors(tiles_path: Path, out: Path, n_classes: int = 6) -> None:
    """A prior map per tile: glass, tissue and cell classes in blobs (the loader's cost does not depend
    on where the classes lie, only on the map's size)."""
    from dirl import store

    ts = store.open_tiles(tiles_path)
    rng = np.random.default_rng(0)
    t = ts.tile_px
    yy, xx = np.mgrid[:t, :t]
    with store.map_store_writer(
        out, "priors", n=len(ts), tile_px=t, dtype="uint8", attrs={"slide_id": ts.slide_id, "n_classes": n_classes}
    ) as (_, arr):
        for a in range(0, len(ts), store.SHARD_TILES):
            b = min(len(ts), a + store.SHARD_TILES)
            block = np.ones((b - a, t, t), np.uint8)
            for i in range(b - a):
                for _ in range(40):
                    cx, cy, r = rng.uniform(0, t), rng.uniform(0, t), rng.uniform(3, 8)
                    block[i][(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(2, n_classes)
                block[i][: t // 8] = 0
            arr[a:b] = block


def time_pretrain_loader(
    tiles: Path, priors: Path | None, img: int, local: int, batch: int, seconds: float
) -> dict[str, float]:
    import torch

    from dirl.ssl.data import CohortDataset, EpochBatchSampler, ViewConfig

    views = ViewConfig(global_size=img, global_scale=(0.14, 1.0), local_number=local, local_size=96, color_jitter=0.5)
    ds = CohortDataset([tiles], [priors] if priors else None, 6 if priors else None, 16, views)
    sampler = EpochBatchSampler(len(ds), batch)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=0)
    n, t0, epoch = 0, time.perf_counter(), 0
    next(iter(loader))  # first batch: store opening, imports (worker start-up, not throughput)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sampler.set_epoch(epoch)
        for b in loader:
            n += len(b["global"])
            if time.perf_counter() - t0 >= seconds:
                break
        epoch += 1
    return {"images": n, "seconds": time.perf_counter() - t0, "images_per_s": n / (time.perf_counter() - t0)}


def time_extract_loader(tiles: Path, batch: int, seconds: float, preprocess: bool) -> dict[str, float]:
    import torch

    from dirl import store
    from dirl.extract import Preprocess, _loader

    ts = store.open_tiles(tiles)

    class Enc:  # what Preprocess needs of an encoder
        img_size = ts.tile_px
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    pre = Preprocess(Enc(), torch.device("cpu"), channels_last=False)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _, x in _loader(tiles, len(ts), batch, 0, pin=False):
            if preprocess:
                pre(x)
            n += len(x)
            if time.perf_counter() - t0 >= seconds:
                break
    dt = time.perf_counter() - t0
    return {"tiles": n, "seconds": dt, "tiles_per_s": n / dt}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--img", type=int, default=224, help="tile and global crop side")
    ap.add_argument("--tiles", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    ap.add_argument("--small", action="store_true", help="quick: 256 tiles, 5 s per measurement")
    ap.add_argument("--workdir")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.small:
        a.tiles, a.seconds = 256, 5.0
    import torch

    torch.set_num_threads(1)  # one core
    work = Path(a.workdir or tempfile.mkdtemp(prefix="dirl-bench-loaders-"))
    tiles = work / f"loaders_{a.tiles}_{a.img}.zarr"
    priors = work / f"loaders_{a.tiles}_{a.img}_priors.zarr"
    if not tiles.exists():
        make_store(tiles, a.tiles, a.img, "zstd")
    if not priors.exists():
        make_priors(tiles, priors)
    res = {
        "pretrain_dino": time_pretrain_loader(tiles, None, a.img, 0, 32, a.seconds),
        "pretrain_dirl": time_pretrain_loader(tiles, priors, a.img, 0, 32, a.seconds),
        "pretrain_multicrop": time_pretrain_loader(tiles, priors, a.img, 8, 32, a.seconds),
        "extract": time_extract_loader(tiles, a.batch, a.seconds, preprocess=True),
        "decode": time_extract_loader(tiles, a.batch, a.seconds, preprocess=False),
    }
    out = {
        "stage": "loaders",
        "img": a.img,
        "tiles": a.tiles,
        "torch_threads": torch.get_num_threads(),
        "cpus": len(os.sched_getaffinity(0)),
        **res,
        "pretrain_images_per_s_per_core": res["pretrain_dirl"]["images_per_s"],
        "pretrain_multicrop_images_per_s_per_core": res["pretrain_multicrop"]["images_per_s"],
        "extract_tiles_per_s_per_core": res["extract"]["tiles_per_s"],
        "extract_over_decode": res["extract"]["tiles_per_s"] / res["decode"]["tiles_per_s"],
        "goals": GOALS,
    }
    emit(out, a.out)


if __name__ == "__main__":
    main()
