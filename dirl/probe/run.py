"""`dirl probe`: every feature source of a cohort evaluated on one labelled probe dataset, side by side.

    dirl probe probe/crc/tiles.zarr --features dirl-s0=probe/crc/features/dirl-s0.h5 ... --out probe/crc

For each source (`NAME=FEATURES.h5`, extracted from the probe store by `dirl extract`): the k-NN and the
logistic-regression protocol (dirl.probe.protocols) on the store's train / val / test splits, metrics on
the test split with 95 % group-bootstrap intervals, written to `<out>/<source>.json`. Then
`<out>/summary.json` holds every source and the paired differences, on the same bootstrap draws, that
say what an encoder is worth: per seed DiRL − DINO, each pretrained run − the untrained backbone of its
seed, and − the colour baseline; `<out>/summary.png` draws the balanced accuracies with their intervals
and each source's confusion matrix.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from dirl.errors import ConfigError
from dirl.probe.protocols import (
    group_draws,
    knn_predict,
    logreg_predict,
    paired_difference,
    with_intervals,
)
from dirl.probe.tiles import ProbeSettings
from dirl.runs import COLOUR, DINO, DIRL, split_run, untrained_name

log = logging.getLogger(__name__)
PROTOCOLS = ("knn", "logreg")


def evaluate(
    features: np.ndarray, probe, s: ProbeSettings, draws: list[np.ndarray]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Both protocols on one source; (results, test predictions per protocol)."""
    y, split = probe.label, probe.split
    tr, va, te = (split == 0), (split == 1), (split == 2)
    n = len(probe.class_names)
    x = features.astype(np.float64)
    pred_knn = knn_predict(x[tr], y[tr], x[te], k=s.k, n_classes=n)
    val_x, val_y = (x[va], y[va]) if va.any() else (x[tr], y[tr])  # no validation groups: select on train
    pred_lr, fit = logreg_predict(x[tr], y[tr], val_x, val_y, x[te])
    out = {
        "knn": {"k": s.k, **with_intervals(y[te], pred_knn, probe.class_names, draws)},
        "logreg": {
            "C": fit.C,
            "C_selected_on": "val" if va.any() else "train (no validation split)",
            "val_balanced_accuracy": {f"{c:.3g}": v for c, v in fit.val_balanced_accuracy.items()},
            **with_intervals(y[te], pred_lr, probe.class_names, draws),
        },
    }
    return out, {"knn": pred_knn, "logreg": pred_lr}


def comparisons(names: list[str]) -> list[tuple[str, str, str]]:
    """(label, a, b) pairs whose b - a is reported: per seed DiRL − DINO, each run − its seed's untrained
    backbone and − the colour baseline."""
    out = []
    runs = {n: split_run(n) for n in names}
    for name, (method, seed) in runs.items():
        if method not in (DIRL, DINO):
            continue
        ref = untrained_name(seed)
        if ref in names:
            out.append((f"{name} − {ref}", ref, name))
        if COLOUR in names:
            out.append((f"{name} − {COLOUR}", COLOUR, name))
        if method == DIRL:
            dino = DINO if not seed else f"{DINO}-s{seed}"
            if dino in names:
                out.append((f"{name} − {dino}", dino, name))
    return out


