"""Real labelled tissue for the probe, from images with typed nucleus centres (../shared/data/crc-typed-train).

Each image is cut into a grid of `--px` crops, and a crop is labelled by the majority expert type of the
nuclei whose centre lies in it (at least `--min-nuclei` of them and a strict majority; other crops are left
out). Group = the source image, so no image straddles two splits. Writes `<out>/crops/*.png` and
`<out>/manifest.tsv` (path, label, group[, split]) for `probe.datasets.<name>.manifest`.

    .venv/bin/python bench/probe_data.py --out /tmp/crc96 --px 96 [--images img1 img2 ...]

With `--cohort`, the experiment of bench/PROBE.md: the images split by image (seeded) into probe
train / val / test, the manifest says so, and the train and val images become single-image slides
(`<out>/slides/<image>.tiff`, pyramid-less tiled JPEG TIFF at 0.5 µm/px, as a scanner writes) listed in
`<out>/samples.tsv` with the real CMU slide: the unlabelled cohort pretraining sees. The test images are
never pretrained on. Prints a JSON line: crops per label, images, the crops left out.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "crc-typed-train"


def read_nuclei(tsv: Path) -> dict[str, list[tuple[float, float, str]]]:
    out: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    with open(tsv) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            out[row["image"]].append((float(row["x"]), float(row["y"]), row["type"]))
    return out


def build(
    out: Path,
    px: int,
    min_nuclei: int = 3,
    images: list[str] | None = None,
    root: Path = SHARED,
    split_of: dict[str, str] | None = None,
) -> dict[str, object]:
    nuclei = read_nuclei(root / "nuclei.tsv")
    names = images or sorted(nuclei, key=lambda s: int(s[3:]) if s[3:].isdigit() else s)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    rows, counts, left = [], Counter(), Counter()
    for name in names:
        img = np.asarray(Image.open(root / "images" / f"{name}.png").convert("RGB"))
        h, w = img.shape[:2]
        pts = nuclei.get(name, [])
        for y0 in range(0, h - px + 1, px):
            for x0 in range(0, w - px + 1, px):
                # centre pixel (x, y) lies in the crop when x0 <= x < x0 + px (0-based pixel indices)
                inside = [t for x, y, t in pts if x0 <= x < x0 + px and y0 <= y < y0 + px]
                votes = Counter(inside).most_common()
                if len(inside) < min_nuclei:
                    left["too few nuclei"] += 1
                    continue
                if len(votes) > 1 and votes[0][1] == votes[1][1] or votes[0][1] * 2 <= len(inside):
                    left["no majority"] += 1
                    continue
                label = votes[0][0]
                path = out / "crops" / f"{name}_{x0}_{y0}.png"
                Image.fromarray(img[y0 : y0 + px, x0 : x0 + px]).save(path)
                rows.append((f"crops/{path.name}", label, name))
                counts[label] += 1
    with open(out / "manifest.tsv", "w") as f:
        if split_of:
            f.write("path\tlabel\tgroup\tsplit\n" + "".join(f"{p}\t{lab}\t{g}\t{split_of[g]}\n" for p, lab, g in rows))
        else:
            f.write("path\tlabel\tgroup\n" + "".join(f"{p}\t{lab}\t{g}\n" for p, lab, g in rows))
    return {"crops": dict(sorted(counts.items())), "images": len(names), "left_out": dict(left), "px": px}


def split_images(names: list[str], seed: int = 0, val: float = 0.2, test: float = 0.3) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(sorted(names)))
    n_test, n_val = round(len(order) * test), round(len(order) * val)
    return {n: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, n in enumerate(order)}


def image_slide(png: Path, tiff: Path, mpp: float = 0.5) -> None:
    """One image as a slide OpenSlide reads: tiled, JPEG-compressed, its resolution in the TIFF tags."""
    import tifffile

    rgb = np.asarray(Image.open(png).convert("RGB"))
    px_per_cm = 1e4 / mpp
    tifffile.imwrite(
        tiff,
        rgb,
        tile=(256, 256),
        compression="jpeg",
        compressionargs={"level": 95},
        resolution=(px_per_cm, px_per_cm),
        resolutionunit="CENTIMETER",
        photometric="rgb",
    )


def cohort(out: Path, px: int, min_nuclei: int, seed: int, root: Path = SHARED) -> dict[str, object]:
    names = sorted({p.stem for p in (root / "images").glob("*.png")}, key=lambda s: int(s[3:]))
    split_of = split_images(names, seed)
    summary = build(out, px, min_nuclei, names, root, split_of)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    sheet = ["slide_id\tpath"]
    cmu = root.parent / "slides" / "CMU-1-Small-Region.svs"
    if cmu.exists():
        sheet.append(f"CMU-1-Small-Region\t{cmu}")
    for n in names:
        if split_of[n] != "test":  # never pretrain on the probe's test images
            image_slide(root / "images" / f"{n}.png", out / "slides" / f"{n}.tiff")
            sheet.append(f"{n}\t{out / 'slides' / f'{n}.tiff'}")
    (out / "samples.tsv").write_text("\n".join(sheet) + "\n")
    (out / "splits.json").write_text(json.dumps(split_of, indent=1) + "\n")
    return {**summary, "pretrain_slides": len(sheet) - 1, "splits": dict(Counter(split_of.values()))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--px", type=int, default=96, help="crop side, px (0.5 µm/px: 96 px = 48 µm)")
    p.add_argument("--min-nuclei", type=int, default=3)
    p.add_argument("--images", nargs="*", help="image names (default: all)")
    p.add_argument("--cohort", action="store_true", help="also the pretraining cohort and the split by image")
    p.add_argument("--seed", type=int, default=0, help="of the split by image (--cohort)")
    args = p.parse_args()
    if args.cohort:
        print(json.dumps(cohort(args.out, args.px, args.min_nuclei, args.seed)))
    else:
        print(json.dumps(build(args.out, args.px, args.min_nuclei, args.images)))


if __name__ == "__main__":
    main()
