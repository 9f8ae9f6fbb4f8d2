"""Random tiny ViTs saved the way `dirl pretrain` saves backbones, for extraction and MIL tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def write_backbone(
    folder: Path,
    img: int = 64,
    embed: str = "mean",
    method: str = "dirl",
    seed: int = 0,
    mean: Sequence[float] = IMAGENET[0],
    std: Sequence[float] = IMAGENET[1],
) -> Path:
    """A backbone.pt + backbone.json pair holding a randomly initialised vit_tiny."""
    import timm
    import torch

    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=img, dynamic_img_size=True)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(m.state_dict(), folder / "backbone.pt")
    (folder / "backbone.json").write_text(
        json.dumps(
            {
                "arch": "vit_tiny_patch16_224",
                "img_size": img,
                "embed": embed,
                "mean": list(mean),
                "std": list(std),
                "method": method,
            }
        )
    )
    return folder
