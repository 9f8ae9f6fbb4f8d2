"""Frozen-feature probes and their statistics, as pathology encoder benchmarks run them (UNI's patch
evaluation, kaiko-ai eva): both protocols deterministic, all metrics on the test split, intervals by
resampling its groups.

* **k-NN** (`knn`): features centred on the training mean and L2-normalised (UNI's protocol); the k nearest
  training tiles by cosine similarity vote, each vote weighted 1 (ties: the class whose voters are the
  most similar in sum, then the smaller class index).
* **Logistic regression** (`logreg`): L2-regularised multinomial on training-standardised features; C
  from a grid, chosen by balanced accuracy on the validation split (ties: the smaller C, the stronger
  prior); then evaluated on the test split.
* **Metrics**: balanced accuracy (mean per-class recall over the classes the test split holds), macro F1,
  per-class recall, confusion matrix (rows true, columns predicted).
* **Intervals**: the test split's groups resampled with replacement (`n_boot` times, seeded), metrics
  recomputed on the tiles of the drawn groups, 2.5th and 97.5th percentiles. Paired differences between
  two sources use the same draws, so their interval reflects only how the sources differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-4, 3, 15))


# --------------------------------------------------------------------------------------------------
# protocols: (train features, train labels, eval features) -> predicted labels
def knn_predict(
    train: np.ndarray, y_train: np.ndarray, test: np.ndarray, k: int = 20, n_classes: int = 0
) -> np.ndarray:
    """k-NN on train-mean-centred, L2-normalised features; cosine similarity; one vote per neighbour,
    ties broken by the summed similarity of each class's voters, then by the smaller class."""
    n_classes = n_classes or int(y_train.max()) + 1
    mu = train.mean(0, keepdims=True)

    def norm(x: np.ndarray) -> np.ndarray:
        x = x - mu
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    a, b = norm(train.astype(np.float64)), norm(test.astype(np.float64))
    k = min(k, len(a))
    out = np.empty(len(b), np.int64)
    for s in range(0, len(b), 1024):  # bounded memory on big test sets
        sim = b[s : s + 1024] @ a.T
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(idx), n_classes))
        weight = np.zeros((len(idx), n_classes))
        rows = np.repeat(np.arange(len(idx)), k)
        np.add.at(votes, (rows, y_train[idx].ravel()), 1.0)
        np.add.at(weight, (rows, y_train[idx].ravel()), np.take_along_axis(sim, idx, 1).ravel())
        # lexicographic: votes first, then summed similarity (scaled below one vote), then the class order
        score = votes + (weight - weight.min(1, keepdims=True)) / (2.0 * k + 2.0)
        out[s : s + len(idx)] = np.argmax(score, axis=1)
    return out


@dataclass(frozen=True)
class LogregFit:
    C: float
    val_balanced_accuracy: dict[float, float]  # the grid search


def logreg_predict(
    train: np.ndarray,
    y_train: np.ndarray,
    val: np.ndarray,
    y_val: np.ndarray,
    test: np.ndarray,
    c_grid: tuple[float, ...] = DEFAULT_C_GRID,
    max_iter: int = 5000,
) -> tuple[np.ndarray, LogregFit]:
    """L2 logistic regression (lbfgs, multinomial) on standardised features, C chosen on `val`. At the
    weakest priors of the grid lbfgs may stop at `max_iter` short of sklearn's tolerance: deterministic
    all the same, and such a C rarely wins on validation."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    scaler = StandardScaler().fit(train)
    xt, xv, xe = scaler.transform(train), scaler.transform(val), scaler.transform(test)
    scores: dict[float, float] = {}
    models = {}
    for c in c_grid:
        m = LogisticRegression(C=c, max_iter=max_iter).fit(xt, y_train)
        scores[c] = balanced_accuracy(y_val, m.predict(xv)) if len(y_val) else 0.0
        models[c] = m
    best = max(c_grid, key=lambda c: (scores[c], -c))
    return models[best].predict(xe), LogregFit(best, scores)


# --------------------------------------------------------------------------------------------------
# metrics
def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    m = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None) -> float:
    n = n_classes or int(max(y_true.max(initial=0), y_pred.max(initial=0))) + 1
    m = confusion(y_true, y_pred, n)
    present = m.sum(1) > 0
    return float((np.diag(m)[present] / m.sum(1)[present]).mean()) if present.any() else float("nan")


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean F1 over the classes present in y_true (a class never true and never predicted is left out,
    one predicted but never true scores 0 as sklearn does, but counts only if present in y_true)."""
    m = confusion(y_true, y_pred, n_classes)
    tp, support, predicted = np.diag(m).astype(float), m.sum(1), m.sum(0)
    present = support > 0
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[present].mean()) if present.any() else float("nan")


def metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict:
    n = len(class_names)
    m = confusion(y_true, y_pred, n)
    support = m.sum(1)
    recall = {c: (float(m[i, i] / support[i]) if support[i] else None) for i, c in enumerate(class_names)}
    return {
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, n),
        "macro_f1": macro_f1(y_true, y_pred, n),
        "per_class_recall": recall,
        "confusion": m.tolist(),
        "n": int(len(y_true)),
    }


# --------------------------------------------------------------------------------------------------
# intervals: resampling the groups of the test split
def group_draws(groups: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """`n_boot` bootstrap samples of the test tiles: groups drawn with replacement, each bringing all its
    tiles (a group drawn twice counts twice). Shared by every source, so differences are paired."""
    codes, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(codes))]
    rng = np.random.default_rng(seed)
    return [np.concatenate([members[g] for g in rng.integers(0, len(codes), len(codes))]) for _ in range(n_boot)]


BOOTSTRAPPED = ("balanced_accuracy", "macro_f1")


def interval(values: list[float]) -> list[float] | None:
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else None


def with_intervals(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str], draws: list[np.ndarray]) -> dict:
    """`metrics` plus the 95 % group-bootstrap interval of each headline metric."""
    out = metrics(y_true, y_pred, class_names)
    n = len(class_names)
    for key, fn in (("balanced_accuracy", balanced_accuracy), ("macro_f1", macro_f1)):
        out[f"{key}_ci"] = interval([fn(y_true[d], y_pred[d], n) for d in draws])
    return out


def paired_difference(
    y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, n_classes: int, draws: list[np.ndarray]
) -> dict:
    """b - a in balanced accuracy on the test split, with its interval over the same group draws and the
    share of draws in which b is better."""
    d = [
        balanced_accuracy(y_true[s], pred_b[s], n_classes) - balanced_accuracy(y_true[s], pred_a[s], n_classes)
        for s in draws
    ]
    point = balanced_accuracy(y_true, pred_b, n_classes) - balanced_accuracy(y_true, pred_a, n_classes)
    finite = np.asarray([x for x in d if np.isfinite(x)])
    return {
        "difference": float(point),
        "ci": interval(d),
        "p_better": float((finite > 0).mean()) if len(finite) else None,
        "excludes_zero": bool(ci[0] > 0 or ci[1] < 0) if (ci := interval(d)) else False,
    }


# --------------------------------------------------------------------------------------------------
# splits made when the dataset gives none
def make_splits(labels: np.ndarray, groups: np.ndarray, seed: int, val: float = 0.2, test: float = 0.2) -> dict:
    """{group: train|val|test}: groups assigned whole, stratified by each group's majority label, so
    that each label's groups are spread over the three splits in about these shares (a label with two
    groups gets one train and one test group; three or more, one in each split at least)."""
    rng = np.random.default_rng(seed)
    uniq = sorted(set(groups.tolist()))
    majority = {}
    for g in uniq:
        vals, counts = np.unique(labels[groups == g], return_counts=True)
        majority[g] = vals[np.argmax(counts)]
    out: dict[str, str] = {}
    for lab in sorted(set(majority.values())):
        gs = [g for g in uniq if majority[g] == lab]
        rng.shuffle(gs)
        n = len(gs)
        n_test = max(1, round(n * test)) if n >= 2 else 0
        n_val = max(1, round(n * val)) if n >= 3 else 0
        n_test = min(n_test, n - 1)
        n_val = min(n_val, n - 1 - n_test)
        for i, g in enumerate(gs):
            out[str(g)] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out
