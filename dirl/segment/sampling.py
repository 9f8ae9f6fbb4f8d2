"""What every source of cell classes shares (k-means, imported types, the trained classifier): the
nucleus columns each class is summarised by, and a bounded uniform sample of a cohort's nuclei."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dirl import store

SUMMARY = (
    "area_um2",
    "major_um",
    "minor_um",
    "eccentricity",
    "solidity",
    "circularity",
    "h_od",
    "e_od",
    "h_od_std",
    "h_od_ring",
)
VERSION = 1


def sample_nuclei(
    cells: list[Path], n: int, seed: int, columns: list[str]
) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """A uniform random sample of at most n nuclei over all stores; nuclei cut by a tile edge are left
    out while at least min(n, a quarter of all nuclei) others exist. Returns the columns (column "row": each
    nucleus's row in its store), the store index of each row, and the total number of nuclei. Memory: one
    slide's columns at a time."""
    rng = np.random.default_rng(seed)
    n_all, n_inner = [], []
    for p in cells:  # pass 1: counts only
        b = store.read_nuclei(p, ["border"])["border"]
        n_all.append(len(b))
        n_inner.append(int((b == 0).sum()))
    total = int(sum(n_all))
    inner_only = sum(n_inner) >= min(n, max(total // 4, 1))
    counts = np.array(n_inner if inner_only else n_all, dtype=np.int64)
    pool = int(counts.sum())
    pick = np.sort(rng.choice(pool, size=min(n, pool), replace=False)) if pool else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    parts: list[dict[str, np.ndarray]] = []
    src = []
    for i, p in enumerate(cells):  # pass 2: the sampled rows of each slide
        sel = pick[(pick >= offsets[i]) & (pick < offsets[i + 1])] - offsets[i]
        if len(sel) == 0:
            continue
        t = store.read_nuclei(p, sorted((set(columns) - {"row"}) | {"border"}))
        rows = np.flatnonzero(t["border"] == 0)[sel] if inner_only else sel
        parts.append({c: rows if c == "row" else t[c][rows] for c in columns})
        src.append(np.full(len(rows), i))
    if not parts:
        return {c: np.zeros(0) for c in columns}, np.zeros(0, int), total
    return ({c: np.concatenate([q[c] for q in parts]) for c in columns}, np.concatenate(src), total)
