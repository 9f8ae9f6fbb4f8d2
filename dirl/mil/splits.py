"""Patient-level stratified k-fold splits, saved to `splits.json` and reused.

Splits depend only on the sample sheet (slides, patients, labels) and (folds, val_fraction, seed) — not
on the feature source — so `dirl` and `dino` features (and every MIL model) are compared on identical
splits. Each fold holds a test set (the k-fold part), and inside the remaining patients a
patient-disjoint, stratified validation split for early stopping.

An existing splits file is reused when it was made for the same slides, patients, labels and settings;
if it differs the run stops and says what differs (pass `resplit=True` / `--resplit` to overwrite).
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dirl import store
from dirl.errors import ConfigError
from dirl.mil.data import Cohort

log = logging.getLogger(__name__)
VERSION = 1


def _sgkf(n_splits: int, seed: int, y, groups):
    from sklearn.model_selection import StratifiedGroupKFold

    with warnings.catch_warnings():  # "least populated class has only k members": checked ourselves
        warnings.simplefilter("ignore", UserWarning)
        return list(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
                    .split(np.zeros(len(y)), y, groups))


def make_splits(cohort: Cohort, folds: int, val_fraction: float = 0.2, seed: int = 0) -> dict[str, Any]:
    if folds < 2:
        raise ConfigError(f"mil.folds = {folds}: cross-validation needs at least 2 folds")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"mil.val_fraction = {val_fraction}: must be in [0, 1)")
    y = cohort.y
    groups = np.array(cohort.patient_ids)
    for k, c in enumerate(cohort.classes):
        n_pat = len(set(groups[y == k]))
        if n_pat < folds:
            raise ConfigError(f"class {c!r} has {n_pat} patient(s) but mil.folds = {folds}: every class "
                              f"needs at least as many patients as folds (lower mil.folds or add slides)")
    ids = np.array(cohort.slide_ids)
    out = []
    for i, (tr, te) in enumerate(_sgkf(folds, seed, y, groups)):
        val = np.array([], dtype=int)
        if val_fraction > 0:
            n_inner = max(2, int(round(1.0 / val_fraction)))
            # StratifiedGroupKFold needs at least n_inner patients in every class
            n_inner = min(n_inner, min(len(set(groups[tr][y[tr] == k])) for k in np.unique(y[tr])))
            if n_inner >= 2:
                itr, iva = _sgkf(n_inner, seed + 1000 + i, y[tr], groups[tr])[0]
                val, tr = tr[iva], tr[itr]
        out.append({"train": sorted(ids[tr].tolist()), "val": sorted(ids[val].tolist()),
                    "test": sorted(ids[te].tolist())})
    splits = {"version": VERSION, "folds": folds, "val_fraction": val_fraction, "seed": seed,
              "classes": cohort.classes,
              "slides": {s: {"patient": p, "label": lab}
                         for s, p, lab in zip(cohort.slide_ids, cohort.patient_ids, cohort.labels)},
              "splits": out}
    check_splits(splits)
    return splits


def check_splits(splits: dict[str, Any]) -> None:
    """Every slide in exactly one test set; train, val and test of a fold share no patient."""
    pat = {s: v["patient"] for s, v in splits["slides"].items()}
    seen: list[str] = []
    for i, f in enumerate(splits["splits"]):
        parts = {k: {pat[s] for s in f[k]} for k in ("train", "val", "test")}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            both = parts[a] & parts[b]
            if both:
                raise ConfigError(f"splits fold {i}: patients {sorted(both)[:5]} in both {a} and {b}")
        seen += f["test"]
    if sorted(seen) != sorted(pat):
        raise ConfigError("splits: the test sets do not cover every slide exactly once")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diff = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in ("folds", "val_fraction", "seed", "classes")
            if old.get(k) != new[k]]
    a, b = old.get("slides", {}), new["slides"]
    if set(a) != set(b):
        gone, added = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        diff.append(f"slides removed {gone[:5]} added {added[:5]}")
    changed = sorted(s for s in set(a) & set(b) if a[s] != b[s])
    if changed:
        diff.append(f"label/patient changed for {changed[:5]}")
    return diff


def load_or_make(path: str | Path, cohort: Cohort, folds: int, val_fraction: float = 0.2, seed: int = 0,
                 resplit: bool = False) -> tuple[dict[str, Any], bool]:
    """Reuse `path` if it matches the cohort and settings, else make (and write) new splits.

    Returns (splits, reused). A mismatching file is an error unless `resplit`."""
    path = Path(path)
    new = make_splits(cohort, folds, val_fraction, seed)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); delete it or pass --resplit") from e
        diff = _differences(old, new)
        if not diff:
            check_splits(old)
            log.info("reusing splits %s", path)
            return old, True
        if not resplit:
            raise ConfigError(f"{path} was made for a different cohort or settings ({'; '.join(diff)}); "
                              "pass --resplit to recompute it (results on the old splits are then not "
                              "comparable), or point --splits elsewhere")
        log.warning("recomputing splits %s: %s", path, "; ".join(diff))
    write_json(path, new)
    return new, False


def write_json(path: str | Path, obj: Any) -> None:
    with store.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