def run_probe(tiles: str, features: dict[str, str], out: Path, s: ProbeSettings) -> dict[str, Any]:
    from dirl import store

    probe = store.open_probe(tiles)
    te = probe.split == 2
    if not te.any():
        raise ConfigError(f"{tiles}: no tile in the test split")
    if not (probe.split == 0).any():
        raise ConfigError(f"{tiles}: no tile in the train split")
    draws = group_draws(probe.group[te], s.bootstrap, s.seed)
    y_test = probe.label[te]
    results, preds = {}, {}
    for name, path in features.items():
        x, _, attrs = store.read_features(path)
        if len(x) != len(probe.label):
            raise ConfigError(f"{path}: {len(x)} feature rows, the probe store {tiles} has {len(probe.label)}: rerun")
        res, preds[name] = evaluate(x, probe, s, draws)
        results[name] = {
            "source": name,
            "encoder": attrs.get("encoder"),
            "dim": int(x.shape[1]),
            "dataset": probe.tiles.slide_id,
            "class_names": probe.class_names,
            "class_counts": probe.tiles.attrs.get("class_counts"),
            "splits": probe.tiles.attrs.get("splits"),
            "n_groups": {
                sp: int(len(np.unique(probe.group[probe.split == k]))) for k, sp in enumerate(store.PROBE_SPLITS)
            },
            "protocols": res,
        }
        with store.atomic_path(out / f"{name}.json") as tmp:
            tmp.write_text(json.dumps(results[name], indent=1) + "\n")
        log.info(
            "%s: k-NN BA %.3f %s, logreg BA %.3f %s (C %.3g)",
            name,
            res["knn"]["balanced_accuracy"],
            _ci(res["knn"]["balanced_accuracy_ci"]),
            res["logreg"]["balanced_accuracy"],
            _ci(res["logreg"]["balanced_accuracy_ci"]),
            res["logreg"]["C"],
        )
    deltas = {
        proto: {
            label: paired_difference(y_test, preds[a][proto], preds[b][proto], len(probe.class_names), draws)
            for label, a, b in comparisons(list(features))
        }
        for proto in PROTOCOLS
    }
    for proto, d in deltas.items():
        for label, v in d.items():
            log.info("%s %s: %+.3f %s", proto, label, v["difference"], _ci(v["ci"]))
    summary = {
        "dataset": probe.tiles.slide_id,
        "class_names": probe.class_names,
        "class_counts": probe.tiles.attrs.get("class_counts"),
        "splits": probe.tiles.attrs.get("splits"),
        "protocols": {
            "knn": f"k-NN, k = {s.k}, on train-mean-centred, L2-normalised features (cosine), one vote each",
            "logreg": "L2 logistic regression on standardised features, C chosen on val by balanced accuracy",
        },
        "intervals": f"95 % percentile intervals, {s.bootstrap} resamples of the test groups (seed {s.seed})",
        "sources": {
            n: {
                p: {
                    k: r["protocols"][p][k]
                    for k in ("balanced_accuracy", "balanced_accuracy_ci", "macro_f1", "macro_f1_ci")
                }
                for p in PROTOCOLS
            }
            for n, r in results.items()
        },
        "differences": deltas,
    }
    with store.atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
    plot(results, out / "summary.png")
    return summary


def _ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[-]"


def plot(results: dict[str, dict], png: Path) -> None:
    """Balanced accuracy per source and protocol with its interval; the confusion matrices below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dirl.store import atomic_path

    names = list(results)
    n = len(names)
    fig = plt.figure(figsize=(max(6, 1.6 * n), 3.2 + 1.9 * len(PROTOCOLS)))
    ax = fig.add_axes([0.08, 0.62, 0.9, 0.33])
    width = 0.38
    for j, proto in enumerate(PROTOCOLS):
        ba = [results[m]["protocols"][proto]["balanced_accuracy"] for m in names]
        ci = [results[m]["protocols"][proto]["balanced_accuracy_ci"] or [b, b] for m, b in zip(names, ba)]
        err = np.array([[b - c[0] for b, c in zip(ba, ci)], [c[1] - b for b, c in zip(ba, ci)]])
        ax.bar(np.arange(n) + (j - 0.5) * width, ba, width, yerr=err, capsize=3, label=proto)
    chance = 1.0 / len(next(iter(results.values()))["class_names"])
    ax.axhline(chance, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_xticks(np.arange(n), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test balanced accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title(f"probe {next(iter(results.values()))['dataset']}: 95 % group-bootstrap intervals", fontsize=9)
    classes = next(iter(results.values()))["class_names"]
    for j, proto in enumerate(PROTOCOLS):
        for i, m in enumerate(names):
            cm = np.asarray(results[m]["protocols"][proto]["confusion"], float)
            cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
            a = fig.add_axes([0.02 + i * 0.96 / n, 0.3 - j * 0.28, 0.96 / n * 0.8, 0.22])
            a.imshow(cm, vmin=0, vmax=1, cmap="Blues")
            a.set_xticks([])
            a.set_yticks(range(len(classes)), classes if i == 0 else [], fontsize=6)
            a.set_title(f"{m} {proto}", fontsize=6)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tiles", help="the probe tile store, probe/<dataset>/tiles.zarr (dirl probe-tiles)")
    p.add_argument(
        "--features", nargs="+", action="extend", required=True, metavar="NAME=H5", help="feature source = its features"
    )
    p.add_argument("--out", required=True, help="output directory, probe/<dataset>")
    ProbeSettings.add_arguments(p.add_argument_group("settings (ProbeSettings)"))


def _named(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--features {item!r}: write NAME=PATH")
        out[name] = path
    return out


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    names = _named(args.features)
    out = Path(args.out)
    return [out / "summary.json", *(out / f"{n}.json" for n in names)], [args.tiles, *names.values()]


def main(args: argparse.Namespace) -> None:
    s = ProbeSettings.from_args(args)
    run_probe(args.tiles, _named(args.features), Path(args.out), s)
