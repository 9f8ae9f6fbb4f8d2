"""`dirl splits`: patient-level stratified k-fold splits of a cohort, written once to `mil/splits.json`.

    dirl splits --samples samples.tsv --out results/c/mil/splits.json [--folds 5 --val-fraction 0.2]

Splits depend only on the sample sheet (slides, patients, labels) and (folds, val_fraction, seed) — not
on the feature source — so every feature source and MIL model is compared on identical splits. Each
fold holds a test set (the k-fold part), and inside the remaining patients a patient-disjoint,
stratified validation split for early stopping. `dirl mil` refuses splits made for another sheet.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dirl import store
from dirl.errors import ConfigError
from dirl.mil.data import Cohort
from dirl.settings import Settings, bounded

log = logging.getLogger(__name__)
VERSION = 1


@dataclass(frozen=True)
class SplitSettings(Settings):
    """The `mil` section's keys that make the splits."""

    folds: int = bounded(5, ge=2)
    val_fraction: float = field(
        default=0.2,
        metadata={
            "help": "share of each training fold's patients held out for early stopping (0: none)",
            "ge": 0,
            "lt": 1,
        },
    )
    seed: int = 0


def _sgkf(n_splits: int, seed: int, y, groups):
    from sklearn.model_selection import StratifiedGroupKFold

    with warnings.catch_warnings():  # "least populated class has only k members": checked ourselves
        warnings.simplefilter("ignore", UserWarning)
        return list(
            StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups)
        )


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
            raise ConfigError(
                f"class {c!r} has {n_pat} patient(s) but mil.folds = {folds}: every class "
                f"needs at least as many patients as folds (lower mil.folds or add slides)"
            )
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
        out.append(
            {"train": sorted(ids[tr].tolist()), "val": sorted(ids[val].tolist()), "test": sorted(ids[te].tolist())}
        )
    splits = {
        "version": VERSION,
        "folds": folds,
        "val_fraction": val_fraction,
        "seed": seed,
        "classes": cohort.classes,
        "slides": {
            s: {"patient": p, "label": lab} for s, p, lab in zip(cohort.slide_ids, cohort.patient_ids, cohort.labels)
        },
        "splits": out,
    }
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
    diff = [
        f"{k} {old.get(k)!r} -> {new[k]!r}"
        for k in ("folds", "val_fraction", "seed", "classes")
        if old.get(k) != new[k]
    ]
    a, b = old.get("slides", {}), new["slides"]
    if set(a) != set(b):
        gone, added = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        diff.append(f"slides removed {gone[:5]} added {added[:5]}")
    changed = sorted(s for s in set(a) & set(b) if a[s] != b[s])
    if changed:
        diff.append(f"label/patient changed for {changed[:5]}")
    return diff


def load_splits(path: str | Path, cohort: Cohort) -> dict[str, Any]:
    """The splits at `path`, checked against the cohort (same slides, patients and labels)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"splits file {path} does not exist: make it with `dirl splits`")
    try:
        splits = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); make it again with `dirl splits`") from e
    now = {s: {"patient": p, "label": lab} for s, p, lab in zip(cohort.slide_ids, cohort.patient_ids, cohort.labels)}
    diff = _differences({**splits, "folds": None}, {**splits, "folds": None, "slides": now, "classes": cohort.classes})
    if diff:
        raise ConfigError(
            f"{path} was made for another sample sheet ({'; '.join(diff)}); make it again with "
            "`dirl splits` (results on the old splits are not comparable)"
        )
    check_splits(splits)
    return splits


def write_json(path: str | Path, obj: Any) -> None:
    with store.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", required=True, help="sample sheet TSV")
    p.add_argument("--out", required=True, help="splits JSON to write (results/<cohort>/mil/splits.json)")
    SplitSettings.add_arguments(p.add_argument_group("settings (SplitSettings)"))


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    return [args.out], [args.samples]


def main(args: argparse.Namespace) -> None:
    from dirl.mil.data import read_sample_sheet

    s = SplitSettings.from_args(args)
    splits = make_splits(read_sample_sheet(args.samples), s.folds, s.val_fraction, s.seed)
    write_json(args.out, splits)
    log.info("wrote %s: %d folds over %d slides", args.out, s.folds, len(splits["slides"]))
