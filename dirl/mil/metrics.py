"""Slide-classification metrics and the MIL stage's result files: AUC (one-vs-rest macro; binary: plain),
balanced accuracy and macro F1 per fold and as mean ± sd, out-of-fold predictions, ROC curves."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from dirl import store


def binary_auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, s))


def compute_metrics(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """auc: binary AUC of class 1 for two classes, else the macro mean of one-vs-rest AUCs over the
    classes present (with positives and negatives) in `y`; balanced accuracy; macro F1."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    k = prob.shape[1]
    if k == 2:
        auc = binary_auc(y, prob[:, 1])
    else:
        aucs = [binary_auc((y == c).astype(int), prob[:, c]) for c in range(k)]
        aucs = [a for a in aucs if not np.isnan(a)]
        auc = float(np.mean(aucs)) if aucs else float("nan")
    pred = prob.argmax(1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ba = float(balanced_accuracy_score(y, pred))
        f1 = float(f1_score(y, pred, average="macro", labels=list(range(k)), zero_division=0))
    return {"auc": auc, "balanced_accuracy": ba, "f1_macro": f1}


def mean_sd(rows: list[dict[str, float]], keys) -> tuple[dict[str, float], dict[str, float]]:
    mean, sd = {}, {}
    for key in keys:
        v = np.array([r[key] for r in rows], dtype=float)
        v = v[~np.isnan(v)]
        mean[key] = float(v.mean()) if len(v) else float("nan")
        sd[key] = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    return mean, sd


def json_safe(o):
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, float) and not np.isfinite(o):
        return None  # JSON has no NaN
    if isinstance(o, np.generic):
        return json_safe(o.item())
    return o


def write_predictions(path: Path, rows: list[dict], classes: list[str]) -> None:
    cols = ["slide_id", "patient_id", "label", "fold", "pred"] + [f"prob_{c}" for c in classes]
    with store.atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})


def plot_roc(path: Path, rows: list[dict], classes: list[str], title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    y = np.array([classes.index(r["label"]) for r in rows])
    fig, ax = plt.subplots(figsize=(5, 5))
    targets = [1] if len(classes) == 2 else range(len(classes))
    for c in targets:
        yc = (y == c).astype(int)
        if yc.min() == yc.max():
            continue
        p = np.array([r[f"prob_{classes[c]}"] for r in rows])
        fpr, tpr, _ = roc_curve(yc, p)
        auc = binary_auc(yc, p)
        name = classes[c] if len(classes) > 2 else f"{classes[1]} vs {classes[0]}"
        ax.plot(fpr, tpr, lw=2, label=f"{name} (AUC {auc:.3f})")
        if len(classes) == 2:  # per fold, thin
            folds = np.array([r["fold"] for r in rows])
            for f in np.unique(folds):
                m = folds == f
                if yc[m].min() != yc[m].max():
                    a, b, _ = roc_curve(yc[m], p[m])
                    ax.plot(a, b, lw=0.8, alpha=0.4, color="grey")
    ax.plot([0, 1], [0, 1], ls="--", color="k", lw=0.8)
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title=f"out-of-fold ROC {title}",
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with store.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
