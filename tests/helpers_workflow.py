"""The stage sections of a cohort config small enough for end-to-end runs in tests (64 px tiles at
1 µm/px, ViT-Tiny at 32 px, one epoch)."""

from __future__ import annotations

from typing import Any


def tiny_stages(threads: dict[str, int] | None = None, **pretrain: Any) -> dict[str, Any]:
    """Config sections tiling ... extract; `threads` per stage (tile, segment, pretrain, extract; 1 by
    default), `pretrain` overrides of the pretraining section."""
    t = {"tile": 1, "segment": 1, "pretrain": 1, "extract": 1, **(threads or {})}
    return {
        "tiling": {"mpp": 1.0, "tile_px": 64, "threads": t["tile"]},
        "segmentation": {"threads": t["segment"]},
        "phenotypes": {"k": 2, "sample": 5000},
        "pretrain": {
            "arch": "vit_tiny_patch16_224",
            "img_size": 32,
            "out_dim": 256,
            "dense_out_dim": 128,
            "head_hidden_dim": 128,
            "head_bottleneck_dim": 64,
            "epochs": 1,
            "warmup_epochs": 0,
            "batch_size": 16,
            "num_workers": 0,
            "threads": t["pretrain"],
            **pretrain,
        },
        "attention": {"n_tiles": 8, "n_overlays": 2},
        "extract": {"batch_size": 64, "threads": t["extract"]},
    }
