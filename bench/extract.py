"""Benchmark of `dirl extract` against the backbone's bare forward pass, in one run. Prints JSON.

    python bench/extract.py [--small] [--arch vit_small_patch16_224] [--tiles 4096] [--out FILE]

- extract: the whole pipeline on one slide's tile store: DataLoader workers reading shard-aligned
           blocks of the Zarr store, uint8 to the device, resize/normalise there, model, features to
           an HDF5 file written atomically (worker start-up and file I/O included)
- bare:    the same model, batch size, precision and embedding on normalised tensors already in
           device memory (the floor: no I/O, no conversion, no output)
- read:    the DataLoader alone (tiles/s the store can deliver with the same workers)
Goal: extract >= 90 % of bare. Same process, same run; the tile store is synthetic H&E from
dirl.synth (64 rendered tiles, flipped/rotated to fill the slide so compression is realistic).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from emit import add_run_arguments, emit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_store(path: Path, n: int, tile_px: int, codec: str) -> None:
    from dirl import store, synth

    side = 8
    pops = (synth.POPULATIONS["lymphocyte"], synth.POPULATIONS["tumour"])
    rgb, _, _ = synth.render(0, 0, side * tile_px, side * tile_px, mpp=0.5, populations=pops, seed=0, tissue="full")
    base = rgb.reshape(side, tile_px, side, tile_px, 3).transpose(0, 2, 1, 3, 4).reshape(-1, tile_px, tile_px, 3)
    grid = int(np.ceil(np.sqrt(n)))
    coords = np.array([(x * tile_px, y * tile_px) for y in range(grid) for x in range(grid)][:n], np.int64)
    attrs = store.TileAttrs.without_slide(path.stem, tile_px, width=grid * tile_px, height=grid * tile_px)
    with store.tile_store_writer(
        path, coords=coords, tissue=np.ones(n), tile_px=tile_px, attrs=attrs, codec=codec
    ) as w:
        step = w.shard
        for a in range(0, n, step):
            k = np.arange(a, min(n, a + step))
            block = np.stack([np.rot90(base[i % len(base)], (i // len(base)) % 4) for i in k])
            flip = (k // (4 * len(base))) % 2 == 1
            block[flip] = block[flip][:, :, ::-1]
            w.write(a, np.ascontiguousarray(block))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit_small_patch16_224")
    ap.add_argument("--img", type=int, default=224, help="model input side = tile side")
    ap.add_argument("--tiles", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=0, help="0: dirl extract's default for the device")
    ap.add_argument("--workers", type=int, default=-1, help="-1: dirl extract's default")
    ap.add_argument("--embed", default="cls")
    ap.add_argument("--codec", default="zstd", choices=["zstd", "jpeg"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats of each; the best is kept")
    add_run_arguments(ap, "ViT-Tiny, 512 tiles")
    a = ap.parse_args()
    if a.small:
        a.arch, a.tiles = "vit_tiny_patch16_224", 512

    import torch

    from dirl import store
    from dirl.encoders import load_timm
    from dirl.extract import Preprocess, _default_batch_size, _loader, default_workers, extract_slide, prepare_model
    from dirl.runtime import resolve_device

    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="dirl-bench-extract-"))
    tiles_path = work / f"bench_{a.tiles}_{a.img}_{a.codec}.zarr"
    t0 = time.perf_counter()
    if not tiles_path.exists():
        make_store(tiles_path, a.tiles, a.img, a.codec)
    t_store = time.perf_counter() - t0
    tiles = store.open_tiles(tiles_path)
    enc = load_timm(a.arch, "random", embed_kind=a.embed, img_size=a.img)
    amp, cl = prepare_model(enc, device, "auto")
    batch = a.batch or _default_batch_size(tiles, device)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = a.workers if a.workers >= 0 else default_workers(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # bare: normalised tensors already on the device, same batch / precision / layout / embedding
    pre = Preprocess(enc, device, cl)
    n = len(tiles)
    resident = [pre(torch.from_numpy(tiles.read(s, min(n, s + batch))).to(device)) for s in range(0, n, batch)]

    def bare() -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            outs = [enc.embed_batch(x) for x in resident]
        sync()
        assert sum(len(o) for o in outs) == n
        return time.perf_counter() - t

    def read() -> float:
        t = time.perf_counter()
        k = sum(len(x) for _, x in _loader(tiles_path, n, batch, workers, pin=device.type == "cuda"))
        assert k == n
        return time.perf_counter() - t

    def pipeline() -> float:
        out = work / "features.h5"
        t = time.perf_counter()
        extract_slide(tiles_path, out, enc, device, batch=batch, workers=workers, amp_dtype=amp, channels_last=cl)
        sync()
        return time.perf_counter() - t

    with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        enc.embed_batch(resident[0])  # warm-up (kernels, allocator)
    sync()
    times = {"bare": [], "extract": [], "read": []}
    for _ in range(a.repeats):  # interleaved, so drifts of a shared machine hit both alike
        times["bare"].append(bare())
        times["extract"].append(pipeline())
        times["read"].append(read())
    best = {k: min(v) for k, v in times.items()}
    x, c, _ = store.read_features(work / "features.h5")
    assert x.shape[0] == n and np.array_equal(c, tiles.coords)
    res = {
        "bench": "extract",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpus": cpus,
        "arch": a.arch,
        "img": a.img,
        "embed": a.embed,
        "precision": str(amp).replace("torch.", "") if amp else "fp32",
        "tiles": n,
        "batch": batch,
        "workers": workers,
        "codec": a.codec,
        "store_mb": round(sum(f.stat().st_size for f in tiles_path.rglob("*") if f.is_file()) / 2**20, 1),
        "bare_tiles_per_s": round(n / best["bare"], 1),
        "extract_tiles_per_s": round(n / best["extract"], 1),
        "read_tiles_per_s": round(n / best["read"], 1),
        "extract_vs_bare": round(best["bare"] / best["extract"], 3),
        "goal_extract_vs_bare": 0.9,
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "store_build_s": round(t_store, 1),
    }
    emit(res, a.out)


if __name__ == "__main__":
    main()
