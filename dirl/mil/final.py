"""What applying a cohort's MIL models to other slides needs (`mil/{source}/{model}/model.json`), and the
final model trained on every labelled slide (`mil.final`: `mil/{source}/{model}/final/model.pt`).

`model.json` is written by every MIL run: the classes, the MIL settings, the feature source's encoder — its
id (with its weights' digest) and the spec `dirl extract` rebuilds it from, absolute paths — the tiles the
features were cut from (µm/px, px), and the epochs each fold chose. The final model trains for the median
of those epochs (the cross-validation's choice, with no held-out slides left to stop it) on all labelled
slides, with the feature standardisation of all of them (inside the checkpoint, as in every fold's).
Deployment (dirl.mil.deploy) and `dirl predict` read only these files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from dirl import store

log = logging.getLogger(__name__)
MODEL_JSON = "model.json"
FINAL = "final"


def tile_geometry(bags: Any, slides: list[str]) -> dict[str, Any]:
    """µm/px and side of the tiles the features came from (the first slide with tiles says)."""
    for s in slides:
        if bags.n_tiles.get(s):
            a = store.read_features(bags.paths[s])[2]
            return {"mpp": float(a["mpp"]), "tile_px": int(a["patch_size"])}
    return {"mpp": None, "tile_px": None}


def chosen_epochs(fold_metrics: list[dict[str, Any]]) -> int:
    """The epoch count the cross-validation chose: the median over folds of the best epoch (1-based)."""
    return max(1, int(np.median([m["best_epoch"] + 1 for m in fold_metrics])))


def write_model_json(
    out: Path,
    *,
    model_name: str,
    source: str,
    classes: list[str],
    cfg: Any,
    encoder: str | None,
    spec: dict | None,
    geometry: dict,
    folds: list[dict],
    final_epochs: int | None,
) -> dict[str, Any]:
    meta = {
        "model": model_name,
        "source": source,
        "classes": classes,
        "settings": asdict(cfg),
        "encoder": encoder,
        "encoder_spec": spec,
        "tiles": geometry,
        "folds": [
            {"fold": m["fold"], "best_epoch": m["best_epoch"], "model": f"fold{m['fold']}/model.pt"} for m in folds
        ],
        "final": {"epochs": final_epochs, "model": f"{FINAL}/model.pt"} if final_epochs else None,
    }
    with store.atomic_path(out / MODEL_JSON) as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def train_final(
    model_name: str,
    bags: Any,
    slides: list[str],
    y: dict[str, int],
    classes: list[str],
    cfg: Any,
    device: Any,
    epochs: int,
    out: Path,
    get: Any,
) -> dict[str, Any]:
    """Train on every labelled slide for `epochs` and save `final/model.pt`; returns its training info."""
    import torch

    from dirl.mil.train import model_options, train_fold

    fixed = replace(cfg, epochs=epochs, min_epochs=epochs, patience=epochs)  # no validation slides: all epochs
    model, info = train_fold(model_name, bags, slides, [], y, len(classes), fixed, device, fold=10_000, get=get)
    ckpt = {
        "model": model_name,
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "options": model_options(cfg),
        "in_dim": bags.dim,
        "classes": classes,
        "fold": FINAL,
        "encoder": bags.encoder,
        "epochs": epochs,
        "n_slides": len(slides),
    }
    with store.atomic_path(out / FINAL / "model.pt") as tmp:
        torch.save(ckpt, tmp)
    log.info(
        "final %s model: %d slides, %d epochs (the folds' median best) in %.1f s",
        model_name,
        len(slides),
        epochs,
        info["seconds"],
    )
    return info


def read_model_json(directory: str | Path) -> dict[str, Any]:
    from dirl.errors import ConfigError

    p = Path(directory) / MODEL_JSON
    if not p.exists():
        raise ConfigError(f"{p} does not exist: {directory} is not a MIL model directory written by `dirl mil`")
    return json.loads(p.read_text())
