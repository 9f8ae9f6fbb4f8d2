"""Nucleus detection on real H&E with expert centres: ../shared/data/crc-typed-train (70 colorectal images,
20x, 15,533 typed nuclei). Each image is segmented whole (one 500 px tile at 0.5 µm/px) by a backend and
compared with the expert centres:

- recall: share of expert centres inside a segmented nucleus (per type too: large pale epithelial nuclei
  are what a classical segmenter misses);
- F1 at 6 px: segmented centroids matched one-to-one to expert centres within 6 px (Hungarian); as only
  ~75 % of the nuclei are typed, precision is a lower bound;
- merges: share of segmented nuclei holding two or more expert centres;
- splits: share of expert centres with two or more segmented centroids within 4 µm (a nucleus cut in two).

    .venv/bin/python bench/nuclei_crc.py [--images img1 img2 ...] [--settings JSON]

Prints one JSON line (with the same-run time per image). Not a test: the figures are measured here and
quoted in bench/RESULTS.md and the README.

The unet backend's shipped network was trained on these images: measure it with `--fold-weights DIR`, the
networks `python -m dirl.segment.unet_train ... --fold-weights DIR` kept, each image segmented by the one
that never saw it (validated by image):

    .venv/bin/python bench/nuclei_crc.py --backend unet --fold-weights /tmp/unet-folds
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "crc-typed-train"
MPP = 0.5
SPLIT_UM = 4.0  # two segmented centroids this close to one expert centre: one nucleus cut in two


def load(root: Path = SHARED, images: list[str] | None = None) -> list[tuple[str, np.ndarray, np.ndarray, list[str]]]:
    import csv

    pts: dict[str, list] = {}
    with open(root / "nuclei.tsv") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            pts.setdefault(row["image"], []).append((float(row["x"]), float(row["y"]), row["type"]))
    names = images or sorted(pts, key=lambda s: int(s[3:]))
    out = []
    for n in names:
        rgb = np.asarray(Image.open(root / "images" / f"{n}.png").convert("RGB"))
        xy = np.array([(x, y) for x, y, _ in pts[n]], np.float64)
        out.append((n, rgb, xy, [t for _, _, t in pts[n]]))
    return out


def match(centroids: np.ndarray, truth: np.ndarray, radius: float = 6.0) -> int:
    """One-to-one matches within `radius` px (Hungarian on the distance matrix)."""
    from scipy.optimize import linear_sum_assignment

    if not len(centroids) or not len(truth):
        return 0
    d = np.hypot(*(centroids[:, None, :] - truth[None, :, :]).transpose(2, 0, 1))
    cost = np.where(d <= radius, d, 1e6)
    r, c = linear_sum_assignment(cost)
    return int((cost[r, c] <= radius).sum())


def evaluate(labels: np.ndarray, xy: np.ndarray, types: list[str]) -> dict[str, object]:
    from scipy import ndimage
    from scipy.spatial import cKDTree

    h, w = labels.shape
    ix = np.clip(np.floor(xy[:, 0]).astype(int), 0, w - 1)
    iy = np.clip(np.floor(xy[:, 1]).astype(int), 0, h - 1)
    hit = labels[iy, ix]
    ids = np.unique(labels[labels > 0])
    cents = (
        np.array(ndimage.center_of_mass(np.ones_like(labels), labels, ids))[:, ::-1] if len(ids) else np.zeros((0, 2))
    )
    per = Counter(hit[hit > 0].tolist())
    near = cKDTree(cents).query_ball_point(xy, SPLIT_UM / MPP, return_length=True) if len(cents) else np.zeros(len(xy))
    return {
        "inside": int((hit > 0).sum()),
        "n_true": len(xy),
        "n_seg": len(ids),
        "matched": match(cents, xy),
        "merged": sum(1 for v in per.values() if v >= 2),
        "split": int((np.asarray(near) >= 2).sum()),
        "by_type": {
            t: (int(((hit > 0) & (np.array(types) == t)).sum()), int((np.array(types) == t).sum())) for t in set(types)
        },
    }


def main() -> None:
    from dirl.segment import base

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", nargs="*")
    p.add_argument("--backend", default="watershed")
    p.add_argument("--settings", default="{}", help="backend parameters as JSON")
    p.add_argument("--fold-weights", type=Path, help="unet: per-fold networks (fold*.npz), each image by its fold's")
    args = p.parse_args()
    data = load(images=args.images)
    opts = {"threads": 2, **json.loads(args.settings)}
    weights: dict[str, str] = {}  # image -> its fold's weights file (none: the settings')
    if args.fold_weights:
        from dirl.segment.unet_train import held_out_weights

        weights = held_out_weights(args.fold_weights)
    tot: Counter = Counter()
    by_type: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    backends: dict[str, base.Backend] = {}
    for name, rgb, xy, types in data:
        w_file = weights.get(name, "")
        if w_file not in backends:
            backends[w_file] = base.create(args.backend, {**opts, **({"weights": w_file} if w_file else {})})
        backend = backends[w_file]
        h, w = rgb.shape[:2]
        side = max(h, w)
        tile = np.full((side, side, 3), 255, np.uint8)
        tile[:h, :w] = rgb
        lab = backend.segment(tile[None], MPP)[0][:h, :w]
        r = evaluate(lab, xy, types)
        for k in ("inside", "n_true", "n_seg", "matched", "merged", "split"):
            tot[k] += r[k]
        for t, (a, b) in r["by_type"].items():
            by_type.setdefault(t, [0, 0])
            by_type[t][0] += a
            by_type[t][1] += b
    dt = time.perf_counter() - t0
    for b in backends.values():
        b.close()
    precision = tot["matched"] / max(tot["n_seg"], 1)
    recall6 = tot["matched"] / max(tot["n_true"], 1)
    print(
        json.dumps(
            {
                "backend": args.backend,
                "settings": opts,
                "images": len(data),
                "recall_inside": round(tot["inside"] / tot["n_true"], 4),
                "recall_by_type": {t: round(a / b, 4) for t, (a, b) in sorted(by_type.items())},
                "f1_6px": round(2 * precision * recall6 / max(precision + recall6, 1e-9), 4),
                "precision_6px_lower_bound": round(precision, 4),
                "recall_6px": round(recall6, 4),
                "merged_fraction": round(tot["merged"] / max(tot["n_seg"], 1), 4),
                "split_fraction": round(tot["split"] / max(tot["n_true"], 1), 4),
                "seconds_per_image": round(dt / len(data), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
