"""The nucleus classifier (`phenotypes.source: trained`) on real H&E: ../shared/data/crc-typed-train's 70
colorectal images (each its own slide, 500 px at 0.5 µm/px), the expert centres as QuPath typed points.

Measured, in one run: each classifier's (`phenotypes.classifier`: cnn, logistic) balanced accuracy and
per-class recall validated by image (5-fold grouped, as `dirl phenotype` validates), with and without the
nuclei around each nucleus (dirl.segment.context: same folds, so the same run is the baseline), and its
fitting time; k-means (source kmeans, and its former table-only features as the baseline) against the
expert types (NMI, adjusted Rand); and what applying a model costs: the priors stage with it against the
same stage with the table-only k-means, which reads no pixels (crops and the CNN, or the features around
each nucleus, are the extra work), both against the segment stage, on one slide of 280 tiles of 224 px cut
from the same images (a cohort's slides hold hundreds of tiles: the one-tile slides the classifiers are
validated on would measure each stage's start-up instead).

    .venv/bin/python bench/classify_crc.py [--images N] > bench/classify_crc.json   # ~25 min on 2 cores
    .venv/bin/python bench/classify_crc.py --backend unet --fold-weights /tmp/unet-folds > bench/classify_crc_unet.json
    .venv/bin/python bench/classify_crc.py --apply-only > bench/classify_crc_apply.json   # ~2 min

(--apply-only: only the cost of applying each model, with models fitted in one epoch on 3 images: what a
network's weights are does not change its cost.)

(--fold-weights: the networks `python -m dirl.segment.unet_train --fold-weights` kept, so that no image is
segmented by a network trained on its nuclei.)
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CRC = ROOT.parent / "shared" / "data" / "crc-typed-train"


CLASSIFIERS = ("cnn", "logistic")
BASE = "kmeans_table"  # k-means on the cells table's columns only: the priors stage reading no pixels
TABLE_ONLY = (  # its features: the k-means default before nucleus_features' context was used
    ("log_area_um2", "area_um2", "log"),
    ("eccentricity", "eccentricity", "identity"),
    ("solidity", "solidity", "identity"),
    ("h_od", "h_od", "identity"),
    ("e_od", "e_od", "identity"),
    ("h_od_std", "h_od_std", "identity"),
)


def validation(model: dict) -> dict:
    v = model["validation"]
    return {
        "balanced_accuracy": round(v["balanced_accuracy"], 4),
        "macro_f1": round(v["macro_f1"], 4),
        "per_class_recall": {k: round(x, 4) for k, x in v["per_class_recall"].items()},
        **(
            {
                "without_context_balanced_accuracy": round(v["without_context"]["balanced_accuracy"], 4),
                "without_context_per_class_recall": {
                    k: round(x, 4) for k, x in v["without_context"]["per_class_recall"].items()
                },
            }
            if "without_context" in v
            else {}
        ),
        "examples_matched": sum(s["matched"] for s in model["examples"].values()),
        "examples": sum(s["examples"] for s in model["examples"].values()),
    }


def main() -> None:
    import sys

    from PIL import Image
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_segment import write_tiles
    from test_trained import points_file

    from dirl import store
    from dirl.cli import main as cli
    from dirl.segment import phenotype

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=70)
    p.add_argument("--backend", default="watershed", help="segmentation backend")
    p.add_argument("--fold-weights", type=Path, help="unet: each image segmented by the fold network that never saw it")
    p.add_argument("--apply-only", action="store_true", help="only what applying each classifier costs")
    args = p.parse_args()
    if args.apply_only:
        args.images = 3
    weights: dict[str, str] = {}
    if args.fold_weights:
        from dirl.segment.unet_train import held_out_weights

        weights = held_out_weights(args.fold_weights)
    pts: dict[str, dict[str, list]] = {}
    with open(CRC / "nuclei.tsv") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            pts.setdefault(r["image"], {}).setdefault(r["type"], []).append((float(r["x"]) + 0.5, float(r["y"]) + 0.5))
    names = sorted(pts, key=lambda s: int(s[3:]))[: args.images]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        cells, tiles, labels = [], [], []
        t_seg = 0.0
        for n in names:
            rgb = np.asarray(Image.open(CRC / "images" / f"{n}.png").convert("RGB"))
            t = write_tiles(d / f"{n}.zarr", rgb[None], np.array([[0, 0]]), mpp=0.5, slide_id=n)
            c = d / f"{n}.cells.zarr"
            t0 = time.perf_counter()
            extra = ["--weights", weights[n]] if n in weights else []
            assert cli(["segment", str(t), str(c), "--threads", "2", "--backend", args.backend, *extra]) == 0
            t_seg += time.perf_counter() - t0
            cells.append(str(c))
            tiles.append(str(t))
            labels.append(f"{n}={points_file(d / f'{n}.geojson', pts[n])}")
        models, t_fit = {}, {}
        for clf in CLASSIFIERS:
            quick = {"epochs": 1} if args.apply_only else {}
            opts = json.dumps({"source": "trained", "min_examples": 10, "classifier": clf, **quick})
            out = d / f"trained_{clf}.json"
            argv = ["phenotype", *cells, "--tiles", *tiles, "--out", str(out), "--cell-labels", *labels]
            t0 = time.perf_counter()
            assert cli([*argv, "--settings", opts, "--threads", "2"]) == 0
            t_fit[clf] = time.perf_counter() - t0
            models[clf] = out
        classifiers = dict(models)
        models["kmeans"] = d / "kmeans.json"
        argv = ["phenotype", *cells, "--tiles", *tiles, "--out", str(models["kmeans"]), "--settings", '{"k": 4}']
        assert cli(argv) == 0
        # the baseline: k-means on six columns of the cells table (the default before), no pixels read
        models[BASE] = d / f"{BASE}.json"
        models[BASE].write_text(json.dumps(phenotype.fit([Path(c) for c in cells], k=4, features=TABLE_ONLY)[0]))
        if args.apply_only:
            per_tile = stage_times(d, sorted(pts, key=lambda s: int(s[3:])), models, args.backend)
            print(json.dumps({"slide_of_224px_tiles": per_tile, "cost_vs_segment": cost(per_tile, models)}))
            return
        t_prior = {k: 0.0 for k in models}
        truth, km_cls = [], {k: [] for k in ("kmeans", BASE)}
        for n, t, c in zip(names, tiles, cells):
            for kind, m in models.items():
                t0 = time.perf_counter()
                assert cli(["priors", t, c, str(m), str(d / f"{n}.{kind}.priors.zarr"), "--threads", "2"]) == 0
                t_prior[kind] += time.perf_counter() - t0
            # k-means classes of the nuclei that hold exactly one expert centre, against that centre's type
            lab = np.asarray(store.open_map(c, "labels")[0])
            tab = store.read_nuclei(c, ["label"])
            cls = {k: store.read_nucleus_classes(d / f"{n}.{k}.priors.zarr")[0] for k in km_cls}
            row = {int(v): i for i, v in enumerate(tab["label"])}
            hits: dict[int, list[str]] = {}
            for typ, ps in pts[n].items():
                for x, y in ps:
                    v = int(lab[min(int(y), 499), min(int(x), 499)])
                    if v:
                        hits.setdefault(v, []).append(typ)
            for v, ts in hits.items():
                if len(ts) == 1 and v in row:
                    truth.append(ts[0])
                    for k in km_cls:
                        km_cls[k].append(int(cls[k][row[v]]))
        validated = {clf: validation(json.loads(m.read_text())) for clf, m in classifiers.items()}
        per_tile = stage_times(d, names, models, args.backend)
    print(
        json.dumps(
            {
                "images": len(names),
                "segmentation": args.backend + (" (fold networks, validated by image)" if weights else ""),
                "trained_validated_by_image": validated,
                "kmeans_vs_expert_types": {
                    k: {
                        "nmi": round(float(normalized_mutual_info_score(truth, v)), 4),
                        "ari": round(float(adjusted_rand_score(truth, v)), 4),
                        "nuclei": len(truth),
                    }
                    for k, v in km_cls.items()
                },
                "seconds": {
                    "segment": round(t_seg, 2),
                    **{f"fit_{k}": round(x, 2) for k, x in t_fit.items()},
                    **{f"priors_{k}": round(x, 2) for k, x in t_prior.items()},
                },
                "slide_of_224px_tiles": per_tile,
                "cost_vs_segment": cost(per_tile, models),
            }
        )
    )


def cost(per_tile: dict, models: dict) -> dict[str, float]:
    """What each model adds to the segment stage: (priors with it - priors with the table-only k-means, which
    reads no pixels) / segment."""
    base, seg = per_tile[f"priors_{BASE}_s"], per_tile["segment_s"]
    return {k: round((per_tile[f"priors_{k}_s"] - base) / seg, 3) for k in models if k != BASE}


def stage_times(d: Path, names: list[str], models: dict[str, Path], backend: str) -> dict:
    """Seconds of the segment stage and of the priors stage with each model on one slide of 224 px tiles
    (2 x 2 from each 500 px image), best of 2 runs each (the first also warms the caches)."""
    import sys

    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_segment import write_tiles

    from dirl.cli import main as cli

    side = 224
    imgs, coords = [], []
    for i, n in enumerate(names):
        rgb = np.asarray(Image.open(CRC / "images" / f"{n}.png").convert("RGB"))
        for y in (0, side):
            for x in (0, side):
                imgs.append(rgb[y : y + side, x : x + side])
                coords.append((i * 500 + x, y))
    t = str(write_tiles(d / "slide.zarr", np.stack(imgs), np.array(coords), mpp=0.5, slide_id="slide"))
    c = str(d / "slide.cells.zarr")

    def best(argv: list[str]) -> float:
        out = []
        for _ in range(2):
            t0 = time.perf_counter()
            assert cli(argv) == 0
            out.append(time.perf_counter() - t0)
        return min(out)

    res = {"tiles": len(imgs), "segment_s": best(["segment", t, c, "--threads", "2", "--backend", backend])}
    for kind, m in models.items():
        res[f"priors_{kind}_s"] = best(["priors", t, c, str(m), str(d / f"slide.{kind}.priors.zarr"), "--threads", "2"])
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}


if __name__ == "__main__":
    main()
