"""Warm start (`pretrain.init`): the weights pretraining starts from instead of a random initialisation.

Accepted, all local (nothing is downloaded):
* a previous run: its directory or `backbone.pt` (with `backbone.json`, whose `arch` must match);
* a timm / Hugging Face-style folder (`config.json` with `architecture`, weights in `*.safetensors` or
  `pytorch_model.bin`), or a weights file (`.pth`, `.pt`, `.bin`, `.safetensors`; state dicts nested under
  `state_dict` / `model` unwrapped) — timm ViT key names;
* a facebookresearch/dino checkpoint (`{"student": ..., "teacher": ...}`, keys under `module.` and
  `backbone.` / `head.`): the teacher's weights, DINO's better model.
Student and teacher both start from the backbone. The DINO heads start from the file too when it holds
heads of the same shapes (a DINO checkpoint; its weight-normed last layer's direction `weight_v`),
fresh otherwise. Keys must match exactly — a missing or unexpected key, or any shape but the position
embedding's (resampled to the crop size, as DINO interpolates it), is one error naming the file, the keys
and the architecture. The source and the file's digest go into `backbone.json`, the checkpoint and the log.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dirl.errors import ConfigError

log = logging.getLogger(__name__)
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass
class Init:
    backbone: dict[str, Any]  # timm key -> tensor
    heads: dict[str, dict[str, Any]]  # "head" / "dense_head" -> state dict, when the file holds them
    source: str
    digest: str
    kind: str  # dirl run | timm folder | weights file | dino checkpoint


def resolve(path: str | Path) -> tuple[Path, str]:
    """(the weights file, what kind of source) of `pretrain.init`, or a one-line error."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"pretrain.init {path}: no such file or directory")
    if p.is_dir():
        if (p / "backbone.pt").is_file():
            return p / "backbone.pt", "dirl run"
        for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if (p / name).is_file():
                return p / name, "timm folder"
        raise ConfigError(
            f"pretrain.init {path}: a directory without backbone.pt (a dirl run) or model.safetensors / "
            "pytorch_model.bin (a timm or Hugging Face folder)"
        )
    if p.suffix not in WEIGHT_SUFFIXES:
        raise ConfigError(f"pretrain.init {path}: not a weights file ({', '.join(WEIGHT_SUFFIXES)})")
    return p, "dirl run" if p.name == "backbone.pt" and p.with_suffix(".json").exists() else "weights file"


def _arch_of(weights: Path, kind: str) -> str | None:
    meta = weights.with_suffix(".json") if kind == "dirl run" else weights.parent / "config.json"
    if kind in ("dirl run", "timm folder") and meta.exists():
        d = json.loads(meta.read_text())
        return d.get("arch") or d.get("architecture")
    return None


def _state(weights: Path) -> dict[str, Any]:
    import torch

    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(weights))
    try:
        return torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a pickle of other objects, a damaged file)
        raise ConfigError(f"pretrain.init {weights}: not a torch state dict ({str(e).splitlines()[0][:200]})") from e


def _strip(sd: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    for prefix in prefixes:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def load(path: str | Path, arch: str, model: Any) -> Init:
    """Read `path` for an SSLNet `model` of timm architecture `arch` and check every key and shape."""
    from timm.layers import resample_abs_pos_embed

    from dirl.encoders import file_digest

    weights, kind = resolve(path)
    declared = _arch_of(weights, kind)
    if declared and declared != arch:
        raise ConfigError(
            f"pretrain.init {path} is a {declared} backbone, pretrain.arch is {arch}: use one architecture"
        )
    sd = _state(weights)
    if isinstance(sd, dict) and isinstance(sd.get("teacher"), dict) and isinstance(sd.get("student"), dict):
        kind, sd = "dino checkpoint", sd["teacher"]
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd:
        raise ConfigError(f"pretrain.init {path}: holds no state dict")
    sd = _strip(sd, ("module.",))
    parts: dict[str, dict[str, Any]] = {"backbone": {}, "head": {}, "dense_head": {}}
    for k, v in sd.items():
        top, _, rest = k.partition(".")
        if top == "backbone" or (top in ("head", "dense_head") and rest.startswith(("mlp.", "last_layer."))):
            parts[top][rest] = v
        else:  # plain timm keys (a classifier's `head.weight` among them, dropped below)
            parts["backbone"][k] = v
    backbone = parts["backbone"]
    # a classifier head of ImageNet weights is no part of a backbone built with num_classes=0
    backbone = {k: v for k, v in backbone.items() if not k.startswith(("head.", "fc.", "head_dist."))}
    want = model.backbone.state_dict()
    if "pos_embed" in backbone and "pos_embed" in want and backbone["pos_embed"].shape != want["pos_embed"].shape:
        n_prefix = int(getattr(model.backbone, "num_prefix_tokens", 1))
        grid = model.backbone.patch_embed.grid_size
        backbone["pos_embed"] = resample_abs_pos_embed(backbone["pos_embed"], list(grid), num_prefix_tokens=n_prefix)
    missing, unexpected = sorted(set(want) - set(backbone)), sorted(set(backbone) - set(want))
    shapes = [k for k in set(want) & set(backbone) if tuple(want[k].shape) != tuple(backbone[k].shape)]
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{name} {keys[:4]}{'...' if len(keys) > 4 else ''}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", sorted(shapes)))
            if keys
        )
        raise ConfigError(f"pretrain.init {weights} does not fit a {arch} backbone: {detail}")
    heads = {}
    for name in ("head", "dense_head"):
        part = parts[name]
        target = getattr(model, name, None)
        if not part or target is None:
            continue
        if "last_layer.weight_v" in part:  # DINO's weight-normed last layer: its direction
            part = {
                k.replace("last_layer.weight_v", "last_layer.weight"): v
                for k, v in part.items()
                if k != "last_layer.weight_g"
            }
        ts = target.state_dict()
        if set(part) == set(ts) and all(tuple(part[k].shape) == tuple(ts[k].shape) for k in ts):
            heads[name] = part
        else:
            log.info(
                "pretrain.init %s: its %s does not match this run's (sizes): the %s starts fresh", weights, name, name
            )
    return Init(backbone, heads, str(weights), f"sha256:{file_digest(weights)}", kind)


def apply(init: Init, student: Any, teacher: Any) -> None:
    """Load the backbone (and matching heads) into student and teacher."""
    for net in (student, teacher):
        net.backbone.load_state_dict(init.backbone, strict=True)
        for name, sd in init.heads.items():
            getattr(net, name).load_state_dict(sd, strict=True)
    log.info(
        "warm start from %s (%s, %s): backbone%s",
        init.source,
        init.kind,
        init.digest,
        f" and {' and '.join(init.heads)}" if init.heads else "; heads start fresh",
    )


def describe(init: Init | None) -> dict[str, Any] | None:
    if init is None:
        return None
    return {"source": init.source, "kind": init.kind, "digest": init.digest, "heads": sorted(init.heads)}
