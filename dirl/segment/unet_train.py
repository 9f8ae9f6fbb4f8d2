"""Train the unet backend's centre network on images with marked nucleus centres, validated by image.

    python -m dirl.segment.unet_train IMAGES POINTS OUT.npz [--mpp 0.5] [--steps 1500] [--folds 3]

IMAGES: a folder of RGB images (PNG, TIFF, JPEG); POINTS: a TSV with columns `image` (file name without
extension), `x`, `y` (0-based pixel column and row of each nucleus centre; other columns are ignored), so
expert-typed points serve as they are. Images at another pixel size (`--mpp`) are resampled to the
network's 0.5 µm/px. With `--folds k` the images are first split into k groups and a network trained on
the others is scored on each (centres matched one-to-one within 3 µm: precision, recall, F1); the final
network is trained on every image, and the scores, the data and the recipe are stored in OUT's meta. The
shipped `models/unet_crc.npz` is this command on ../shared/data/crc-typed-train (70 images, 3 folds,
1,500 steps: ~35 min on 2 cores).

Experts rarely mark every nucleus (CRCHistoPhenotypes types ~75 %), and a network taught that unmarked
nuclei are background learns to pass over nuclei: on MoNuSeg (other organs, every nucleus outlined) the
first shipped network found half of them. So the pixels of a watershed nucleus that holds no mark are
left out of the loss (`unmarked_nuclei`); the network then finds unmarked nuclei too, which costs
precision against the marks alone (a lower bound) and gains it against complete outlines (bench/RESULTS.md).
Crops are jittered in stain (optical density per channel), focus and scale (±25 %).
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from dirl.errors import ConfigError
from dirl.segment import unet

log = logging.getLogger(__name__)

SIGMA_UM = 1.0  # the target's Gaussian around each centre
MATCH_UM = 3.0  # a found centre matches a marked one within this (6 px at 0.5 µm/px)
CROP = 128  # px of a training crop
BATCH = 16
POS_WEIGHT = 4.0  # centres are a few % of pixels
STAIN_SCALE, STAIN_SHIFT = 0.2, 0.05  # sd of the optical-density scale and shift per channel
BLUR_P = 0.3  # share of crops blurred a little
SCALE_JITTER = 1.25  # crops are resized by up to this factor either way


def read_points(images: Path, points: Path, mpp: float) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(name, RGB uint8 at NET_MPP, (n, 2) float x, y at NET_MPP)] for every image with points."""
    import cv2
    from PIL import Image

    xy: dict[str, list[tuple[float, float]]] = {}
    try:
        with open(points, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                xy.setdefault(row["image"], []).append((float(row["x"]), float(row["y"])))
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"{points}: not a TSV of image, x, y ({e})") from e
    files = {p.stem: p for p in images.iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff", ".jpg", ".jpeg")}
    if missing := sorted(set(xy) - set(files)):
        raise ConfigError(f"{points}: no image in {images} for {missing[:3]} ({len(missing)} names)")
    scale = mpp / unet.NET_MPP
    out = []
    for name in sorted(xy, key=lambda s: (len(s), s)):
        rgb = np.asarray(Image.open(files[name]).convert("RGB"))
        if abs(scale - 1) > 0.01:
            rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        out.append((name, rgb, np.asarray(xy[name], np.float64) * scale))
    return out


def target(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The centre map to learn: the max over centres of a Gaussian of SIGMA_UM around each."""
    sigma = SIGMA_UM / unet.NET_MPP
    r = int(3 * sigma) + 1
    out = np.zeros(shape, np.float32)
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    for x, y in xy:
        c, rr = int(x), int(y)
        g = np.exp(-((dx + c - x) ** 2 + (dy + rr - y) ** 2) / (2 * sigma**2)).astype(np.float32)
        y0, y1, x0, x1 = max(0, rr - r), min(shape[0], rr + r + 1), max(0, c - r), min(shape[1], c + r + 1)
        sub = g[y0 - (rr - r) : y1 - (rr - r), x0 - (c - r) : x1 - (c - r)]
        out[y0:y1, x0:x1] = np.maximum(out[y0:y1, x0:x1], sub)
    return out


def _stain_jitter(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scale and shift each channel's optical density (stain strength and scanner colour differ by slide),
    and now and then blur (focus, scanners' optics)."""
    import cv2

    od = -np.log((x.astype(np.float32) + 1) / 256)
    scale = (1 + STAIN_SCALE * rng.standard_normal(3)).astype(np.float32)
    od = od * scale + (STAIN_SHIFT * rng.standard_normal(3)).astype(np.float32)
    x = np.clip(256 * np.exp(-od) - 1, 0, 255)
    if rng.random() < BLUR_P:
        x = cv2.GaussianBlur(x, (0, 0), float(rng.uniform(0.5, 1.2)))
    return x


def _crop(image: np.ndarray, target: np.ndarray, ignore: np.ndarray, rng: np.random.Generator) -> tuple:
    """A random CROP x CROP training crop of an image, its centre map and its ignore mask, at a random
    scale in [1 / SCALE_JITTER, SCALE_JITTER] (nuclei sizes differ between tissues and scanners)."""
    import cv2

    h, w = target.shape
    side = min(h, w, int(round(CROP * np.exp(rng.uniform(-1, 1) * np.log(SCALE_JITTER)))))
    r0, c0 = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    x, y, z = (a[r0 : r0 + side, c0 : c0 + side] for a in (image, target, ignore))
    if side != CROP:
        x = cv2.resize(x, (CROP, CROP), interpolation=cv2.INTER_AREA if side > CROP else cv2.INTER_LINEAR)
        y = cv2.resize(y, (CROP, CROP), interpolation=cv2.INTER_LINEAR)
        z = cv2.resize(z.view(np.uint8), (CROP, CROP), interpolation=cv2.INTER_NEAREST).view(bool)
    return x, y, z


def unmarked_nuclei(rgb: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Pixels of the watershed's nuclei that hold no marked centre (bool): left out of the loss, because
    experts mark a subset (CRCHistoPhenotypes types ~75 %) and an unmarked nucleus is no background."""
    from dirl.segment.watershed import WatershedParams, segment_tile

    lab = segment_tile(np.ascontiguousarray(rgb), unet.NET_MPP, WatershedParams())
    h, w = lab.shape
    held = lab[np.clip(xy[:, 1].astype(int), 0, h - 1), np.clip(xy[:, 0].astype(int), 0, w - 1)]
    return (lab > 0) & ~np.isin(lab, held[held > 0])


def fit(data: list[tuple[str, np.ndarray, np.ndarray]], steps: int, seed: int = 0) -> Any:
    """The network trained on `data` (read_points) for `steps` batches of random crops (eval mode)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    images = [d[1] for d in data]
    maps = [target(d[2], d[1].shape[:2]) for d in data]
    ignore = [unmarked_nuclei(d[1], d[2]) for d in data]
    if any(min(m.shape) < CROP for m in maps):
        raise ConfigError(f"every image must be at least {CROP} px at {unet.NET_MPP} µm/px")
    net = unet.network()
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    pos = torch.tensor(POS_WEIGHT)
    net.train()
    bar = tqdm(range(steps), desc=f"unet ({len(data)} images)", unit="step", disable=None, mininterval=10)
    for _ in bar:
        xb, yb, wb = [], [], []
        for _ in range(BATCH):
            i = int(rng.integers(len(images)))
            x, y, z = _crop(images[i], maps[i], ignore[i], rng)
            x = _stain_jitter(x, rng)
            k = int(rng.integers(4))
            x, y, z = np.rot90(x, k), np.rot90(y, k), np.rot90(z, k)
            if rng.random() < 0.5:
                x, y, z = x[:, ::-1], y[:, ::-1], z[:, ::-1]
            xb.append(x)
            yb.append(y)
            wb.append(~z)
        logits = net(unet.as_input(np.stack(xb)))
        weight = torch.from_numpy(np.stack(wb).astype(np.float32))[:, None]
        loss = F.binary_cross_entropy_with_logits(
            logits, torch.from_numpy(np.stack(yb))[:, None], weight=weight, pos_weight=pos
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return net.eval()


def score(net: Any, data: list[tuple[str, np.ndarray, np.ndarray]], threshold: float = 0.5) -> dict[str, float]:
    """Found centres against marked ones, one-to-one within MATCH_UM: precision, recall, F1 and counts."""
    from scipy.optimize import linear_sum_assignment

    spacing = round(unet.UNetParams().centre_spacing_um / unet.NET_MPP)
    matched = found = marked = 0
    for _, rgb, xy in data:
        c = unet.centres(unet.centre_maps(net, rgb[None])[0], threshold, spacing)[:, ::-1].astype(np.float64)
        found, marked = found + len(c), marked + len(xy)
        if len(c) and len(xy):
            d = np.hypot(*(c[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
            cost = np.where(d <= MATCH_UM / unet.NET_MPP, d, 1e6)
            r, k = linear_sum_assignment(cost)
            matched += int((cost[r, k] < 1e6).sum())
    p, r = matched / max(found, 1), matched / max(marked, 1)
    return {"precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-9), "found": found, "marked": marked}


def held_out_weights(folder: Path) -> dict[str, str]:
    """Image name -> the fold network (`--fold-weights` folder) that never saw it."""
    return {n: str(f) for f in sorted(Path(folder).glob("fold*.npz")) for n in unet.load(f)[1]["held_out"]}


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", type=Path)
    ap.add_argument("points", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--mpp", type=float, default=unet.NET_MPP, help="µm per pixel of the images")
    ap.add_argument("--steps", type=int, default=1500, help="batches of 16 crops of 128 px")
    ap.add_argument("--folds", type=int, default=3, help="validation by image before the final fit (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--fold-weights",
        type=Path,
        help="also keep each fold's network here (fold<k>.npz, its held-out images in meta)",
    )
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    data = read_points(a.images, a.points, a.mpp)
    folds = []
    for k in range(a.folds):
        t0 = time.perf_counter()
        test = data[k :: a.folds]
        net = fit([d for i, d in enumerate(data) if i % a.folds != k], a.steps, a.seed)
        folds.append({**score(net, test), "images": [d[0] for d in test], "seconds": time.perf_counter() - t0})
        if a.fold_weights:  # for measuring the whole backend on images its network never saw (bench/nuclei_crc.py)
            a.fold_weights.mkdir(parents=True, exist_ok=True)
            unet.save(net, a.fold_weights / f"fold{k}.npz", {"held_out": folds[-1]["images"]})
        log.info("fold %d: %s", k, {k2: round(v, 4) for k2, v in folds[-1].items() if isinstance(v, float)})
    t0 = time.perf_counter()
    net = fit(data, a.steps, a.seed)
    meta: dict[str, Any] = {
        "images": len(data),
        "centres": int(sum(len(d[2]) for d in data)),
        "source": a.images.resolve().parent.name,
        "steps": a.steps,
        "seed": a.seed,
        "fit_seconds": round(time.perf_counter() - t0, 1),
        "validation": {
            "folds": folds,
            **{m: round(float(np.mean([f[m] for f in folds])), 4) for m in ("precision", "recall", "f1") if folds},
        },
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".tmp")
    unet.save(net, tmp, meta)
    tmp.replace(a.out)
    log.info("wrote %s: validation %s", a.out, {k: v for k, v in meta["validation"].items() if k != "folds"})


if __name__ == "__main__":
    main()
