"""`dirl attention`: how sparse is a pretrained ViT's last-layer self-attention (the paper's evidence).

    dirl attention --backbone dino=results/c/pretrain/dino/backbone.pt \
                   --backbone dirl=results/c/pretrain/dirl/backbone.pt \
                   --tiles results/c/tiles/*.zarr --priors results/c/priors/*.zarr \
                   --out results/c/analysis/attention_{method}.json --overlays results/c/analysis/attention

For a fixed sample of tiles, the last block's attention distribution over the N patch tokens (the [CLS]
query's row renormalised over patch tokens, or without [CLS] the mean attention each patch receives)
per head and averaged over heads, and for each: normalised entropy H / log N (1 = uniform, 0 = one
token), Gini coefficient (normalised: 0 = uniform, 1 = one token), and the share of tokens holding 50 %
and 90 % of the mass; the share of attention falling on each prior class (with the class's area share
for reference). Several backbones are evaluated on the same tiles and compared pairwise (paired
differences, Wilcoxon signed-rank test). Overlay PNGs put image, prior map and each backbone's attention
side by side.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dirl.errors import DirlError

log = logging.getLogger("dirl.attention")
METRICS = ("entropy", "gini", "top50_share", "top90_share")


# --------------------------------------------------------------------------------------------------
# attention extraction
def last_layer_attention(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the last block of a timm ViT: (B, heads, T, T) over all tokens (prefix
    tokens first). Fused attention never materialises it, so the input of `blocks[-1].attn` is caught
    with a forward pre-hook and softmax(q k^T * scale) is recomputed from its qkv projection."""
    attn = model.blocks[-1].attn
    for name in ("qkv", "num_heads", "head_dim", "scale"):
        if not hasattr(attn, name):
            raise DirlError(f"{type(model).__name__}: last attention block has no {name}; attention "
                            "diagnostics support timm VisionTransformer backbones")
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
# sampling and inputs
def sample_tiles(counts: list[int], n_tiles: int, seed: int) -> list[tuple[int, int]]:
    """A fixed sample of (slide, row): slides take turns (so each gives about n_tiles / n_slides,
    and a small slide's share goes to the others), rows random within a slide; sorted."""
    orders = [np.random.default_rng([seed, s]).choice(n, min(n, n_tiles), replace=False)
              for s, n in enumerate(counts)]
    picks: list[tuple[int, int]] = []
    depth = 0
    while len(picks) < n_tiles and any(depth < len(o) for o in orders):
        for s, o in enumerate(orders):
            if depth < len(o) and len(picks) < n_tiles:
                picks.append((s, int(o[depth])))
        depth += 1
    return sorted(picks)


def _prepare(img: np.ndarray, prior: np.ndarray | None, size: int, mean, std
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x[0] - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    pm = None
    if prior is not None:
        pm = torch.from_numpy(np.ascontiguousarray(prior))[None, None].float()
        if pm.shape[-1] != size:
            pm = F.interpolate(pm, size=(size, size), mode="nearest-exact")
        pm = pm[0, 0].to(torch.uint8)
    return x, pm


# --------------------------------------------------------------------------------------------------
def _summary(v: np.ndarray) -> dict[str, float]:
    v = np.asarray(v, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "median": float(np.median(v)), "q25": float(np.quantile(v, 0.25)),
            "q75": float(np.quantile(v, 0.75))}


def _compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, Any]:
    from scipy.stats import wilcoxon

    out = {}
    for m in METRICS:
        d = np.asarray(b[m]) - np.asarray(a[m])
        p = None
        if len(d) > 1 and np.any(d != 0):
            try:
                p = float(wilcoxon(d).pvalue)
            except ValueError:
                p = None
        out[m] = {"mean_diff": float(d.mean()), "sd_diff": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                  "frac_higher": float((d > 0).mean()), "wilcoxon_p": p}
    return out


