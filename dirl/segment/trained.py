"""`phenotypes.source: trained`: cell classes learnt from typed examples, applied to every segmented nucleus.

The examples are the sample sheet's `cell_labels` files: typed points as QuPath's Points tool exports them
(classified Point/MultiPoint annotations) or typed nuclei in any layout the import backend reads
(dirl.segment.nuclei_files). A point labels the segmented nucleus that contains it; a polygon the one it
overlaps best (at least a third of the polygon); the others are counted as unmatched and reported. Each
matched nucleus is classified from the crop around it by a small CNN trained on the fly
(dirl.segment.nucleus_cnn, `classifier: cnn`), or from dirl.segment.nucleus_features (shape, stain, rings
around it, chromatin, neighbourhood) by a class-balanced L2 logistic regression (`classifier: logistic`).
Either is first validated by slide (grouped k-fold: confusion matrix, balanced accuracy, per-class recall),
then fitted on every example. The model is numbers in model.json: no pickle, readable anywhere.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from dirl import store
from dirl.errors import DirlError
from dirl.segment import nucleus_features

log = logging.getLogger(__name__)
MIN_OVERLAP = 1 / 3  # share of an example polygon a segmented nucleus must cover to take its label


def tile_of(points: np.ndarray, coords: np.ndarray, side: float) -> np.ndarray:
    """Index of a tile containing each level-0 point (-1: in no tile)."""
    out = np.full(len(points), -1, np.int64)
    for s in range(0, len(points), 2048):
        p = points[s : s + 2048]
        inside = (
            (p[:, None, 0] >= coords[None, :, 0])
            & (p[:, None, 0] < coords[None, :, 0] + side)
            & (p[:, None, 1] >= coords[None, :, 1])
            & (p[:, None, 1] < coords[None, :, 1] + side)
        )
        hit = inside.any(1)
        out[s : s + len(p)] = np.where(hit, inside.argmax(1), -1)
    return out


def match_examples(contents: Any, tiles: store.TileStore, cells: Path) -> tuple[np.ndarray, list[str], dict[str, int]]:
    """(row of the cells table each example labels, its type name, counts) for one slide's examples; row
    -1 where no segmented nucleus takes it."""
    labels = store.open_map(cells, "labels", len(tiles))
    tab = store.read_nuclei(cells, ["tile", "label"])
    row_of = {(int(t), int(lab)): i for i, (t, lab) in enumerate(zip(tab["tile"], tab["label"]))}
    side = float(tiles.attrs["tile_px_level0"])
    scale = side / tiles.tile_px
    names, rows = [], []
    pts = np.asarray(contents.points.xy, np.float64).reshape(-1, 2)
    t_of = tile_of(pts, tiles.coords, side) if len(pts) else np.zeros(0, np.int64)
    for (x, y), name, t in zip(pts.tolist(), contents.points.names, t_of.tolist()):
        r = -1
        if t >= 0:
            c, rr = int((x - tiles.coords[t, 0]) / scale), int((y - tiles.coords[t, 1]) / scale)
            lab = int(labels[t, min(rr, tiles.tile_px - 1), min(c, tiles.tile_px - 1)])
            r = row_of.get((t, lab), -1) if lab else -1
        rows.append(r)
        names.append(name)
    nuc = contents.nuclei
    if len(nuc):
        from skimage.draw import polygon as fill_polygon

        centres = (nuc.boxes[:, :2] + nuc.boxes[:, 2:]) / 2
        t_of = tile_of(centres, tiles.coords, side)
        for i, t in enumerate(t_of.tolist()):
            r = -1
            if t >= 0:
                p = nuc.polygon(i)
                x0, y0 = tiles.coords[t]
                rr, cc = fill_polygon((p[:, 1] - y0) / scale - 0.5, (p[:, 0] - x0) / scale - 0.5, (tiles.tile_px,) * 2)
                if len(rr):
                    under = np.asarray(labels[t])[rr, cc]
                    counts = np.bincount(under[under > 0])
                    if counts.size and counts.max() >= MIN_OVERLAP * len(rr):
                        r = row_of.get((t, int(counts.argmax())), -1)
            rows.append(r)
            names.append(nuc.names[i])
    rows_a = np.asarray(rows, np.int64)
    counts = {"examples": len(rows_a), "matched": int((rows_a >= 0).sum()), "unmatched": int((rows_a < 0).sum())}
    return rows_a, names, counts


def example_features(tiles: store.TileStore, cells: Path, rows: np.ndarray) -> np.ndarray:
    """nucleus_features.matrix of the cells table's `rows`, computed tile by tile."""
    tab = store.read_nuclei(cells)
    labels = store.open_map(cells, "labels", len(tiles))
    out = np.zeros((len(rows), len(nucleus_features.NAMES)), np.float32)
    by_tile: dict[int, list[int]] = {}
    for j, r in enumerate(rows.tolist()):
        by_tile.setdefault(int(tab["tile"][r]), []).append(j)
    for t, js in by_tile.items():
        sel = np.flatnonzero(tab["tile"] == t)
        part = {k: v[sel] for k, v in tab.items()}
        order = np.argsort(part["label"])
        part = {k: v[order] for k, v in part.items()}
        lab = np.asarray(labels[t])
        f = nucleus_features.matrix(tiles.tile(t), relabelled(lab, part["label"]), tiles.mpp, part)
        pos = {int(lab_id): i for i, lab_id in enumerate(part["label"])}
        for j in js:
            out[j] = f[pos[int(tab["label"][rows[j]])]]
    return out


