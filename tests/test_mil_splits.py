"""Patient-level stratified splits: disjoint, stratified, repeatable, reused; sample sheet; metrics."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dirl.errors import ConfigError
from dirl.mil.data import Cohort, read_sample_sheet
from dirl.mil.metrics import compute_metrics
from dirl.mil.splits import load_splits, make_splits, write_json


def cohort(n_patients=(12, 9, 15), seed=0) -> Cohort:
    """Three classes; patients hold 1-3 slides of their class."""
    rng = np.random.default_rng(seed)
    sids, pids, labels = [], [], []
    for c, n in zip(("a", "b", "c"), n_patients):
        for p in range(n):
            for k in range(int(rng.integers(1, 4))):
                sids.append(f"{c}{p}-{k}")
                pids.append(f"pat-{c}{p}")
                labels.append(c)
    return Cohort(sids, pids, labels, sorted(set(labels)))


@pytest.mark.parametrize("folds", [3, 5])
def test_splits_are_patient_disjoint_and_stratified(folds):
    co = cohort()
    sp = make_splits(co, folds, val_fraction=0.25, seed=3)
    pat = dict(zip(co.slide_ids, co.patient_ids))
    lab = dict(zip(co.slide_ids, co.labels))
    tested = []
    for f in sp["splits"]:
        sets = {k: {pat[s] for s in f[k]} for k in ("train", "val", "test")}
        assert not sets["train"] & sets["test"] and not sets["train"] & sets["val"] and not sets["val"] & sets["test"]
        assert set(f["train"]) | set(f["val"]) | set(f["test"]) == set(co.slide_ids)
        assert f["val"], "an inner validation split for early stopping"
        tested += f["test"]
        # stratified: every class in every test set, near its cohort share
        test_pat = Counter(lab[s] for s in f["test"])
        assert set(test_pat) == {"a", "b", "c"}
        for c in "abc":
            share = sum(1 for s in f["test"] if lab[s] == c) / len(f["test"])
            overall = co.labels.count(c) / len(co.labels)
            assert abs(share - overall) < 0.2, (c, share, overall)
    assert sorted(tested) == sorted(co.slide_ids)  # each slide tested exactly once


def test_splits_repeatable_and_seeded():
    co = cohort()
    a, b = make_splits(co, 4, 0.2, seed=1), make_splits(co, 4, 0.2, seed=1)
    assert a == b
    assert make_splits(co, 4, 0.2, seed=2)["splits"] != a["splits"]


def test_too_few_patients_names_the_class():
    co = cohort(n_patients=(12, 3, 15))
    with pytest.raises(ConfigError, match=r"class 'b' has 3 patient\(s\) but mil.folds = 5"):
        make_splits(co, 5)
    make_splits(co, 3)


def test_splits_file_checked_against_the_sheet(tmp_path):
    co = cohort()
    path = tmp_path / "splits.json"
    write_json(path, make_splits(co, 4, 0.2, 0))
    assert load_splits(path, co)["folds"] == 4
    fewer = co.subset(co.slide_ids[1:])
    with pytest.raises(ConfigError, match="slides removed.*make it again with `dirl splits`"):
        load_splits(path, fewer)
    with pytest.raises(ConfigError, match="does not exist"):
        load_splits(tmp_path / "none.json", co)


def test_sample_sheet(tmp_path):
    p = tmp_path / "s.tsv"
    p.write_text(
        "slide_id\tpath\tlabel\tpatient_id\n"
        "s1\t/a.svs\tLUAD\tP1\n"
        "s2\t/b.svs\tLUSC\t\n"
        "s3\t/c.svs\t\tP3\n"  # unlabelled: left out
        "s4\t/d.svs\tLUAD\tP1\n"
    )
    co = read_sample_sheet(p)
    assert co.slide_ids == ["s1", "s2", "s4"]
    assert co.patient_ids == ["P1", "s2", "P1"]  # patient defaults to the slide
    assert co.classes == ["LUAD", "LUSC"] and co.y.tolist() == [0, 1, 0]
    p.write_text("slide_id\tpath\tlabel\ns1\t/a\tx\n")
    with pytest.raises(ConfigError, match="at least two classes"):
        read_sample_sheet(p)
    p.write_text("slide_id\tpath\ns1\t/a\n")
    with pytest.raises(ConfigError, match="no labelled slides"):
        read_sample_sheet(p)


def test_metrics_binary_and_multiclass():
    y = np.array([0, 0, 1, 1])
    m = compute_metrics(y, np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]]))
    assert m == {"auc": 1.0, "balanced_accuracy": 1.0, "f1_macro": 1.0}
    y3 = np.array([0, 1, 2, 2])
    p3 = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.5, 0.4], [0.1, 0.2, 0.7]])
    m3 = compute_metrics(y3, p3)
    assert m3["auc"] == pytest.approx(1.0)  # one-vs-rest ranking is perfect for every class
    assert m3["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    one_class = compute_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]))
    assert np.isnan(one_class["auc"])  # undefined, not a fake 0.5
