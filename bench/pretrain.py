#!/usr/bin/env python
"""Cost of DiRL's dense term: images/s of a DINO step and a DiRL step with the same model and batch.

    python bench/pretrain.py            # ViT-S/16, 224 px, batch 8 (CPU) / 256 (GPU), out_dim 65536
    python bench/pretrain.py --small    # ViT-Ti/16, 96 px, batch 8: a quick check

Both trainers are the real `dirl.ssl.train.Trainer` (student + EMA teacher, heads, losses, AdamW, EMA
update). The steps are interleaved (DINO, DiRL, DINO, ...) so that drift in machine load hits both;
prints one JSON object with images/s, seconds per step (median), peak memory and `dirl_over_dino_ratio`
(seconds per DiRL step / seconds per DINO step; the goal is <= 1.10). Inputs are synthetic tensors built
once: data loading and the prior-to-token pooling (done in DataLoader workers) are not timed.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emit import emit

from dirl.ssl.losses import token_occupancy  # noqa: E402
from dirl.ssl.settings import PretrainSettings  # noqa: E402
from dirl.ssl.trainer import Trainer  # noqa: E402


def synthetic_batch(
    b: int, size: int, patch: int, n_classes: int, local: int, local_size: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # prior maps: background border, tissue, a few discs of each cell class
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    maps = torch.ones(b * 2, size, size, dtype=torch.uint8)
    maps[:, : size // 8] = 0
    for k in range(2, n_classes):
        for _ in range(3):
            c = torch.rand(b * 2, 2, generator=g) * size
            r = size / 20 * (1 + torch.rand(b * 2, 1, 1, generator=g))
            disc = (yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2 < r**2
            maps[disc] = k
    occ = token_occupancy(maps, n_classes, patch).view(b, 2, -1, n_classes)
    return {
        "global": torch.randn(b, 2, 3, size, size, generator=g),
        "local": torch.randn(b, local, 3, local_size, local_size, generator=g),
        "occupancy": occ,
        "overlap": torch.ones(b, 2, occ.shape[2]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="vit_tiny_patch16_224 at 96 px")
    p.add_argument("--arch")
    p.add_argument("--img-size", type=int)
    p.add_argument("--batch-size", type=int, help="default 8 on CPU, 256 on GPU")
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--dense-out-dim", type=int, default=PretrainSettings.dense_out_dim)
    p.add_argument("--n-classes", type=int, default=6, help="prior classes incl. background, tissue")
    p.add_argument("--local-crops", type=int, default=0)
    p.add_argument("--match", default="all", choices=("all", "overlap"))
    p.add_argument("--steps", type=int, default=5, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(
        "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    )
    arch = a.arch or ("vit_tiny_patch16_224" if a.small else "vit_small_patch16_224")
    size = a.img_size or (96 if a.small else 224)
    bs = a.batch_size or (256 if dev.type == "cuda" else 8)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    common = dict(
        arch=arch,
        img_size=size,
        batch_size=bs,
        out_dim=a.out_dim,
        dense_out_dim=a.dense_out_dim,
        epochs=1,
        warmup_epochs=0,
        freeze_last_layer=0,
        precision=a.precision,
        compile=a.compile,
        local_crops_number=a.local_crops,
        match=a.match,
        device=dev.type,
    )
    trainers = {
        m: Trainer(PretrainSettings(method=m, **common).validate(), a.n_classes, dev, 10**6) for m in ("dino", "dirl")
    }
    patch = trainers["dino"].patch
    batch = synthetic_batch(bs, size, patch, a.n_classes, a.local_crops, 96 if size >= 192 else size // 2)
    if dev.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    times = {m: [] for m in trainers}
    peak = {m: 0 for m in trainers}
    last = {}
    for i in range(a.warmup + a.steps):
        for m, tr in trainers.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            sync()
            t0 = time.perf_counter()
            last[m] = tr.step(batch, i, 0)
            sync()
            dt = time.perf_counter() - t0
            if i >= a.warmup:
                times[m].append(dt)
            if dev.type == "cuda":
                peak[m] = max(peak[m], torch.cuda.max_memory_allocated(dev))
    med = {m: statistics.median(v) for m, v in times.items()}
    res = {
        "benchmark": "pretrain step: DiRL (DINO + dense prior loss) vs DINO baseline",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "arch": arch,
        "img_size": size,
        "batch_size": bs,
        "out_dim": a.out_dim,
        "dense_out_dim": a.dense_out_dim,
        "n_classes": a.n_classes,
        "local_crops": a.local_crops,
        "match": a.match,
        "precision": str(trainers["dino"].amp_dtype).replace("torch.", ""),
        "compile": a.compile,
        "steps": a.steps,
        "warmup": a.warmup,
        "dino": {"s_per_step": med["dino"], "images_per_s": bs / med["dino"], "s_per_step_all": times["dino"]},
        "dirl": {
            "s_per_step": med["dirl"],
            "images_per_s": bs / med["dirl"],
            "s_per_step_all": times["dirl"],
            "dense_pairs_per_image": last["dirl"]["dense_pairs_per_image"],
        },
        "dirl_over_dino_ratio": med["dirl"] / med["dino"],
        "goal": "dirl_over_dino_ratio <= 1.10",
    }
    if dev.type == "cuda":
        res["dino"]["peak_mem_mb"] = peak["dino"] / 2**20
        res["dirl"]["peak_mem_mb"] = peak["dirl"] / 2**20
    else:
        res["process_max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    emit(res, a.out)


if __name__ == "__main__":
    main()
