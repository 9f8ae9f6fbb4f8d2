"""`dirl attention`: how sparse is a pretrained ViT's last-layer self-attention (the paper's evidence).

    dirl attention --backbone dino=results/c/pretrain/dino/backbone.pt \\
                   --backbone dirl=results/c/pretrain/dirl/backbone.pt --untrained \\
                   --tiles results/c/tiles/*.zarr --priors results/c/priors/*.zarr \\
                   --out results/c/analysis/attention.json --overlays results/c/analysis/attention_overlays

For a fixed sample of tiles, the last block's attention over the N patch tokens (the [CLS] query's row
renormalised over patch tokens, or without [CLS] the mean attention each patch receives), per head. The
headline is the mean over heads of each head's normalised entropy H / log N (1 = uniform, 0 = one token):
DINO's heads each attend to a few spots, which the head-averaged map hides, so that map's entropy is
reported beside it, with the Gini coefficient and the share of tokens holding 50 % and 90 % of the mass.
Per prior class: the share of attention falling on the class relative to its share of the area
(enrichment). `--untrained` adds, for each initialisation seed among the backbones, the same architecture
as it was before training (same seed, same weights as the trainer's first step): the reference that
turns "DINO became sparse" into a number. Runs are compared pairwise on the same tiles (paired
differences, Wilcoxon signed-rank); runs named `<method>-s<seed>` are also compared seed by seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dirl.analysis.settings import AttentionSettings
from dirl.errors import DirlError
from dirl.runs import UNTRAINED

log = logging.getLogger("dirl.attention")
METRICS = ("entropy", "gini", "top50_share", "top90_share")
HEADLINE = "head_entropy"  # mean over heads of the per-head normalised entropy


# --------------------------------------------------------------------------------------------------
# attention extraction
def last_layer_attention(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the last block of a timm ViT: (B, heads, T, T) over all tokens (prefix
    tokens first). Fused attention never materialises it, so the input of `blocks[-1].attn` is caught
    with a forward pre-hook and softmax(q k^T * scale) is recomputed from its qkv projection."""
    attn = model.blocks[-1].attn
    for name in ("qkv", "num_heads", "head_dim", "scale"):
        if not hasattr(attn, name):
            raise DirlError(
                f"{type(model).__name__}: last attention block has no {name}; attention "
                "diagnostics support timm VisionTransformer backbones"
            )
    caught: dict[str, torch.Tensor] = {}

    def hook(_module, args, kwargs):
        caught["x"] = args[0] if args else kwargs["x"]

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.forward_features(x)
    finally:
        handle.remove()
    h = caught["x"]
    b, t, _ = h.shape
    qkv = attn.qkv(h).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q.float() * attn.scale) @ k.float().transpose(-2, -1)).softmax(-1)


def attention_over_patches(attn: torch.Tensor, num_prefix: int, source: str) -> torch.Tensor:
    """(B, H, T, T) -> (B, H, N) distribution over the N patch tokens. source 'cls': the first prefix
    token's row; 'received': mean over patch queries of the attention each patch key receives."""
    if source == "cls":
        if num_prefix == 0:
            raise DirlError("source cls needs a class token; use --source received")
        a = attn[:, :, 0, num_prefix:]
    elif source == "received":
        a = attn[:, :, num_prefix:, num_prefix:].mean(-2)
    else:
        raise ValueError(f"unknown attention source {source!r}")
    return a / a.sum(-1, keepdim=True).clamp_min(1e-30)


