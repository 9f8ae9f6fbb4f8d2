"""`dirl phenotype`: cohort-level cell classes from the nuclei of all slides.

The paper typed nuclei with HoVer-Net's five PanNuke classes; without a typed segmenter, unsupervised
classes stand in for them. K-means (`k` classes, fixed `n_init`, `random_state=seed`) on standardised
features of the nucleus and what surrounds it (FEATURES: chromatin, size, shape, stain, the colour of the
rim around it, how many and how large its neighbours; computed from the tiles, dirl.segment.nucleus_features)
of a bounded random sample of nuclei (`sample`, drawn uniformly over all
nuclei of all slides with `seed`; nuclei cut by a tile edge are left out of the fit because their shape
is truncated). Classes are ordered by mean area, so class 0 is the smallest nuclei; the prior value of
class c is c + 2 (0 background, 1 non-nuclear tissue).

model.json holds everything needed to classify any nucleus later (feature names and transforms, mean,
std, centroids in standardised space) and, to make the classes interpretable, per-class summaries and
an automatic description. The gallery PNG shows example nuclei of each class with the class means.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dirl import store
from dirl.errors import DirlError
from dirl.segment.sampling import SUMMARY, VERSION, sample_nuclei
from dirl.settings import Settings, bounded

log = logging.getLogger(__name__)

# (name in model.json, column, transform): the nucleus and what surrounds it (dirl.segment.nucleus_features,
# computed from the tiles). Chosen by greedy forward selection of nucleus_features.NAMES for NMI against the
# expert types on the even-numbered crc-typed-train images, and measured on the odd ones: NMI 0.239 against
# 0.137 for the six shape and stain columns of the cells table used before (area, eccentricity, solidity,
# H and E OD, H OD spread); 0.26 against 0.14 on all 70 (bench/classify_crc.json).
FEATURES: tuple[tuple[str, str, str], ...] = (
    ("h_p90", "h_p90", "identity"),  # darkest chromatin
    ("log_neighbour_area_um2", "neighbour_area_um2", "log"),  # how large the nuclei around are
    ("ring3_r", "ring3_r", "identity"),  # red of the 3 µm around it: cytoplasm or stroma
    ("log_minor_um", "minor_um", "log"),
    ("h_od", "h_od", "identity"),
    ("neighbours30", "neighbours30", "identity"),  # crowding
    ("h_od_ring", "h_od_ring", "identity"),
    ("circularity", "circularity", "identity"),
    ("ring3_b", "ring3_b", "identity"),
)


def feature_matrix(table: dict[str, np.ndarray], spec: list[list[str]] | tuple = FEATURES) -> np.ndarray:
    cols = []
    for _, col, tr in spec:
        v = np.asarray(table[col], dtype=np.float64)
        if tr == "log":
            v = np.log(np.maximum(v, 1e-6))
        elif tr != "identity":
            raise DirlError(f"unknown feature transform {tr!r} in the phenotype model")
        cols.append(v)
    return np.stack(cols, 1) if cols else np.zeros((0, 0))


@dataclass(frozen=True)
class PhenotypeSettings(Settings):
    """The `phenotypes` section's keys that fit the cell classes (the others paint the prior maps)."""

    k: int = bounded(4, ge=1)  # number of cell classes
    sample: int = bounded(50000, ge=1)  # nuclei sampled over the cohort for the fit
    seed: int = 0
    n_init: int = bounded(10, ge=1)  # k-means restarts
    source: str = field(
        default="kmeans",
        metadata={
            "choices": ("kmeans", "imported", "trained"),
            "help": "kmeans: classes fitted on the nucleus and what surrounds it; imported: the nuclei's types "
            "(segmentation backend "
            "import); trained: a classifier learnt from the sample sheet's cell_labels (typed points or nuclei)",
        },
    )
    type_classes: tuple[
        str, ...
    ] = ()  # sources imported, trained: "type=class" ("type=-": tissue); empty: a class each
    min_examples: int = bounded(20, ge=1)  # source trained: fewest examples a class may have
    classifier: str = field(
        default="cnn",
        metadata={
            "choices": ("cnn", "logistic"),
            "help": "source trained: a small CNN on the crop around each nucleus, or a logistic regression on "
            "31 hand-made nucleus features",
        },
    )
    epochs: int = bounded(30, ge=1)  # source trained, classifier cnn: passes over the examples per fit
    unknown_types: str = field(
        default="error",
        metadata={
            "choices": ("error", "drop", "other"),
            "help": "source imported: the types type_classes "
            "does not name are an error, dropped (tissue) or one class `other`",
        },
    )