def relabelled(lab: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The label map with label ids[i] renumbered i + 1 (and ids not listed cleared)."""
    lut = np.zeros(int(max(lab.max(), ids.max(initial=0))) + 1, np.int32)
    lut[np.asarray(ids, np.int64)] = np.arange(1, len(ids) + 1)
    return lut[lab]


# --------------------------------------------------------------------------------------------------
def fit_classifier(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0):
    from sklearn.linear_model import LogisticRegression

    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 1e-9, std, 1.0)
    m = LogisticRegression(max_iter=5000, class_weight="balanced", random_state=seed)
    m.fit((x - mean) / std, y)
    coef = np.zeros((n_classes, x.shape[1]))
    bias = np.full(n_classes, -1e9)  # a class with no example never wins
    coef[m.classes_] = m.coef_ if len(m.classes_) > 2 else np.stack([-m.coef_[0], m.coef_[0]]) / 2
    bias[m.classes_] = m.intercept_ if len(m.classes_) > 2 else np.array([-m.intercept_[0], m.intercept_[0]]) / 2
    return {"mean": mean.tolist(), "std": std.tolist(), "coef": coef.tolist(), "bias": bias.tolist()}


def predict(model: dict[str, Any], x: np.ndarray) -> np.ndarray:
    z = (np.asarray(x, np.float64) - np.asarray(model["mean"])) / np.asarray(model["std"])
    return (
        np.argmax(z @ np.asarray(model["coef"]).T + np.asarray(model["bias"]), axis=1) if len(z) else np.zeros(0, int)
    )


def example_crops(tiles: store.TileStore, cells: Path, rows: np.ndarray) -> np.ndarray:
    """nucleus_cnn.crops around the cells table's `rows`, tile by tile."""
    from dirl.segment import nucleus_cnn

    tab = store.read_nuclei(cells, ["tile", "cx", "cy"])
    out = np.zeros((len(rows), nucleus_cnn.CROP_PX, nucleus_cnn.CROP_PX, 3), np.uint8)
    t_of = tab["tile"][rows]
    colour = nucleus_cnn.slide_colour(tiles)
    for t in np.unique(t_of).tolist():
        js = np.flatnonzero(t_of == t)
        out[js] = nucleus_cnn.crops(tiles.tile(t), tab["cx"][rows[js]], tab["cy"][rows[js]], tiles.mpp, colour)
    return out


class Learner:
    """How the chosen classifier is fitted and applied to the examples' inputs (crops or features)."""

    def __init__(self, kind: str, n_classes: int, seed: int, epochs: int, threads: int) -> None:
        self.kind, self.n_classes, self.seed, self.epochs, self.threads = kind, n_classes, seed, epochs, threads

    def fit(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        if self.kind == "cnn":
            from dirl.segment import nucleus_cnn

            return nucleus_cnn.fit(x, y, self.n_classes, self.epochs, self.seed, self.threads)
        return {
            "kind": "logistic regression, class-balanced, standardised features",
            **fit_classifier(x, y, self.n_classes, self.seed),
        }

    def predict(self, clf: dict[str, Any], x: np.ndarray) -> np.ndarray:
        if self.kind == "cnn":
            from dirl.segment import nucleus_cnn

            return nucleus_cnn.predict(nucleus_cnn.load(clf), x)
        return predict(clf, x)


def validate(x: np.ndarray, y: np.ndarray, groups: np.ndarray, classes: list[str], learner: Learner) -> dict[str, Any]:
    """Grouped k-fold (k = min(5, groups)): every example predicted by a model that saw none of its group."""
    from sklearn.model_selection import GroupKFold

    from dirl.probe.protocols import metrics

    k = min(5, len(np.unique(groups)))
    if k < 2:
        return {"folds": 0, "note": "one group only: no validation by slide (label two slides or more)"}
    pred = np.zeros_like(y)
    for tr, te in GroupKFold(k).split(x, y, groups):
        pred[te] = learner.predict(learner.fit(x[tr], y[tr]), x[te])
        log.info("validation fold: %d examples of %d slides predicted", len(te), len(np.unique(groups[te])))
    return {"folds": k, "by": "slide", **metrics(y, pred, classes)}


def fit_trained(
    cells: list[Path],
    tiles: list[Path | None],
    cell_labels: dict[str, str],
    type_classes: tuple[str, ...],
    unknown_types: str,
    min_examples: int,
    seed: int,
    classifier: str = "cnn",
    epochs: int = 30,
    threads: int = 2,
) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The trained phenotype model (as `phenotype.fit` returns a model): (model dict, the examples' table
    rows, their store index, their class)."""
    from dirl.segment.nuclei_files import read_file
    from dirl.segment.sampling import SUMMARY, VERSION
    from dirl.segment.typed_classes import type_mapping

    xs, names, src, rows_all, per_slide = [], [], [], [], {}
    for i, (c, t) in enumerate(zip(cells, tiles)):
        sid = store.map_attrs(c, "labels").get("slide_id")
        if sid not in cell_labels or t is None:
            continue
        ts = store.open_tiles(t)
        if ts.failed or not len(ts):
            continue
        contents = read_file(
            cell_labels[sid], slide_mpp=ts.attrs.get("slide_mpp"), magnification=ts.attrs.get("objective_power")
        )
        rows, kinds, counts = match_examples(contents, ts, c)
        per_slide[sid] = counts
        ok = rows >= 0
        log.info("slide %s: %d examples, %d on a segmented nucleus", sid, counts["examples"], counts["matched"])
        if ok.any():
            inputs = example_crops if classifier == "cnn" else example_features
            xs.append(inputs(ts, c, rows[ok]))
            names += [k for k, m in zip(kinds, ok) if m]
            src.append(np.full(int(ok.sum()), i))
            rows_all.append(rows[ok])
    if not names:
        raise DirlError(
            "phenotypes.source trained: no example lies on a segmented nucleus (the sample sheet's cell_labels: "
            "points or nuclei in level-0 pixels of their slide)"
        )
    mapping = type_mapping(sorted(set(names)), type_classes, unknown_types)
    classes = sorted({v for v in mapping.values() if v is not None})
    keep = np.array([mapping[n] is not None for n in names])
    y = np.array([classes.index(mapping[n]) if mapping[n] is not None else -1 for n in names])
    x, groups = np.concatenate(xs)[keep], np.concatenate(src)[keep]
    y = y[keep]
    few = {c: int((y == k).sum()) for k, c in enumerate(classes) if (y == k).sum() < min_examples}
    if few:
        raise DirlError(
            f"phenotypes.source trained: class(es) {few} have fewer than phenotypes.min_examples = {min_examples} "
            "examples on segmented nuclei: label more, merge them (type_classes) or lower min_examples"
        )
    learner = Learner(classifier, len(classes), seed, epochs, threads)
    report = validate(x, y, groups, classes, learner)
    clf = learner.fit(x, y)
    rows = np.concatenate(rows_all)[keep]
    src_rows = groups
    tab = _rows_table(cells, src_rows, rows)
    summary = []
    for k, name in enumerate(classes):
        sel = y == k
        summary.append(
            {
                "id": k,
                "prior_value": k + store.FIRST_CELL_PRIOR,
                "n": int(sel.sum()),
                "fraction": float(sel.mean()),
                "description": name,
                "types": [t for t, c in mapping.items() if c == name],
                "mean": {f: float(tab[f][sel].mean()) if sel.any() else float("nan") for f in SUMMARY},
                "sd": {f: float(tab[f][sel].std()) if sel.any() else float("nan") for f in SUMMARY},
            }
        )
    if report.get("folds"):
        log.info(
            "validated by slide (%d folds): balanced accuracy %.3f, recall %s",
            report["folds"],
            report["balanced_accuracy"],
            {c: round(v, 3) if v is not None else None for c, v in report["per_class_recall"].items()},
        )
    model = {
        "version": VERSION,
        "method": "trained",
        "k": len(classes),
        "seed": seed,
        "features": list(nucleus_features.NAMES) if classifier == "logistic" else [],
        "classifier": clf,
        "mean": [],
        "std": [],
        "centroids": [[] for _ in classes],
        "classes": summary,
        "type_classes": {t: (classes.index(c) if c is not None else -1) for t, c in mapping.items()},
        "validation": report,
        "examples": per_slide,
        "prior_values": {
            "0": "background (glass)",
            "1": "non-nuclear tissue",
            **{str(k + store.FIRST_CELL_PRIOR): f"class {k}: {n}" for k, n in enumerate(classes)},
        },
        "sample": {"requested": None, "used": int(len(y)), "total_nuclei": int(len(y)), "slides": len(per_slide)},
        "cells": [str(p) for p in cells],
    }
    return model, tab, src_rows, y


def _rows_table(cells: list[Path], src: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    from dirl.segment.sampling import SUMMARY

    columns = sorted({"tile", "label", "cx", "cy", "border", *SUMMARY})
    parts = {c: np.zeros(len(rows), np.float64) for c in columns}
    for i in np.unique(src).tolist():
        t = store.read_nuclei(cells[i], columns)
        sel = src == i
        for c in columns:
            parts[c][sel] = t[c][rows[sel]]
    return parts
