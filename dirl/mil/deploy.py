"""A trained cohort's MIL models on new slides: external validation (`deploy:` in a cohort config), and
`dirl predict` for a slide or a list.

    dirl deploy --model results/tcga/mil/dirl/abmil --use final --features results/ext/features/dirl \
        --samples ext_samples.tsv --out results/ext/deploy/dirl/abmil

The new slides' features must come from the encoder the models were trained on (the workflow extracts them
with the trained cohort's `model.json` encoder spec) and from tiles of the same µm/px and size (checked
at start-up, dirl.mil.deploy.plan). `use: final` applies the model trained on every labelled slide,
`use: folds` the mean of the fold models' probabilities (and attention). Writes `predictions.csv` (slide,
patient, label if any, probabilities, prediction), `attention.npz` (per slide, tile rows), and, where the
new sheet has labels, `metrics.json` with AUC, balanced accuracy and macro F1 and their 95 % intervals
from resampling patients, and `roc.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dirl.errors import ConfigError
from dirl.mil.final import FINAL, read_model_json

log = logging.getLogger(__name__)
USES = ("final", "folds")
N_HEATMAPS = 4


# --------------------------------------------------------------------------------------------------
# start-up: what a deployment of a trained cohort needs, checked before any job
@dataclass
class Plan:
    pairs: dict[tuple[str, str], Path]  # (source, model) -> the trained model directory
    specs: dict[str, dict[str, Any]]  # source -> encoder spec
    classes: list[str]
    use: str = "final"
    meta: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)


def plan(deploy: dict[str, Any], tiling: dict[str, Any], labels: list[str]) -> Plan:
    """Every check a deployment can fail, each one line: the trained cohort, its sources and models (and their
    final models with `use: final`), the new labels among the trained classes, the same tiles."""
    root = Path(deploy["from"])
    mil = root / "mil"
    if not mil.is_dir():
        raise ConfigError(f"deploy.from {root}: no mil/ directory: not a trained cohort's results directory")
    have = {p.parent.parent.name: None for p in mil.glob("*/*/model.json")}
    sources = list(deploy.get("sources") or sorted(have))
    missing = [s for s in sources if s not in have]
    if missing or not sources:
        raise ConfigError(f"deploy.sources {missing or sources}: {mil} has MIL models of {sorted(have)} only")
    use = deploy.get("use", "final")
    pairs, specs, meta, classes = {}, {}, {}, None
    for source in sources:
        models = list(deploy.get("models") or sorted(p.parent.name for p in (mil / source).glob("*/model.json")))
        for model in models:
            d = mil / source / model
            if not (d / "model.json").exists():
                raise ConfigError(
                    f"deploy.models: {d} has no trained {model} (model.json); trained: "
                    f"{sorted(p.name for p in (mil / source).iterdir())}"
                )
            m = read_model_json(d)
            if use == "final" and not m.get("final"):
                raise ConfigError(
                    f"deploy.use final: {d} has no final model (train it with mil.final: true), or use: folds"
                )
            if not m.get("encoder_spec"):
                raise ConfigError(f"{d}/model.json records no encoder spec: rerun the trained cohort's MIL")
            spec = specs.setdefault(source, m["encoder_spec"])
            if spec != m["encoder_spec"]:
                raise ConfigError(f"deploy: the {source} models of {mil / source} were trained on different encoders")
            if classes is None:
                classes = m["classes"]
            elif m["classes"] != classes:
                raise ConfigError(f"deploy: {d} was trained on classes {m['classes']}, others on {classes}")
            geo = m["tiles"]
            if geo["mpp"] is not None and (
                abs(float(geo["mpp"]) - tiling["mpp"]) > 1e-6 or int(geo["tile_px"]) != tiling["tile_px"]
            ):
                raise ConfigError(
                    f"deploy: {d} was trained on {geo['tile_px']} px tiles at {geo['mpp']:g} µm/px, this cohort's "
                    f"tiling is {tiling['tile_px']} px at {tiling['mpp']:g} µm/px: set tiling.mpp and tiling.tile_px "
                    "to the trained ones"
                )
            pairs[(source, model)] = d
            meta[(source, model)] = m
    unknown = sorted(set(labels) - set(classes or []))
    if unknown:
        raise ConfigError(f"deploy: labels {unknown} of the sample sheet are not among the trained classes {classes}")
    return Plan(pairs, specs, list(classes or []), use, meta)


# --------------------------------------------------------------------------------------------------
# applying the models
def load_models(directory: Path, use: str) -> list[Any]:
    import torch

    from dirl.mil.models import Standardized, build

    meta = read_model_json(directory)
    paths = [directory / meta["final"]["model"]] if use == "final" else [directory / f["model"] for f in meta["folds"]]
    out = []
    for p in paths:
        ck = torch.load(p, map_location="cpu", weights_only=False)
        core = build(ck["model"], ck["in_dim"], len(ck["classes"]), **ck["options"])
        d = ck["in_dim"]
        model = Standardized(core, torch.zeros(d), torch.ones(d))
        model.load_state_dict(ck["state_dict"])  # the standardisation of its training slides, in its buffers
        out.append(model.eval())
    return out


def apply(models: list[Any], x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(class probabilities, tile attention) of one bag: the mean over `models` (one, or the folds)."""
    import torch

    probs, atts = [], []
    with torch.inference_mode():
        t = torch.from_numpy(np.asarray(x, np.float32))
        for m in models:
            logits, a = m(t)
            probs.append(torch.softmax(logits.float(), -1).numpy())
            if a is not None:
                atts.append(a.float().numpy())
    return np.mean(probs, 0), (np.mean(atts, 0) if atts else None)