def analyse(backbones: dict[str, str], tiles: list[str], priors: list[str] | None, *, n_tiles: int = 256,
            size: int | None = None, source: str = "auto", batch_size: int = 32, seed: int = 0,
            device: str = "auto", n_classes: int | None = None, overlays: str | None = None,
            n_overlays: int = 8, cohort: str | None = None) -> dict[str, Any]:
    """Run the diagnostics; returns the cohort summary (see module docstring)."""
    from dirl import store
    from dirl.ssl.data import read_n_classes
    from dirl.ssl.losses import token_occupancy
    from dirl.encoders import load_backbone

    if priors is not None and len(priors) != len(tiles):
        raise DirlError(f"{len(tiles)} tile stores but {len(priors)} priors stores")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    models = {name: (enc.model, enc.meta) for name, enc in
              ((n, load_backbone(p)) for n, p in backbones.items())}
    first = next(iter(models.values()))[1]
    size = size or int(first["img_size"])
    stores = [store.open_tiles(t) for t in tiles]
    maps = [store.open_map(p, "priors", len(ts)) for p, ts in zip(priors, stores)] if priors else None
    if priors:
        found = {read_n_classes(p) for p in priors} - {None}
        if len(found) > 1:
            raise DirlError(f"priors stores disagree on n_classes: {sorted(found)}")
        n_classes = found.pop() if found else n_classes
        if n_classes is None:
            n_classes = int(max(int(np.asarray(m[: min(len(m), 64)]).max()) for m in maps)) + 1
            log.warning("priors stores do not record n_classes; using %d from the data", n_classes)
        class_names = store._open_group(priors[0], "priors").attrs.get("class_names")
        if not class_names or len(class_names) != n_classes:
            class_names = ["background", "tissue"] + [f"cell class {k}" for k in range(1, n_classes - 1)]
    picks = sample_tiles([len(s) for s in stores], n_tiles, seed)
    if not picks:
        raise DirlError("no tiles to analyse")
    results: dict[str, dict[str, Any]] = {}
    per_image: dict[str, dict[str, list]] = {n: {} for n in models}
    overlay_maps: dict[str, list[torch.Tensor]] = {n: [] for n in models}
    overlay_inputs: list[tuple[np.ndarray, np.ndarray | None]] = []
    for name, (model, meta) in models.items():
        model.to(dev)
        npre = int(getattr(model, "num_prefix_tokens", 1))
        has_cls = npre > 0 and getattr(model, "cls_token", None) is not None
        # auto: the [CLS] row when the backbone was trained through [CLS], else received attention
        src = source if source != "auto" else ("cls" if has_cls and meta.get("embed", "cls") == "cls"
                                               else "received")
        patch = int(meta.get("patch_size") or model.patch_embed.patch_size[0])
        if size % patch:
            raise DirlError(f"input size {size} is not a multiple of {name}'s patch size {patch}")
        acc: dict[str, list] = {"head_mean": [], "per_head": [], "class_share": [], "class_area": []}
        for start in range(0, len(picks), batch_size):
            chunk = picks[start:start + batch_size]
            xs, pms = [], []
            for s, r in chunk:
                img = stores[s].tile(r)
                prior = np.asarray(maps[s][r]) if maps else None
                x, pm = _prepare(img, prior, size, meta["mean"], meta["std"])
                xs.append(x)
                pms.append(pm)
                if name == next(iter(models)) and len(overlay_inputs) < n_overlays:
                    overlay_inputs.append((img, prior))
            with torch.no_grad():
                attn = last_layer_attention(model, torch.stack(xs).to(dev))
            a = attention_over_patches(attn, npre, src).cpu()  # (B, H, N)
            mean_a = a.mean(1)  # head-averaged distribution
            acc["head_mean"].append({k: v for k, v in attention_metrics(mean_a).items()})
            acc["per_head"].append(attention_metrics(a))
            if maps:
                occ = token_occupancy(torch.stack(pms), n_classes, patch)  # (B, N, C)
                acc["class_share"].append(class_share(mean_a[:, None], occ)[:, 0])
                acc["class_area"].append(occ.double().mean(1))
            need = n_overlays - sum(len(m) for m in overlay_maps[name])
            if need > 0:
                g = size // patch
                overlay_maps[name].append(mean_a[:need].reshape(-1, g, g))
        model.cpu()
        hm = {k: torch.cat([d[k] for d in acc["head_mean"]]).numpy() for k in METRICS}
        ph = {k: torch.cat([d[k] for d in acc["per_head"]]).numpy() for k in METRICS}  # (n, H)
        per_image[name] = hm
        res: dict[str, Any] = {
            "backbone": str(backbones[name]), "arch": meta.get("arch"), "method": meta.get("method"),
            "source": src, "n_tokens": (size // patch) ** 2, "n_heads": int(ph["entropy"].shape[1]),
            "summary": {k: _summary(hm[k]) for k in METRICS},
            "per_head": {k: [float(v) for v in ph[k].mean(0)] for k in METRICS},
            "mean_of_heads": {k: _summary(ph[k].mean(1)) for k in METRICS},
        }
        if maps:
            cs = torch.cat(acc["class_share"]).numpy()
            ca = torch.cat(acc["class_area"]).numpy()
            share, area = cs.mean(0), ca.mean(0)
            res["class_share"] = {
                "classes": list(class_names), "attention": [float(v) for v in share],
                "area": [float(v) for v in area],
                "enrichment": [float(s / a) if a > 0 else None for s, a in zip(share, area)]}
        res["per_image"] = {k: [float(v) for v in hm[k]] for k in METRICS}
        results[name] = res
    names = list(models)
    comparison = {f"{b}_vs_{a}": _compare(per_image[a], per_image[b])
                  for i, a in enumerate(names) for b in names[i + 1:]}
    summary = {"cohort": cohort, "n_images": len(picks), "size": size, "seed": seed,
               "tiles": [[stores[s].slide_id, r] for s, r in picks], "methods": results,
               "comparison": comparison,
               "note": "metrics on the head-averaged distribution (summary) and per head (per_head, "
                       "mean_of_heads); comparison: differences second minus first, paired by tile"}
    if overlays:
        write_overlays(Path(overlays), overlay_inputs, {n: torch.cat(v) if v else None
                                                         for n, v in overlay_maps.items()},
                       [picks[i] for i in range(len(overlay_inputs))], stores, n_classes if maps else 0,
                       {n: results[n]["per_image"]["entropy"] for n in names}, size)
    return summary


def write_overlays(outdir: Path, inputs, attn_maps: dict[str, torch.Tensor | None], picks, stores,
                   n_classes: int, entropies: dict[str, list[float]], size: int) -> None:
    """One PNG per tile (image | prior map | attention of each backbone) and overview.png with all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from dirl.store import atomic_path

    outdir.mkdir(parents=True, exist_ok=True)
    colours = [(1, 1, 1), (0.95, 0.75, 0.85)] + [plt.cm.tab10(i % 10)[:3] for i in range(max(0, n_classes - 2))]
    cmap = ListedColormap(colours) if n_classes else None
    names = list(attn_maps)
    ncol = 1 + (1 if n_classes else 0) + len(names)

    def draw(axes, i):
        img, prior = inputs[i]
        axes[0].imshow(img)
        axes[0].set_title(f"{stores[picks[i][0]].slide_id} #{picks[i][1]}", fontsize=8)
        c = 1
        if n_classes:
            axes[1].imshow(prior if prior is not None else np.zeros(img.shape[:2]), cmap=cmap,
                           vmin=-0.5, vmax=n_classes - 0.5, interpolation="nearest")
            axes[1].set_title("prior map", fontsize=8)
            c = 2
        vmax = max(float(attn_maps[n][i].max()) for n in names)  # one scale per tile: sparsity shows
        for j, n in enumerate(names):
            m = attn_maps[n][i][None, None].float()
            up = F.interpolate(m, size=img.shape[:2], mode="nearest")[0, 0].numpy()
            axes[c + j].imshow(img)
            axes[c + j].imshow(up, cmap="inferno", alpha=0.6, interpolation="nearest", vmin=0, vmax=vmax)
            axes[c + j].set_title(f"{n}  H/logN={entropies[n][i]:.2f}", fontsize=8)
        for ax in axes:
            ax.axis("off")

    for i in range(len(inputs)):
        fig, axes = plt.subplots(1, ncol, figsize=(2.6 * ncol, 2.8))
        draw(np.atleast_1d(axes), i)
        fig.tight_layout()
        sid, row = stores[picks[i][0]].slide_id, picks[i][1]
        with atomic_path(outdir / f"{sid}_{row}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=90)
        plt.close(fig)
    if inputs:
        fig, axes = plt.subplots(len(inputs), ncol, figsize=(2.6 * ncol, 2.6 * len(inputs)), squeeze=False)
        for i in range(len(inputs)):
            draw(axes[i], i)
        fig.tight_layout()
        with atomic_path(outdir / "overview.png") as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)


# --------------------------------------------------------------------------------------------------
def _parse_backbones(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for it in items:
        name, _, path = it.rpartition("=")
        name = name or Path(path).parent.name or f"backbone{len(out)}"
        if name in out:
            raise DirlError(f"backbone name {name!r} given twice; use NAME=PATH")
        out[name] = path
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", action="append", required=True,
                   help="[NAME=]path/to/backbone.pt (backbone.json beside it); repeat to compare "
                        "(NAME defaults to the parent directory, e.g. pretrain/dirl -> dirl)")
    p.add_argument("--tiles", nargs="+", required=True)
    p.add_argument("--priors", nargs="+", help="priors stores in the order of --tiles (class shares)")
    p.add_argument("--out", required=True, help="JSON summary; a path containing {method} writes one "
                   "file per backbone (each with the cross-backbone comparison)")
    p.add_argument("--overlays", help="directory for overlay PNGs (image | prior | attention per backbone)")
    p.add_argument("--n-tiles", type=int, default=256, help="tiles sampled over the cohort (default 256)")
    p.add_argument("--n-overlays", type=int, default=8)
    p.add_argument("--size", type=int, help="input size (default: the first backbone's img_size)")
    p.add_argument("--source", choices=("auto", "cls", "received"), default="auto",
                   help="[CLS] row or mean received attention (auto: cls when there is a class token)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-classes", type=int, help="prior classes, if the priors stores do not say")
    p.add_argument("--cohort", help="cohort name recorded in the JSON")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> None:
    from dirl.store import atomic_path

    backbones = _parse_backbones(args.backbone)
    summary = analyse(backbones, args.tiles, args.priors, n_tiles=args.n_tiles, size=args.size,
                      source=args.source, batch_size=args.batch_size, seed=args.seed, device=args.device,
                      n_classes=args.n_classes, overlays=args.overlays, n_overlays=args.n_overlays,
                      cohort=args.cohort)
    outs = ({n: args.out.replace("{method}", n) for n in backbones} if "{method}" in args.out
            else {None: args.out})
    for name, path in outs.items():
        doc = summary if name is None else {**summary, "method": name,
                                            "methods": {name: summary["methods"][name]},
                                            "others": {k: {kk: vv for kk, vv in v.items() if kk != "per_image"}
                                                       for k, v in summary["methods"].items() if k != name}}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
        log.info("wrote %s", path)
    for name, res in summary["methods"].items():
        s = res["summary"]
        log.info("%s: H/logN %.3f, Gini %.3f, top-50%% tokens %.3f, top-90%% tokens %.3f (n=%d)", name,
                 s["entropy"]["mean"], s["gini"]["mean"], s["top50_share"]["mean"], s["top90_share"]["mean"],
                 summary["n_images"])
