"""What `dirl attention` reports of the measured runs: per-run summaries, paired comparisons on the same
tiles (Wilcoxon signed-rank), and the seed-by-seed differences of replicated runs (`<method>-s<seed>`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from dirl.analysis.attention import HEADLINE, METRICS, Measured
from dirl.runs import RUN_NAME, UNTRAINED


def _summary(v: np.ndarray) -> dict[str, float]:
    v = np.asarray(v, dtype=np.float64)
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "median": float(np.median(v)),
        "q25": float(np.quantile(v, 0.25)),
        "q75": float(np.quantile(v, 0.75)),
    }


def _paired(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """b - a per tile: mean, sd, share of tiles where b is higher, Wilcoxon signed-rank p."""
    from scipy.stats import wilcoxon

    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    p = None
    if len(d) > 1 and np.any(d != 0):
        try:
            p = float(wilcoxon(d).pvalue)
        except ValueError:
            p = None
    return {
        "mean_diff": float(d.mean()),
        "sd_diff": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
        "frac_higher": float((d > 0).mean()),
        "wilcoxon_p": p,
    }


def describe(m: Measured, class_names: list[str]) -> dict[str, Any]:
    res: dict[str, Any] = {
        "backbone": m.meta.get("path"),
        "arch": m.meta.get("arch"),
        "method": m.meta.get("method"),
        "seed": m.meta.get("settings", {}).get("seed"),
        "source": m.source,
        "n_tokens": int(m.maps.shape[-1] ** 2),
        "n_heads": int(m.per_head["entropy"].shape[1]),
        HEADLINE: _summary(m.headline),
        "mean_of_heads": {k: _summary(v.mean(1)) for k, v in m.per_head.items()},
        "per_head": {k: [float(x) for x in v.mean(0)] for k, v in m.per_head.items()},
        "head_averaged_map": {k: _summary(v) for k, v in m.head_mean.items()},
    }
    if m.share is not None:
        share, area = m.share.mean(0), m.area.mean(0)
        res["class_share"] = {
            "classes": class_names,
            "attention": [float(v) for v in share],
            "area": [float(v) for v in area],
            "enrichment": [float(a / b) if b > 0 else None for a, b in zip(share, area)],
        }
    res["per_image"] = {
        HEADLINE: [float(v) for v in m.headline],
        **{f"map_{k}": [float(x) for x in v] for k, v in m.head_mean.items()},
    }
    return res


def compare(a: Measured, b: Measured) -> dict[str, Any]:
    """b against a on the same tiles: the headline, the head-averaged map's metrics, and per class the
    difference in enrichment."""
    out = {
        HEADLINE: _paired(a.headline, b.headline),
        **{f"map_{k}": _paired(a.head_mean[k], b.head_mean[k]) for k in METRICS},
    }
    if a.share is not None and b.share is not None:
        area = a.area.mean(0)
        out["enrichment_diff"] = [
            float((b.share.mean(0)[c] - a.share.mean(0)[c]) / area[c]) if area[c] > 0 else None
            for c in range(len(area))
        ]
    return out


def by_seed(names: list[str]) -> dict[int, dict[str, str]]:
    """{seed: {method: run name}}: runs named `<method>-s<seed>` (replicates) or `<method>` (one seed)."""
    out: dict[int, dict[str, str]] = {}
    for n in names:
        m = RUN_NAME.match(n)
        out.setdefault(int(m["seed"] or 0), {})[m["method"]] = n
    return out


def run_order(name: str) -> tuple[int, int, str]:
    """Seed, then untrained, dino, dirl, the rest: the order of overlay columns and tables."""
    m = RUN_NAME.match(name)
    rank = {UNTRAINED: 0, "dino": 1, "dirl": 2}.get(m["method"], 3)
    return int(m["seed"] or 0), rank, name


def replicates(measured: dict[str, Measured], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """For method pairs (a, b) such as (dino, dirl) and (untrained, dino): per seed the paired mean
    difference of the headline (b - a), and over seeds its mean and sd."""
    seeds = by_seed(list(measured))
    out: dict[str, Any] = {}
    for a, b in pairs:
        rows = {
            seed: _paired(measured[runs[a]].headline, measured[runs[b]].headline)["mean_diff"]
            for seed, runs in sorted(seeds.items())
            if a in runs and b in runs
        }
        if rows:
            v = np.array(list(rows.values()))
            out[f"{b}_minus_{a}"] = {
                "per_seed": {str(k): v_ for k, v_ in rows.items()},
                "mean": float(v.mean()),
                "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "n_seeds": len(v),
                "same_sign": bool(np.all(v > 0) or np.all(v < 0)),
            }
    return out
