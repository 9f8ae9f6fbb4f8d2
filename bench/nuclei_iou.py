"""Nucleus outlines against expert outlines: detection F1 at IoU 0.5 (MoNuSeg / GBM-style), per backend, same run.

DATA holds `images/<name>.png` (RGB at 0.5 µm/px) and `labels/<name>.npy` (int32 instance labels of the
same size, 0 = background): e.g. MoNuSeg's training images with their polygons rasterised at 20x. Each
backend segments each image as one tile; a segmented nucleus matches an expert one when their IoU exceeds
0.5 (one-to-one by construction). Also the aggregated Jaccard index (AJI, Kumar et al. 2017) and Dice of
the foreground.

    .venv/bin/python bench/nuclei_iou.py DATA [--backends watershed unet] [--settings JSON]

Prints one JSON line. The data is not in the repository (licences); figures are quoted in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
MPP = 0.5


def aji(gt: np.ndarray, pred: np.ndarray) -> tuple[int, int]:
    """(intersection, union) sums of the aggregated Jaccard index for one image."""
    g, p = gt.ravel().astype(np.int64), pred.ravel().astype(np.int64)
    ng, npr = int(g.max()), int(p.max())
    m = (g > 0) & (p > 0)
    inter = np.bincount(g[m] * (npr + 1) + p[m], minlength=(ng + 1) * (npr + 1)).reshape(ng + 1, npr + 1)[1:, 1:]
    ga, pa = np.bincount(g, minlength=ng + 1)[1:], np.bincount(p, minlength=npr + 1)[1:]
    if ng == 0:
        return 0, int(pa.sum())
    union = ga[:, None] + pa[None, :] - inter
    iou = inter / np.maximum(union, 1)
    best = iou.argmax(1) if npr else np.zeros(ng, np.int64)
    i_sum = int(inter[np.arange(ng), best].sum()) if npr else 0
    u_sum = int(union[np.arange(ng), best].sum()) if npr else int(ga.sum())
    used = np.zeros(npr, bool)
    if npr:
        used[best[inter[np.arange(ng), best] > 0]] = True
    return i_sum, u_sum + int(pa[~used].sum())


def main() -> None:
    from helpers_segment import match_iou

    from dirl.segment import base

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--backends", nargs="+", default=["watershed", "unet"])
    ap.add_argument("--settings", default="{}", help="backend parameters as JSON (those a backend has)")
    args = ap.parse_args()
    names = sorted(p.stem for p in (args.data / "labels").glob("*.npy"))
    images = [np.asarray(Image.open(args.data / "images" / f"{n}.png").convert("RGB")) for n in names]
    data = list(zip(images, [np.load(args.data / "labels" / f"{n}.npy") for n in names]))
    out: dict[str, object] = {"data": args.data.name, "images": len(data), "nuclei": int(sum(g.max() for _, g in data))}
    for name in args.backends:
        tp = n_true = n_pred = i_sum = u_sum = inter = total = 0
        t0 = time.perf_counter()
        with base.create(name, {"threads": 2, **json.loads(args.settings)}) as b:
            for rgb, gt in data:
                pred = b.segment(rgb[None], MPP)[0].astype(np.int64)
                t, g, p = match_iou(gt, pred)
                tp, n_true, n_pred = tp + t, n_true + g, n_pred + p
                i, u = aji(gt, pred)
                i_sum, u_sum = i_sum + i, u_sum + u
                inter += int(((gt > 0) & (pred > 0)).sum())
                total += int((gt > 0).sum() + (pred > 0).sum())
        precision, recall = tp / max(n_pred, 1), tp / max(n_true, 1)
        out[name] = {
            "f1_iou50": round(2 * precision * recall / max(precision + recall, 1e-9), 4),
            "precision_iou50": round(precision, 4),
            "recall_iou50": round(recall, 4),
            "aji": round(i_sum / max(u_sum, 1), 4),
            "dice_foreground": round(2 * inter / max(total, 1), 4),
            "segmented": n_pred,
            "seconds_per_image": round((time.perf_counter() - t0) / len(data), 3),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
