"""`phenotypes.source: imported`: the cell classes are the imported nucleus types (segmentation backend
import), mapped, merged or dropped by `phenotypes.type_classes` / `unknown_types`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dirl.errors import DirlError
from dirl.segment.sampling import SUMMARY, VERSION, sample_nuclei


def type_mapping(types: list[str], type_classes: tuple[str, ...], unknown_types: str) -> dict[str, str | None]:
    """Type name -> class name (None: painted as non-nuclear tissue). `type_classes`: "type=class" items
    ("type=-" drops the type); empty: every type is its own class. `unknown_types` (error | drop | other)
    says what becomes of the types `type_classes` does not name."""
    if not type_classes:
        return {t: t for t in types}
    mapping: dict[str, str | None] = {}
    for item in type_classes:
        t, sep, c = (x.strip() for x in item.partition("="))
        if not sep or not t or not c:
            raise DirlError(f"phenotypes.type_classes item {item!r}: write 'type=class' (or 'type=-' to drop it)")
        mapping[t] = None if c == "-" else c
    unknown = [t for t in types if t not in mapping]
    if unknown and unknown_types == "error":
        raise DirlError(
            f"imported nucleus types {unknown} are not in phenotypes.type_classes: map them, or set "
            "phenotypes.unknown_types to drop or other"
        )
    for t in unknown:
        mapping[t] = None if unknown_types == "drop" else "other"
    return mapping


def fit_imported(
    cells: list[Path], type_classes: tuple[str, ...], unknown_types: str, sample: int, seed: int
) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The phenotype model of imported types: (model dict, sampled table, store index, class per row)
    as `phenotype.fit` returns them, so that the gallery and the priors work the same way."""
    from dirl import store

    names = []
    for c in cells:
        n = store.map_attrs(c, "labels").get("type_names")
        if n is None:
            raise DirlError(f"{c} was not segmented by backend import: phenotypes.source imported needs imported types")
        names.append(list(n))
    types = sorted({t for n in names for t in n})
    mapping = type_mapping(types, type_classes, unknown_types)
    classes_ = sorted({c for c in mapping.values() if c is not None})
    if not classes_:
        raise DirlError(f"phenotypes.type_classes drops every imported type ({types}): no cell class is left")
    class_of = {t: (classes_.index(c) if c is not None else -1) for t, c in mapping.items()}
    columns = sorted({"tile", "label", "cx", "cy", "border", "type", *SUMMARY})
    tab, src, total = sample_nuclei(cells, sample, seed, columns)
    cls = np.array([class_of[names[s][t]] for s, t in zip(src.tolist(), tab["type"].tolist())], dtype=np.int64)
    summary = []
    for k, name in enumerate(classes_):
        sel = cls == k
        summary.append(
            {
                "id": k,
                "prior_value": k + store.FIRST_CELL_PRIOR,
                "n": int(sel.sum()),
                "fraction": float(sel.mean()) if len(cls) else 0.0,
                "description": name,
                "types": [t for t, c in mapping.items() if c == name],
                "mean": {f: float(tab[f][sel].mean()) if sel.any() else float("nan") for f in SUMMARY},
                "sd": {f: float(tab[f][sel].std()) if sel.any() else float("nan") for f in SUMMARY},
            }
        )
    model = {
        "version": VERSION,
        "method": "imported",
        "k": len(classes_),
        "seed": seed,
        "features": [],
        "mean": [],
        "std": [],
        "centroids": [[] for _ in classes_],
        "classes": summary,
        "type_classes": class_of,
        "dropped_types": [t for t, c in mapping.items() if c is None],
        "prior_values": {
            "0": "background (glass)",
            "1": "non-nuclear tissue (and dropped types)",
            **{str(k + store.FIRST_CELL_PRIOR): f"class {k}: {n}" for k, n in enumerate(classes_)},
        },
        "sample": {"requested": sample, "used": len(cls), "total_nuclei": total, "slides": len(cells)},
        "cells": [str(p) for p in cells],
    }
    return model, tab, src, cls


def imported_classes(class_of: dict[str, int], type_names: list[str] | None, types: np.ndarray) -> np.ndarray:
    """Class of every row of one store's table from its `type` column and the store's `type_names`
    (-1: a dropped type, painted as tissue)."""
    if type_names is None:
        raise DirlError(
            "the phenotype model classes imported types, but this cells store has none: segment it with backend import"
        )
    missing = sorted(set(type_names) - set(class_of))
    if missing:
        raise DirlError(f"nucleus types {missing} are not in the phenotype model: rerun `dirl phenotype` on the cohort")
    lut = np.array([class_of[n] for n in type_names] or [-1], dtype=np.int64)
    return lut[np.asarray(types, dtype=np.int64)]