@dataclass
class PhenotypeModel:
    k: int
    spec: list[list[str]]
    mean: np.ndarray
    std: np.ndarray
    centroids: np.ndarray  # (k, F) in standardised units
    raw: dict[str, Any]
    _net: Any = field(default=None, repr=False)  # the trained CNN, built on first use

    @classmethod
    def load(cls, path: str | os.PathLike) -> PhenotypeModel:
        path = Path(path)
        if not path.exists():
            raise DirlError(f"phenotype model {path} does not exist: run `dirl phenotype` first")
        try:
            d = json.loads(path.read_text())
            return cls(
                int(d["k"]),
                [list(f) for f in d["features"]],
                np.asarray(d["mean"], float),
                np.asarray(d["std"], float),
                np.asarray(d["centroids"], float),
                d,
            )
        except (ValueError, KeyError, TypeError) as e:
            raise DirlError(f"phenotype model {path} is not a dirl model.json ({e}); rerun `dirl phenotype`") from e

    def standardise(self, table: dict[str, np.ndarray]) -> np.ndarray:
        return (feature_matrix(table, self.spec) - self.mean) / self.std

    @property
    def needs_pixels(self) -> bool:
        """Whether classifying a nucleus takes its tile's pixels: the trained classifier, or k-means on what
        surrounds the nucleus (a model fitted before that reads the cells table only)."""
        return self.raw.get("method") == "trained" or bool(pixel_columns(self.spec))

    def slide_context(self, tiles: store.TileStore) -> Any:
        """What predict_tiles needs of the whole slide: the CNN's colour statistics (None otherwise)."""
        from dirl.segment import nucleus_cnn

        return nucleus_cnn.slide_colour(tiles) if self.raw.get("classifier", {}).get("kind") == "cnn" else None

    def predict_tiles(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        mpp: float,
        tables: Sequence[dict[str, np.ndarray]],
        context: Any = None,
        pool: Executor | None = None,
    ) -> list[np.ndarray]:
        """Class of each row of each tile's `tables` (the models that look around each nucleus);
        `context`: slide_context of the tiles' slide; `pool` maps the per-tile work (crops, features). The
        CNN takes the block's nuclei in this thread with torch's own threads (pool threads each calling torch
        would run threads x threads on the cores)."""
        from dirl.segment import nucleus_cnn, nucleus_features, trained

        run = pool.map if pool is not None else map
        clf = self.raw.get("classifier", {})
        if not len(tables):
            return []
        if clf.get("kind") == "cnn":
            if self._net is None:
                self._net = nucleus_cnn.load(clf)
            um = float(clf["crop_um"])
            xs = list(run(lambda im, t: nucleus_cnn.crops(im, t["cx"], t["cy"], mpp, context, um), images, tables))
            probs = np.split(nucleus_cnn.proba(self._net, np.concatenate(xs)), np.cumsum([len(x) for x in xs])[:-1])
            return [trained.classes(clf, p, t["cx"] * mpp, t["cy"] * mpp) for p, t in zip(probs, tables)]

        if self.raw.get("method") == "trained":  # the logistic regression, on the features it was fitted on
            names = self.raw["features"]
            xs = run(lambda im, lab, t: nucleus_features.of_tile(im, lab, mpp, t, names), images, labels, tables)
            return [
                trained.classes(clf, trained.proba(clf, x), t["cx"] * mpp, t["cy"] * mpp) for x, t in zip(xs, tables)
            ]
        around = pixel_columns(self.spec)  # k-means: only the features it reads (the others are in the table)
        xs = run(lambda im, lab, t: nucleus_features.of_tile(im, lab, mpp, t, around), images, labels, tables)
        return [self.predict({**t, **dict(zip(around, x.T))}) for x, t in zip(xs, tables)]

    def predict(self, table: dict[str, np.ndarray], type_names: list[str] | None = None) -> np.ndarray:
        """Class 0..k-1 of every row: nearest centroid in standardised space, or with imported types
        (`type_names`: the cells store's) the class of the row's type, -1 for a dropped type."""
        if self.raw.get("method") == "trained" or not set(pixel_columns(self.spec)) <= set(table):
            raise DirlError("this phenotype model reads the tiles' pixels around each nucleus: use predict_tiles")
        if self.raw.get("method") == "imported":
            from dirl.segment.typed_classes import imported_classes

            return imported_classes(self.raw["type_classes"], type_names, table["type"])
        z = self.standardise(table)
        if len(z) == 0:
            return np.zeros(0, dtype=np.int64)
        d = ((z[:, None, :] - self.centroids[None]) ** 2).sum(-1)
        return d.argmin(1)