def attention_metrics(a: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sparsity of distributions a (..., N) (renormalised to sum 1).

    entropy      H(a) / log N: 1 uniform, 0 one-hot
    gini         Gini coefficient x N / (N - 1): 0 uniform, 1 one-hot
    top50_share  fraction of tokens (largest first) needed to hold 50 % of the mass
    top90_share  same for 90 %"""
    a = a.double()
    a = a / a.sum(-1, keepdim=True)
    n = a.shape[-1]
    if n < 2:
        raise ValueError("attention over fewer than 2 tokens has no sparsity")
    ent = -torch.special.xlogy(a, a).sum(-1) / math.log(n)
    asc = a.sort(-1).values
    i = torch.arange(1, n + 1, dtype=a.dtype, device=a.device)
    gini = ((2 * i - n - 1) * asc).sum(-1) / (n - 1)
    cs = asc.flip(-1).cumsum(-1)
    out = {"entropy": ent.clamp(0, 1), "gini": gini.clamp(0, 1)}
    for q, key in ((0.5, "top50_share"), (0.9, "top90_share")):
        out[key] = ((cs < q - 1e-9).sum(-1) + 1).to(a.dtype) / n
    return out


def class_share(a: torch.Tensor, occupancy: torch.Tensor) -> torch.Tensor:
    """Share of attention (B, H, N) falling on each prior class, occupancy (B, N, C) -> (B, H, C)."""
    return torch.einsum("bhn,bnc->bhc", a.double(), occupancy.double())


# --------------------------------------------------------------------------------------------------
# inputs: one fixed sample of tiles for every backbone
def sample_tiles(counts: list[int], n_tiles: int, seed: int) -> list[tuple[int, int]]:
    """A fixed sample of (slide, row): slides take turns (so each gives about n_tiles / n_slides,
    and a small slide's share goes to the others), rows random within a slide; sorted."""
    orders = [np.random.default_rng([seed, s]).choice(n, min(n, n_tiles), replace=False) for s, n in enumerate(counts)]
    picks: list[tuple[int, int]] = []
    depth = 0
    while len(picks) < n_tiles and any(depth < len(o) for o in orders):
        for s, o in enumerate(orders):
            if depth < len(o) and len(picks) < n_tiles:
                picks.append((s, int(o[depth])))
        depth += 1
    return sorted(picks)


@dataclass
class Sample:
    """The tiles every backbone sees: images (uint8, tile size), prior maps, and their names."""

    ids: list[tuple[str, int]]
    images: np.ndarray  # (n, T, T, 3) uint8
    priors: np.ndarray | None  # (n, T, T) uint8
    n_classes: int
    class_names: list[str]

    def inputs(self, size: int, mean, std) -> torch.Tensor:
        x = torch.from_numpy(self.images).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    def occupancy(self, size: int, patch: int) -> torch.Tensor | None:
        from dirl.ssl.losses import token_occupancy

        if self.priors is None:
            return None
        pm = torch.from_numpy(self.priors)[:, None].float()
        if pm.shape[-1] != size:
            pm = F.interpolate(pm, size=(size, size), mode="nearest-exact")
        return token_occupancy(pm[:, 0].to(torch.uint8), self.n_classes, patch)


def load_sample(
    tiles: list[str], priors: list[str] | None, n_tiles: int, seed: int, n_classes: int | None = None
) -> Sample:
    from dirl import store
    from dirl.ssl.data import resolve_n_classes

    if priors is not None and len(priors) != len(tiles):
        raise DirlError(f"{len(tiles)} tile stores but {len(priors)} priors stores")
    stores = [store.open_tiles(t) for t in tiles]
    # only tiles with prior maps: under pretrain.tiles_per_slide the priors stores list the rows they cover
    rows = (
        [
            np.asarray(store.map_attrs(p, "priors").get("rows", np.arange(len(ts))), dtype=np.int64)
            for p, ts in zip(priors, stores)
        ]
        if priors
        else [np.arange(len(ts)) for ts in stores]
    )
    picks = [(s, int(rows[s][r])) for s, r in sample_tiles([len(r) for r in rows], n_tiles, seed)]
    if not picks:
        raise DirlError("no tiles to analyse (every slide is empty or failed)")
    images = np.stack([stores[s].tile(r) for s, r in picks])
    maps, names, c = None, [], 0
    if priors:
        arrays = [store.open_map(p, "priors", len(ts)) for p, ts in zip(priors, stores)]
        maps = np.stack([np.asarray(arrays[s][r]) for s, r in picks])
        c = resolve_n_classes(priors, n_classes)
        names = store.map_attrs(priors[0], "priors").get("class_names") or []
        if len(names) != c:
            names = store.prior_class_names([f"cell class {k}" for k in range(c - store.FIRST_CELL_PRIOR)])
    return Sample([(stores[s].slide_id, r) for s, r in picks], images, maps, c, list(names))


# --------------------------------------------------------------------------------------------------
# measuring one backbone
@dataclass
class Measured:
    """Per-image results of one backbone on the sample."""

    name: str
    meta: dict[str, Any]
    source: str
    per_head: dict[str, np.ndarray]  # metric -> (n, heads)
    head_mean: dict[str, np.ndarray]  # metric -> (n,) of the head-averaged map
    share: np.ndarray | None  # (n, C) attention share per class (head-averaged map)
    area: np.ndarray | None  # (n, C) area share per class
    maps: torch.Tensor  # (n_overlays, g, g) head-averaged maps

    @property
    def headline(self) -> np.ndarray:
        return self.per_head["entropy"].mean(1)


def measure(
    name: str, model: torch.nn.Module, meta: dict[str, Any], sample: Sample, s: AttentionSettings, device: torch.device
) -> Measured:
    size = int(s.size or meta["img_size"])
    patch = int(meta.get("patch_size") or model.patch_embed.patch_size[0])
    if size % patch:
        raise DirlError(f"input size {size} is not a multiple of {name}'s patch size {patch}")
    npre = int(getattr(model, "num_prefix_tokens", 1))
    has_cls = npre > 0 and getattr(model, "cls_token", None) is not None
    src = s.source if s.source != "auto" else ("cls" if has_cls and meta.get("embed", "cls") == "cls" else "received")
    x = sample.inputs(size, meta["mean"], meta["std"])
    occ = sample.occupancy(size, patch)
    model.to(device).eval()
    parts = []
    with torch.no_grad():
        for a in range(0, len(x), s.batch_size):
            parts.append(
                attention_over_patches(last_layer_attention(model, x[a : a + s.batch_size].to(device)), npre, src).cpu()
            )
    model.cpu()
    att = torch.cat(parts)  # (n, H, N)
    mean_map = att.mean(1)
    g = size // patch
    return Measured(
        name,
        meta,
        src,
        per_head={k: v.numpy() for k, v in attention_metrics(att).items()},
        head_mean={k: v.numpy() for k, v in attention_metrics(mean_map).items()},
        share=class_share(mean_map[:, None], occ)[:, 0].numpy() if occ is not None else None,
        area=occ.double().mean(1).numpy() if occ is not None else None,
        maps=mean_map[: s.n_overlays].reshape(-1, g, g),
    )


def untrained_like(meta: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The untrained reference of a run (dirl.encoders.untrained_backbone), labelled as such."""
    from dirl.encoders import untrained_backbone

    return untrained_backbone(meta), {**meta, "method": UNTRAINED}


def analyse(
    backbones: dict[str, str],
    tiles: list[str],
    priors: list[str] | None,
    s: AttentionSettings = AttentionSettings(),
    *,
    untrained: bool = False,
    overlays: str | None = None,
    cohort: str | None = None,
) -> dict[str, Any]:
    """Run the diagnostics on every backbone (and the untrained references); returns the summary."""
    from dirl.analysis.compare import by_seed, compare, describe, replicates, run_order
    from dirl.encoders import load_backbone
    from dirl.runs import RUN_NAME, untrained_name
    from dirl.runtime import resolve_device

    device = resolve_device(s.device)
    sample = load_sample(tiles, priors, s.n_tiles, s.seed, s.n_classes)
    models: dict[str, tuple[torch.nn.Module, dict[str, Any]]] = {}
    for name, path in backbones.items():
        enc = load_backbone(path)
        models[name] = (enc.model, {**enc.meta, "path": str(path)})
    if untrained:
        refs: dict[str, tuple[torch.nn.Module, dict[str, Any]]] = {}
        for name, (_, meta) in models.items():
            seed = RUN_NAME.match(name)["seed"]
            ref = untrained_name(seed)
            if ref not in refs:
                refs[ref] = untrained_like(meta)
        models = {**refs, **models}
    models = dict(sorted(models.items(), key=lambda kv: run_order(kv[0])))
    measured = {name: measure(name, model, meta, sample, s, device) for name, (model, meta) in models.items()}
    names = list(measured)
    seeds = by_seed(names)
    methods = sorted({m for runs in seeds.values() for m in runs} - {UNTRAINED})
    pairs = [(UNTRAINED, m) for m in methods] + ([("dino", "dirl")] if {"dino", "dirl"} <= set(methods) else [])
    summary = {
        "cohort": cohort,
        "n_images": len(sample.ids),
        "seed": s.seed,
        "headline": HEADLINE,
        "note": "head_entropy: mean over heads of each head's H/log N (1 = uniform); map_*: metrics of the "
        "head-averaged map; comparisons: second minus first, paired by tile",
        "tiles": [list(t) for t in sample.ids],
        "runs": {n: describe(m, sample.class_names) for n, m in measured.items()},
        "comparisons": {
            f"{b}_vs_{a}": compare(measured[a], measured[b]) for i, a in enumerate(names) for b in names[i + 1 :]
        },
        "replicates": replicates(measured, pairs),
    }
    if overlays:
        from dirl.analysis.overlays import write_overlays

        write_overlays(Path(overlays), sample, measured)
    return summary


# --------------------------------------------------------------------------------------------------
def _parse_backbones(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for it in items:
        name, _, path = it.rpartition("=")
        name = name or Path(path).parent.name or f"backbone{len(out)}"
        if name in out or name.startswith(UNTRAINED):
            raise DirlError(f"backbone name {name!r} given twice or reserved; use NAME=PATH")
        out[name] = path
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        action="append",
        required=True,
        help="[NAME=]path/to/backbone.pt (backbone.json beside it); repeat to compare "
        "(NAME defaults to the parent directory, e.g. pretrain/dirl -> dirl)",
    )
    p.add_argument("--untrained", action="store_true", help="add the untrained reference of each seed")
    p.add_argument("--tiles", nargs="+", required=True)
    p.add_argument("--priors", nargs="+", help="priors stores in the order of --tiles (class shares)")
    p.add_argument("--out", required=True, help="JSON summary")
    p.add_argument("--overlays", help="directory for overlay PNGs (image | prior | attention per backbone)")
    p.add_argument("--cohort", help="cohort name recorded in the JSON")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    AttentionSettings.add_arguments(p.add_argument_group("settings (AttentionSettings)"))


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    return [args.out], [*args.tiles, *(args.priors or [])]


def main(args: argparse.Namespace) -> None:
    from dirl.runtime import torch_threads
    from dirl.store import atomic_path

    s = AttentionSettings.from_args(args)
    with torch_threads(args.threads):
        summary = analyse(
            _parse_backbones(args.backbone),
            args.tiles,
            args.priors,
            s,
            untrained=args.untrained,
            overlays=args.overlays,
            cohort=args.cohort,
        )
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
    for name, res in summary["runs"].items():
        log.info(
            "%s: per-head entropy %.4f (head-averaged map %.4f), Gini %.3f, top-50%% tokens %.3f (n=%d)",
            name,
            res[HEADLINE]["mean"],
            res["head_averaged_map"]["entropy"]["mean"],
            res["head_averaged_map"]["gini"]["mean"],
            res["head_averaged_map"]["top50_share"]["mean"],
            summary["n_images"],
        )
    for key, r in summary["replicates"].items():
        log.info(
            "%s per seed: %s; mean %.4f ± %.4f",
            key,
            ", ".join(f"s{k} {v:+.4f}" for k, v in r["per_seed"].items()),
            r["mean"],
            r["sd"],
        )
