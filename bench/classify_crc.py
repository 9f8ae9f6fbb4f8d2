"""The nucleus classifier (`phenotypes.source: trained`) on real H&E: ../shared/data/crc-typed-train's 70
colorectal images (each its own slide, 500 px at 0.5 µm/px), the expert centres as QuPath typed points.

Measured, in one run: the classifier's balanced accuracy and per-class recall validated by image (5-fold
grouped, as `dirl phenotype` validates); k-means (source kmeans) against the expert types (NMI, adjusted
Rand); and what the classifier costs: the priors stage with the trained model against the same stage with
k-means classes (its features and prediction are the extra work), both against the segment stage.

    .venv/bin/python bench/classify_crc.py [--images N]
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


def main() -> None:
    import sys

    from PIL import Image
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_segment import write_tiles
    from test_trained import points_file

    from dirl import store
    from dirl.cli import main as cli

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=70)
    args = p.parse_args()
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
            assert cli(["segment", str(t), str(c), "--threads", "2"]) == 0
            t_seg += time.perf_counter() - t0
            cells.append(str(c))
            tiles.append(str(t))
            labels.append(f"{n}={points_file(d / f'{n}.geojson', pts[n])}")
        trained = d / "trained.json"
        opts = json.dumps({"source": "trained", "min_examples": 10})
        argv = [
            "phenotype",
            *cells,
            "--tiles",
            *tiles,
            "--out",
            str(trained),
            "--cell-labels",
            *labels,
            "--settings",
            opts,
        ]
        assert cli(argv) == 0
        model = json.loads(trained.read_text())
        kmeans = d / "kmeans.json"
        assert cli(["phenotype", *cells, "--out", str(kmeans), "--settings", json.dumps({"k": 4})]) == 0
        t_prior = {"trained": 0.0, "kmeans": 0.0}
        truth, km_cls = [], []
        for n, t, c in zip(names, tiles, cells):
            for kind, m in (("trained", trained), ("kmeans", kmeans)):
                t0 = time.perf_counter()
                assert cli(["priors", t, c, str(m), str(d / f"{n}.{kind}.priors.zarr"), "--threads", "2"]) == 0
                t_prior[kind] += time.perf_counter() - t0
            # k-means classes of the nuclei that hold exactly one expert centre, against that centre's type
            lab = np.asarray(store.open_map(c, "labels")[0])
            tab = store.read_nuclei(c, ["label"])
            cls, _ = store.read_nucleus_classes(d / f"{n}.kmeans.priors.zarr")
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
                    km_cls.append(int(cls[row[v]]))
    v = model["validation"]
    print(
        json.dumps(
            {
                "images": len(names),
                "trained_validated_by_image": {
                    "balanced_accuracy": round(v["balanced_accuracy"], 4),
                    "macro_f1": round(v["macro_f1"], 4),
                    "per_class_recall": {k: round(x, 4) for k, x in v["per_class_recall"].items()},
                    "examples_matched": sum(s["matched"] for s in model["examples"].values()),
                    "examples": sum(s["examples"] for s in model["examples"].values()),
                },
                "kmeans_vs_expert_types": {
                    "nmi": round(float(normalized_mutual_info_score(truth, km_cls)), 4),
                    "ari": round(float(adjusted_rand_score(truth, km_cls)), 4),
                    "nuclei": len(truth),
                },
                "seconds": {"segment": round(t_seg, 2), **{f"priors_{k}": round(x, 2) for k, x in t_prior.items()}},
                "classifier_cost_vs_segment": round((t_prior["trained"] - t_prior["kmeans"]) / t_seg, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