def _describe(means: dict[str, float], all_means: dict[str, float], all_sd: dict[str, float]) -> str:
    """Words for a class from where its means sit relative to the whole sample (±0.5 sd)."""

    def z(k: str) -> float:
        return (means[k] - all_means[k]) / max(all_sd[k], 1e-9)

    size = "small" if z("area_um2") < -0.5 else "large" if z("area_um2") > 0.5 else "medium"
    tone = "dark" if z("h_od") > 0.5 else "pale" if z("h_od") < -0.5 else "mid-dark"
    shape = "elongated" if z("eccentricity") > 0.5 else "round" if z("eccentricity") < -0.5 else "oval"
    return f"{size} {tone} {shape}"


def pixel_columns(spec: Sequence[Sequence[str]]) -> list[str]:
    """The columns of a feature spec computed from the tiles (not in the cells table)."""
    from dirl.segment import nucleus_features

    return [c for _, c, _ in spec if c in nucleus_features.CONTEXT]


def fit(
    cells: list[Path],
    tiles: Sequence[Path | None] | None = None,
    *,
    k: int = 4,
    sample: int = 50000,
    seed: int = 0,
    n_init: int = 10,
    features: Sequence[tuple[str, str, str]] = FEATURES,
) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Fit the classes on `features` (`tiles`: each cells store's tile store, for the features around each
    nucleus). Returns (model dict, sampled table, store index per row, class per row)."""
    from sklearn.cluster import KMeans

    from dirl.segment import nucleus_features

    if k < 1:
        raise DirlError(f"phenotypes.k must be at least 1, got {k}")
    table_columns = [c for _, c, _ in features if c not in pixel_columns(features)]
    columns = sorted(set(["tile", "label", "cx", "cy", "border", "row"] + table_columns + list(SUMMARY)))
    tab, src, total = sample_nuclei(cells, sample, seed, columns)
    m = len(tab["tile"])
    if m < k:
        raise DirlError(
            f"only {m} nuclei in {len(cells)} cells store(s), fewer than phenotypes.k={k}: "
            "check the segmentation (overlays) or lower k"
        )
    tiles = _match_tiles(cells, None) if tiles is None and pixel_columns(features) else tiles
    pixels = pixel_columns(features)
    around = np.zeros((m, len(pixels)), np.float32)
    for i in np.unique(src).tolist() if pixels else []:
        if tiles is None or tiles[i] is None:
            raise DirlError(f"phenotypes: k-means reads the pixels around each nucleus, and {cells[i]} has no tiles")
        sel = src == i
        around[sel] = nucleus_features.of_rows(store.open_tiles(tiles[i]), cells[i], tab["row"][sel], pixels)
    tab.update(dict(zip(pixels, around.T)))
    x = feature_matrix(tab, features)
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 1e-9, std, 1.0)
    z = (x - mean) / std
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(z)
    # stable class ids: order by mean area (then mean H OD for ties)
    raw_area = np.array([tab["area_um2"][km.labels_ == c].mean() for c in range(k)])
    raw_h = np.array([tab["h_od"][km.labels_ == c].mean() for c in range(k)])
    order = np.lexsort((raw_h, raw_area))
    centroids = km.cluster_centers_[order]
    remap = np.empty(k, int)
    remap[order] = np.arange(k)
    cls = remap[km.labels_]
    all_means = {c: float(tab[c].mean()) for c in SUMMARY}
    all_sd = {c: float(tab[c].std()) for c in SUMMARY}
    classes = []
    for c in range(k):
        sel = cls == c
        means = {f: float(tab[f][sel].mean()) for f in SUMMARY}
        classes.append(
            {
                "id": c,
                "prior_value": c + 2,
                "n": int(sel.sum()),
                "fraction": float(sel.mean()),
                "description": _describe(means, all_means, all_sd),
                "mean": means,
                "sd": {f: float(tab[f][sel].std()) for f in SUMMARY},
            }
        )
    model = {
        "version": VERSION,
        "method": "kmeans",
        "k": k,
        "seed": seed,
        "n_init": n_init,
        "features": [list(f) for f in features],
        "mean": mean.tolist(),
        "std": std.tolist(),
        "centroids": centroids.tolist(),
        "classes": classes,
        "prior_values": {
            "0": "background (glass)",
            "1": "non-nuclear tissue",
            **{str(c + 2): f"class {c}: {classes[c]['description']}" for c in range(k)},
        },
        "sample": {
            "requested": sample,
            "used": m,
            "total_nuclei": total,
            "slides": len(cells),
            "excluded": "nuclei touching a tile edge, unless too few others",
        },
        "cells": [str(p) for p in cells],
        "inertia": float(km.inertia_),
    }
    return model, tab, src, cls


def write_gallery(
    path: str | os.PathLike,
    model: dict[str, Any],
    tab: dict[str, np.ndarray],
    src: np.ndarray,
    cls: np.ndarray,
    cells: list[Path],
    tiles: list[Path | None],
    *,
    per_class: int = 10,
    crop_um: float = 24.0,
    seed: int = 0,
) -> None:
    """A grid of example nuclei per class (rows), with their contour, titled with the class means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    from dirl import store
    from dirl.store import atomic_path

    rng = np.random.default_rng(seed)
    k = int(model["k"])
    opened: dict[int, tuple[Any, Any, float]] = {}

    def crop(row: int) -> np.ndarray | None:
        i = int(src[row])
        if tiles[i] is None:
            return None
        if i not in opened:
            ts = store.open_tiles(tiles[i])
            opened[i] = (ts, store.open_map(cells[i], "labels", len(ts)), ts.mpp)
        ts, labels, mpp = opened[i]
        t = int(tab["tile"][row])
        img = ts.tile(t)
        lab = np.asarray(labels[t])
        half = max(4, round(crop_um / mpp / 2))
        cy, cx = round(float(tab["cy"][row])), round(float(tab["cx"][row]))
        pad = ((half, half), (half, half))
        img = np.stack([np.pad(img[..., c], pad, constant_values=255) for c in range(3)], -1)
        lab = np.pad(lab, pad)
        win = (slice(cy, cy + 2 * half), slice(cx, cx + 2 * half))
        im, lb = img[win].copy(), lab[win] == int(tab["label"][row])
        im[find_boundaries(lb, mode="inner")] = (0, 255, 0)
        return im

    fig, axes = plt.subplots(k, per_class, figsize=(per_class * 1.1, k * 1.35 + 0.4), squeeze=False)
    for c in range(k):
        rows = np.flatnonzero(cls == c)
        rows = rng.choice(rows, size=min(per_class, len(rows)), replace=False) if len(rows) else rows
        for j in range(per_class):
            ax = axes[c, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < len(rows):
                im = crop(int(rows[j]))
                if im is not None:
                    ax.imshow(im, interpolation="nearest")
        info = model["classes"][c]
        mu = info["mean"]
        axes[c, 0].set_title(
            f"class {c} (prior {c + 2}): {info['description']} - n={info['n']}, "
            f"area {mu['area_um2']:.0f} µm², ecc {mu['eccentricity']:.2f}, sol {mu['solidity']:.2f}, "
            f"H {mu['h_od']:.2f}, E {mu['e_od']:.2f}",
            loc="left",
            fontsize=8,
        )
    fig.suptitle(
        f"nucleus classes: k-means k={k} on {model['sample']['used']} nuclei "
        f"of {model['sample']['slides']} slide(s), seed {model['seed']}",
        fontsize=9,
    )
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.5 / fig.get_figheight(), hspace=0.35, wspace=0.05)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def write_validation(path: str | os.PathLike, model: dict[str, Any]) -> None:
    """The trained classifier's validation by slide: its confusion matrix (rows: the examples' class,
    normalised), balanced accuracy and per-class recall; for the other sources, what their classes are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dirl.store import atomic_path

    v = model.get("validation") or {}
    names = [c["description"] for c in model["classes"]]
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 3, 0.9 * len(names) + 1.8))
    if v.get("folds"):
        cm = np.asarray(v["confusion"], float)
        ax.imshow(cm / np.maximum(cm.sum(1, keepdims=True), 1), vmin=0, vmax=1, cmap="Blues")
        for (i, j), n in np.ndenumerate(cm):
            ax.text(j, i, int(n), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("example's class")
        recall = ", ".join(f"{c} {r:.2f}" for c, r in v["per_class_recall"].items() if r is not None)
        wo = v.get("without_context")
        alone = f" ({wo['balanced_accuracy']:.3f} without the nuclei around)" if wo else ""
        ax.set_title(
            f"validated by slide ({v['folds']} folds, {v['n']} examples): balanced accuracy "
            f"{v['balanced_accuracy']:.3f}{alone}\nrecall: {recall}",
            fontsize=8,
        )
    else:
        ax.axis("off")
        what = {"kmeans": "k-means clusters", "imported": "the imported types"}.get(model.get("method"), "")
        ax.text(0.5, 0.5, v.get("note") or f"cell classes are {what}: nothing to validate", ha="center", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _match_tiles(cells: list[Path], tiles: list[str] | None) -> list[Path | None]:
    """The tile store of each cells store: by slide_id, else by position, else the `tiles` attr."""
    ids = []
    for p in cells:
        a = store.map_attrs(p, "cells")
        ids.append((a.get("slide_id"), a.get("tiles")))
    if not tiles:
        return [Path(t) if t and Path(t).exists() else None for _, t in ids]
    by_id = {store.open_tiles(t).slide_id: Path(t) for t in tiles}
    out = [by_id.get(str(sid)) for sid, _ in ids]
    if any(o is None for o in out) and len(tiles) == len(cells):
        out = [Path(t) for t in tiles]
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cells", nargs="+", help="cells stores of all slides (results/<cohort>/cells/*.zarr)")
    p.add_argument(
        "--tiles",
        nargs="*",
        help="their tile stores (the pixels around each nucleus, the gallery), matched by slide_id",
    )
    p.add_argument("--out", required=True, help="model.json to write")
    p.add_argument("--gallery", help="PNG of example nuclei per class")
    p.add_argument("--validation", help="PNG of the trained classifier's validation by slide")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for training the classifier")
    p.add_argument(
        "--cell-labels",
        nargs="+",
        action="extend",
        default=[],
        metavar="SLIDE=FILE",
        help="source trained: a slide's typed examples (QuPath points, or typed nuclei as the import backend reads)",
    )
    PhenotypeSettings.add_arguments(p.add_argument_group("settings (PhenotypeSettings)"))


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    return [args.out, args.gallery, args.validation], [
        *args.cells,
        *(args.tiles or []),
        *(i.partition("=")[2] for i in args.cell_labels),
    ]


def main(args: argparse.Namespace) -> None:
    from dirl.store import atomic_path

    s = PhenotypeSettings.from_args(args)
    cells = [Path(c) for c in args.cells]
    if s.source == "imported":
        from dirl.segment.typed_classes import fit_imported

        model, tab, src, cls = fit_imported(cells, s.type_classes, s.unknown_types, s.sample, s.seed)
    elif s.source == "trained":
        from dirl.segment.trained import fit_trained

        labels = dict(item.split("=", 1) for item in args.cell_labels)
        model, tab, src, cls = fit_trained(
            cells,
            _match_tiles(cells, args.tiles),
            labels,
            s.type_classes,
            s.unknown_types,
            s.min_examples,
            s.seed,
            s.classifier,
            s.epochs,
            args.threads,
        )
    else:
        tiles = _match_tiles(cells, args.tiles)
        model, tab, src, cls = fit(cells, tiles, k=s.k, sample=s.sample, seed=s.seed, n_init=s.n_init)
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(model, indent=1))
    for c in model["classes"]:
        log.info(
            "class %d (prior %d): %-26s n=%d area %.0f µm² H %.2f",
            c["id"],
            c["prior_value"],
            c["description"],
            c["n"],
            c["mean"]["area_um2"],
            c["mean"]["h_od"],
        )
    if args.validation:
        write_validation(args.validation, model)
    if args.gallery:
        write_gallery(args.gallery, model, tab, src, cls, cells, _match_tiles(cells, args.tiles), seed=s.seed)
