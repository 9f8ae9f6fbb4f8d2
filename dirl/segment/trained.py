"""`phenotypes.source: trained`: cell classes learnt from typed examples, applied to every segmented nucleus.

The examples are the sample sheet's `cell_labels` files: typed points as QuPath's Points tool exports them
(classified Point/MultiPoint annotations) or typed nuclei in any layout the import backend reads
(dirl.segment.nuclei_files). A point labels the segmented nucleus that contains it; a polygon the one it
overlaps best (at least a third of the polygon); the others are counted as unmatched and reported. Each
matched nucleus is classified from the crop around it by a small CNN trained on the fly
(dirl.segment.nucleus_cnn, `classifier: cnn`), or from dirl.segment.nucleus_features (shape, stain, rings
around it, chromatin, neighbourhood) by a class-balanced L2 logistic regression (`classifier: logistic`).
Either gives class probabilities, read together with those of the nuclei around (dirl.segment.context). The
classifier is first validated by slide (grouped k-fold): every nucleus of the tiles holding a slide's examples
gets its probabilities from a network that saw none of that slide's examples, and the context model is fitted
on those out-of-fold probabilities (so it learns how far the network is to be trusted on slides it never saw)
and validated with the same folds: confusion matrix, balanced accuracy, per-class recall, and the balanced
accuracy without the context. Then both are fitted on every example. The model is numbers in model.json: no
pickle, readable anywhere.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from dirl import store
from dirl.errors import DirlError
from dirl.segment import context, nucleus_features

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


def _logits(model: dict[str, Any], x: np.ndarray) -> np.ndarray:
    z = (np.asarray(x, np.float64).reshape(len(x), -1) - np.asarray(model["mean"])) / np.asarray(model["std"])
    return z @ np.asarray(model["coef"]).T + np.asarray(model["bias"])


def predict(model: dict[str, Any], x: np.ndarray) -> np.ndarray:
    return np.argmax(_logits(model, x), axis=1) if len(x) else np.zeros(0, int)


def proba(model: dict[str, Any], x: np.ndarray) -> np.ndarray:
    from scipy.special import softmax

    return softmax(_logits(model, x), axis=1) if len(x) else np.zeros((0, len(model["bias"])))


def classes(clf: dict[str, Any], probs: np.ndarray, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    """Class of one tile's nuclei from their class probabilities: read with the nuclei around them when the
    classifier has a context model (dirl.segment.context), else the likeliest."""
    ctx = clf.get("context")
    if ctx is None or not len(probs):
        return np.argmax(probs, axis=1) if len(probs) else np.zeros(0, np.int64)
    return predict(ctx, context.features(probs, x_um, y_um, float(ctx["radius_um"])))


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

    # read with the nuclei around (dirl.segment.context): the CNN only, the logistic regression's features
    # already describe the neighbourhood (with context, validated by image on crc: 0.635 -> 0.627)
    WITH_CONTEXT = ("cnn",)

    def __init__(self, kind: str, n_classes: int, seed: int, epochs: int, threads: int) -> None:
        self.kind, self.n_classes, self.seed, self.epochs, self.threads = kind, n_classes, seed, epochs, threads
        self.context = kind in self.WITH_CONTEXT

    def fit(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        if self.kind == "cnn":
            from dirl.segment import nucleus_cnn

            return nucleus_cnn.fit(x, y, self.n_classes, self.epochs, self.seed, self.threads)
        return {
            "kind": "logistic regression, class-balanced, standardised features",
            **fit_classifier(x, y, self.n_classes, self.seed),
        }

    def proba(self, clf: dict[str, Any], x: np.ndarray) -> np.ndarray:
        if self.kind == "cnn":
            from dirl.segment import nucleus_cnn

            return nucleus_cnn.proba(nucleus_cnn.load(clf), x)
        return proba(clf, x)


@dataclasses.dataclass
class Examples:
    """The examples' nuclei (with a context model: every nucleus of the tiles that hold an example, its
    neighbours), and which of them are the examples."""

    x: np.ndarray  # the classifier's input of each nucleus (crops or features)
    slide: np.ndarray  # index of its slide
    tile: np.ndarray  # a key of its tile, unique over slides
    x_um: np.ndarray  # its centre within the tile, µm
    y_um: np.ndarray
    example: np.ndarray  # indices of the examples into the above
    y: np.ndarray  # the examples' classes


def validate(ex: Examples, classes: list[str], learner: Learner) -> tuple[dict[str, Any], np.ndarray | None]:
    """Grouped k-fold by slide (k = min(5, slides)): every nucleus of a slide's example tiles is given class
    probabilities by a network that saw none of its slide's examples; the context model is validated on those
    with the same folds, and kept only where it validates at least as well. (report, the examples' out-of-fold
    context features: None without validation or context)."""
    from sklearn.model_selection import GroupKFold

    from dirl.probe.protocols import metrics

    groups = ex.slide[ex.example]
    k = min(5, len(np.unique(groups)))
    if k < 2:
        return {"folds": 0, "note": "one group only: no validation by slide (label two slides or more)"}, None
    folds = list(GroupKFold(k).split(ex.example, ex.y, groups))
    probs = np.zeros((len(ex.x), len(classes)))
    for tr, te in folds:
        clf = learner.fit(ex.x[ex.example[tr]], ex.y[tr])
        held = np.isin(ex.slide, groups[te])
        probs[held] = learner.proba(clf, ex.x[held])
        log.info("validation fold: %d examples of %d slides predicted", len(te), len(np.unique(groups[te])))
    alone = metrics(ex.y, probs[ex.example].argmax(1), classes)
    if not learner.context:
        return {"folds": k, "by": "slide", **alone}, None
    feats = context.by_tile(probs, ex.tile, ex.x_um, ex.y_um, context.RADIUS_UM)[ex.example]
    pred = np.zeros_like(ex.y)
    for tr, te in folds:
        pred[te] = predict(fit_classifier(feats[tr], ex.y[tr], len(classes)), feats[te])
    report = {"folds": k, "by": "slide", **metrics(ex.y, pred, classes)}
    if report["balanced_accuracy"] < alone["balanced_accuracy"]:  # e.g. two slides of other tissue: not applied
        note = f"the nuclei around validated lower ({report['balanced_accuracy']:.3f}): not used"
        return {"folds": k, "by": "slide", **alone, "context": note}, None
    report["without_context"] = {m: alone[m] for m in ("balanced_accuracy", "macro_f1", "per_class_recall")}
    return report, feats


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

    names, src, rows_all, per_slide = [], [], [], {}
    xs, slide, tile, x_um, y_um, example = [], [], [], [], [], []
    n_near = tile_base = 0
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
            tab = store.read_nuclei(c, ["tile", "cx", "cy"])
            if classifier in Learner.WITH_CONTEXT:  # every nucleus of those tiles: the examples' neighbours
                near = np.flatnonzero(np.isin(tab["tile"], tab["tile"][rows[ok]]))
            else:
                near = np.unique(rows[ok])
            inputs = example_crops if classifier == "cnn" else nucleus_features.of_rows
            xs.append(inputs(ts, c, near))
            slide.append(np.full(len(near), i))
            tile.append(tab["tile"][near].astype(np.int64) + tile_base)
            x_um.append(tab["cx"][near] * ts.mpp)
            y_um.append(tab["cy"][near] * ts.mpp)
            example.append(n_near + np.searchsorted(near, rows[ok]))
            n_near, tile_base = n_near + len(near), tile_base + len(ts)
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
    groups = np.concatenate(src)[keep]
    y = y[keep]
    few = {c: int((y == k).sum()) for k, c in enumerate(classes) if (y == k).sum() < min_examples}
    if few:
        raise DirlError(
            f"phenotypes.source trained: class(es) {few} have fewer than phenotypes.min_examples = {min_examples} "
            "examples on segmented nuclei: label more, merge them (type_classes) or lower min_examples"
        )
    cat = np.concatenate
    ex = Examples(cat(xs), cat(slide), cat(tile), cat(x_um), cat(y_um), cat(example)[keep], y)
    learner = Learner(classifier, len(classes), seed, epochs, threads)
    report, feats = validate(ex, classes, learner)
    clf = learner.fit(ex.x[ex.example], y)
    if feats is not None:  # read with the nuclei around (dirl.segment.context), fitted out of fold
        clf["context"] = {"radius_um": context.RADIUS_UM, **fit_classifier(feats, y, len(classes), seed)}
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
            "validated by slide (%d folds): balanced accuracy %.3f%s, recall %s",
            report["folds"],
            report["balanced_accuracy"],
            f" ({report['without_context']['balanced_accuracy']:.3f} without the nuclei around)"
            if feats is not None
            else "",
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
