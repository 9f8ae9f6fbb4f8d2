"""`dirl summary` with replicates: per-seed DiRL − DINO (paired by seed), mean ± sd over seeds, for MIL
metrics and the attention headline; hand-computed values."""

from __future__ import annotations

import json

import pytest

from dirl.cli import main


def metrics(auc: float, sd: float = 0.1) -> dict:
    return {
        "mean": {"auc": auc, "balanced_accuracy": auc - 0.1, "f1_macro": auc - 0.2},
        "sd": {"auc": sd, "balanced_accuracy": sd, "f1_macro": sd},
        "classes": ["A", "B"],
        "folds": [{}, {}, {}],
        "n_slides": 12,
    }


def read(tsv):
    rows = [ln.split("\t") for ln in tsv.read_text().splitlines()]
    head = rows[0]
    return [dict(zip(head, r)) for r in rows[1:]]


def test_replicates_are_paired_by_seed(tmp_path):
    aucs = {"dirl": [0.80, 0.70, 0.90], "dino": [0.75, 0.72, 0.80]}
    args = ["summary", "--out", str(tmp_path / "out")]
    for method, values in aucs.items():
        for seed, v in enumerate(values):
            p = tmp_path / f"{method}-s{seed}.json"
            p.write_text(json.dumps(metrics(v)))
            args += ["--metrics", f"{method}-s{seed}/abmil={p}"]
    head = {"dino": [0.99, 0.98, 0.97], "dirl": [0.995, 0.99, 0.96], "untrained": [0.9998] * 3}
    att = {
        "headline": "head_entropy",
        "runs": {
            f"{m}-s{s}": {"head_entropy": {"mean": v, "sd": 0.01}, "per_image": {"head_entropy": [v] * 8}}
            for m, vals in head.items()
            for s, v in enumerate(vals)
        },
        "replicates": {
            "dirl_minus_dino": {
                "per_seed": {"0": 0.005, "1": 0.01, "2": -0.01},
                "mean": 0.005 / 3,
                "sd": 0.01,
                "n_seeds": 3,
            }
        },
    }
    (tmp_path / "att.json").write_text(json.dumps(att))
    assert main([*args, "--attention", str(tmp_path / "att.json")]) == 0
    rows = read(tmp_path / "out" / "summary.tsv")
    pick = {(r["section"], r["source"], r["seed"]): r for r in rows if r["metric"] in ("auc", "head_entropy")}
    d = [0.80 - 0.75, 0.70 - 0.72, 0.90 - 0.80]
    for s in range(3):
        assert float(pick[("mil_delta", "dirl-dino", str(s))]["mean"]) == pytest.approx(d[s], abs=1e-6)
    mean, sd = sum(d) / 3, (sum((x - sum(d) / 3) ** 2 for x in d) / 2) ** 0.5
    assert float(pick[("mil_delta", "dirl-dino", "all")]["mean"]) == pytest.approx(mean, abs=1e-6)
    assert float(pick[("mil_delta", "dirl-dino", "all")]["sd"]) == pytest.approx(sd, abs=1e-6)
    assert float(pick[("mil", "dirl", "all")]["mean"]) == pytest.approx(0.8, abs=1e-6)
    assert float(pick[("attention", "dino", "all")]["mean"]) == pytest.approx(0.98, abs=1e-6)
    assert float(pick[("attention_delta", "dirl-dino", "2")]["mean"]) == pytest.approx(-0.01)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "mean ± sd over seeds" in md and "DiRL − DINO per seed (AUC): abmil s0 +0.050; abmil s1 -0.020" in md


def test_one_seed_without_suffix(tmp_path):
    args = ["summary", "--out", str(tmp_path)]
    for m, v in (("dirl", 0.7), ("dino", 0.6)):
        (tmp_path / f"{m}.json").write_text(json.dumps(metrics(v, sd=0.05)))
        args += ["--metrics", f"{m}/abmil={tmp_path / f'{m}.json'}"]
    assert main(args) == 0
    rows = read(tmp_path / "summary.tsv")
    delta = [r for r in rows if r["section"] == "mil_delta" and r["metric"] == "auc" and r["seed"] == "all"]
    assert float(delta[0]["mean"]) == pytest.approx(0.1)
    md = (tmp_path / "summary.md").read_text()
    assert "| abmil | 0.700 ± 0.050" in md  # one seed: the spread over folds