def patient_bootstrap(
    y: np.ndarray, prob: np.ndarray, patients: list[str], n_boot: int = 1000, seed: int = 0
) -> dict[str, list[float] | None]:
    """95 % intervals of AUC, balanced accuracy and macro F1, patients resampled with replacement."""
    from dirl.mil.metrics import compute_metrics

    codes, inverse = np.unique(np.asarray(patients), return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(codes))]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"auc": [], "balanced_accuracy": [], "f1_macro": []}
    for _ in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(codes), len(codes))])
        if len(np.unique(y[idx])) < 2:
            continue
        m = compute_metrics(y[idx], prob[idx])
        for k in draws:
            draws[k].append(m[k])
    return {k: ([float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None) for k, v in draws.items()}


def deploy(
    directory: Path, use: str, features: Path, samples: str, out: Path, tiles: Path | None = None
) -> dict[str, Any]:
    from dirl import store
    from dirl.mil.metrics import compute_metrics, json_safe, plot_roc, write_predictions
    from dirl.mil.splits import write_json
    from dirl.samples import read_samples

    meta = read_model_json(directory)
    classes = meta["classes"]
    models = load_models(directory, use)
    rows, attention, skipped, where = [], {}, [], {}
    for s in read_samples(samples):
        path = features / f"{s.slide_id}.h5"
        x, coords, attrs = store.read_features(path)
        if meta.get("encoder") and attrs.get("encoder") != meta["encoder"]:
            raise ConfigError(
                f"{path} was extracted by {attrs.get('encoder')}, the models by {meta['encoder']}: rerun extraction"
            )
        if not len(x):
            skipped.append(s.slide_id)
            continue
        p, a = apply(models, x)
        if a is not None:
            attention[s.slide_id] = a
        where[s.slide_id] = (coords, int(attrs.get("patch_size_level0") or attrs["patch_size"]))
        rows.append(
            {
                "slide_id": s.slide_id,
                "patient_id": s.patient_id,
                "label": s.label or "",
                "pred": classes[int(p.argmax())],
                **{f"prob_{c}": float(v) for c, v in zip(classes, p)},
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions.csv", rows, classes)
    store.write_tile_scores(out / "attention.npz", attention)
    labelled = [r for r in rows if r["label"]]
    result: dict[str, Any] = {
        "trained": str(directory),
        "use": use,
        "models": len(models),
        "classes": classes,
        "n_slides": len(rows),
        "skipped_without_tiles": skipped,
        "n_labelled": len(labelled),
    }
    if labelled and len({r["label"] for r in labelled}) >= 2:
        y = np.array([classes.index(r["label"]) for r in labelled])
        prob = np.array([[r[f"prob_{c}"] for c in classes] for r in labelled])
        result["metrics"] = compute_metrics(y, prob)
        result["intervals"] = patient_bootstrap(y, prob, [r["patient_id"] for r in labelled])
        result["n_patients"] = len({r["patient_id"] for r in labelled})
        plot_roc(
            out / "roc.png",
            [{**r, "fold": 0} for r in labelled],
            classes,
            title=f"external: {meta['source']} / {meta['model']}",
        )
        log.info(
            "external %s/%s: AUC %.3f %s, balanced accuracy %.3f, F1 %.3f on %d slides",
            meta["source"],
            meta["model"],
            result["metrics"]["auc"],
            result["intervals"]["auc"],
            result["metrics"]["balanced_accuracy"],
            result["metrics"]["f1_macro"],
            len(labelled),
        )
    else:
        _no_labels_figure(out / "roc.png")
        result["note"] = "the sheet has no labels of two classes: predictions only"
    if tiles is not None and attention:
        _heatmaps(out / "heatmaps", rows, classes, attention, where, tiles, meta["model"])
    write_json(out / "metrics.json", json_safe(result))
    return result


def _heatmaps(out: Path, rows: list[dict], classes: list[str], attention: dict, where: dict, tiles: Path, name: str):
    """The attention heatmaps of a few slides: per class the most confident (correct, where labelled)."""
    from dirl.mil.heatmap import pick_slides, render

    by_label = [{**r, "label": r["label"] or r["pred"]} for r in rows]
    for sid in pick_slides(by_label, classes, N_HEATMAPS):
        row = by_label[[r["slide_id"] for r in by_label].index(sid)]
        said = row["label"] if row["label"] == row["pred"] else f"{row['label']} -> {row['pred']}"
        store_path = tiles / f"{sid}.zarr"
        render(
            out / f"{sid}.png",
            where[sid][0],
            attention[sid],
            tiles=store_path if store_path.exists() else None,
            tile_px_level0=where[sid][1],
            title=f"{sid}: {said} ({name})",
        )


def _no_labels_figure(png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dirl.store import atomic_path

    fig, ax = plt.subplots(figsize=(4, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, "no labels of two classes: no ROC curve", ha="center", va="center")
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a trained MIL model directory (mil/{source}/{model} of a cohort)")
    p.add_argument("--use", choices=USES, default="final", help="final: the all-slides model; folds: their mean")
    p.add_argument("--features", required=True, help="the new slides' feature directory (features/{source})")
    p.add_argument("--samples", required=True, help="the new cohort's sample sheet")
    p.add_argument("--out", required=True, help="output directory (deploy/{source}/{model})")
    p.add_argument("--tiles", help="tile stores (tiles/), for the heatmaps")


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    out = Path(args.out)
    return [out / n for n in ("predictions.csv", "attention.npz", "metrics.json", "roc.png")], [
        args.model,
        args.features,
    ]


def main(args: argparse.Namespace) -> None:
    if args.use == "final" and not (Path(args.model) / FINAL / "model.pt").exists():
        raise ConfigError(f"--use final: {args.model} has no final model (mil.final: true), use --use folds")
    deploy(
        Path(args.model),
        args.use,
        Path(args.features),
        args.samples,
        Path(args.out),
        Path(args.tiles) if args.tiles else None,
    )
    print(json.dumps({"out": args.out}))
