"""The probe: its maths against hand-computed cases, its inputs and their bad forms, region labelling
against hand-drawn polygons, and probe tiles cut as slide tiles are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dirl import store
from dirl.cli import main as cli
from dirl.errors import ConfigError
from dirl.probe import protocols as P
from dirl.probe.data import label_tiles, read_dataset, read_regions

# --------------------------------------------------------------------------------------------------
# k-NN


def test_knn_votes_by_cosine_after_centring() -> None:
    """Four training points around the mean; the test point's cosine neighbours decide."""
    train = np.array([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]]) + 5.0  # mean (5, 5): centred away
    y = np.array([0, 1, 2, 3])
    test = np.array([[5.0 + 3.0, 5.1], [5.1, 5.0 + 9.0], [4.0, 5.0]])  # towards 0, towards 1, towards 2
    assert P.knn_predict(train, y, test, k=1).tolist() == [0, 1, 2]


def test_knn_majority_and_ties() -> None:
    """k = 3: two votes beat one; k = 2 with one vote each: the class whose voter is more similar wins;
    equal votes and equal similarity: the smaller class."""
    train = np.array([[1.0, 0.1], [1.0, -0.1], [0.9, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    y = np.array([1, 1, 0, 0, 2, 2])
    mu = train.mean(0)
    q = mu + np.array([[1.0, 0.0]])
    assert P.knn_predict(train, y, q, k=3).tolist() == [1]  # the three nearest: 1, 1, 0
    # k = 2: neighbours of class 1 and class 0 with different similarity
    train2 = np.array([[1.0, 0.0], [1.0, 0.5], [-1.0, 0.0], [-1.0, -0.5]])
    y2 = np.array([0, 1, 2, 3])
    q2 = train2.mean(0) + np.array([[1.0, 0.1]])
    assert P.knn_predict(train2, y2, q2, k=2).tolist() == [0]  # [1, 0] is more similar than [1, .5]
    train3 = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 0.0]])
    y3 = np.array([1, 0, 2])
    q3 = train3.mean(0) + np.array([[1.0, 0.0]])  # equidistant from the first two
    assert P.knn_predict(train3, y3, q3, k=2).tolist() == [0]


def test_logistic_regression_equals_sklearns() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)) + np.repeat(np.eye(3, 8) * 1.5, 100, axis=0)
    y = np.repeat([0, 1, 2], 100)
    tr, va, te = slice(0, 300, 3), slice(1, 300, 3), slice(2, 300, 3)
    pred, fit = P.logreg_predict(x[tr], y[tr], x[va], y[va], x[te])
    scaler = StandardScaler().fit(x[tr])
    ref = LogisticRegression(C=fit.C, max_iter=5000).fit(scaler.transform(x[tr]), y[tr])
    np.testing.assert_array_equal(pred, ref.predict(scaler.transform(x[te])))
    best = max(fit.val_balanced_accuracy.values())
    assert fit.val_balanced_accuracy[fit.C] == best  # the chosen C is the best on validation ...
    assert fit.C == min(c for c, v in fit.val_balanced_accuracy.items() if v == best)  # ... the smallest such
    assert P.balanced_accuracy(y[te], pred) > 0.7


def test_metrics_by_hand() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 1, 1, 1, 1, 0, 2])
    m = P.metrics(y, p, ["a", "b", "c"])
    assert m["balanced_accuracy"] == pytest.approx((2 / 4 + 2 / 2 + 1 / 2) / 3)
    # F1: a 2*2/(4+3), b 2*2/(2+4), c 2*1/(2+1)
    assert m["macro_f1"] == pytest.approx((4 / 7 + 4 / 6 + 2 / 3) / 3)
    assert m["confusion"] == [[2, 2, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class_recall"] == {"a": 0.5, "b": 1.0, "c": 0.5}


def test_group_bootstrap_intervals_cover_the_true_value() -> None:
    """Predictions right with probability 0.7 per tile, tiles in 40 groups: over 60 simulated test sets the
    95 % interval of the accuracy covers 0.7 about 95 % of the time (at least 85 % here)."""
    rng = np.random.default_rng(1)
    covered = 0
    for rep in range(60):
        groups = np.repeat(np.arange(40), 10)
        y = rng.integers(0, 2, len(groups))
        right = rng.random(len(groups)) < 0.7
        pred = np.where(right, y, 1 - y)
        draws = P.group_draws(groups, 300, seed=rep)
        lo, hi = P.interval([P.balanced_accuracy(y[d], pred[d]) for d in draws])
        covered += lo <= 0.7 <= hi
    assert covered >= 51


def test_paired_difference_shares_the_draws() -> None:
    groups = np.repeat(np.arange(20), 5)
    y = np.tile([0, 1], 50)
    a = y.copy()
    a[::4] = 1 - a[::4]  # 75 % right
    draws = P.group_draws(groups, 200, seed=0)
    d = P.paired_difference(y, a, y, 2, draws)  # b perfect
    assert d["difference"] == pytest.approx(0.25, abs=0.02) and d["excludes_zero"] and d["p_better"] == 1.0
    same = P.paired_difference(y, a, a, 2, draws)
    assert same["difference"] == 0.0 and same["ci"] == [0.0, 0.0] and not same["excludes_zero"]


def test_made_splits_keep_groups_whole_and_every_label_tested() -> None:
    labels = np.repeat([0, 1, 2], 30)
    groups = np.repeat(np.arange(18), 5)  # six groups per label
    s = P.make_splits(labels, groups, seed=3, val=0.2, test=0.3)
    assert set(s) == {str(g) for g in range(18)}
    for lab in range(3):
        gs = {str(g) for g in np.unique(groups[labels == lab])}
        assert {s[g] for g in gs} == {"train", "val", "test"}
    assert P.make_splits(labels, groups, seed=3, val=0.2, test=0.3) == s  # seeded


# --------------------------------------------------------------------------------------------------
# datasets and their bad forms
def image(path: Path, colour: tuple[int, int, int], size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), colour, np.uint8)).save(path)
    return path


def test_manifest_and_image_folder(tmp_path: Path) -> None:
    for i in range(4):
        image(tmp_path / "imgs" / f"{i}.png", (200, 100, 150))
    (tmp_path / "m.tsv").write_text(
        "path\tlabel\tgroup\nimgs/0.png\ta\tp1\nimgs/1.png\ta\tp2\nimgs/2.png\tb\tp1\nimgs/3.png\tb\tp3\n"
    )
    items = read_dataset(tmp_path / "m.tsv")
    assert [(i.label, i.group, i.row) for i in items] == [
        ("a", "p1", 2),
        ("a", "p2", 3),
        ("b", "p1", 4),
        ("b", "p3", 5),
    ]
    assert items[0].path == tmp_path / "imgs" / "0.png" and items[0].split is None
    for c in ("tumour", "stroma"):
        for i in range(2):
            image(tmp_path / "folder" / c / f"{i}.png", (10, 20, 30))
    items = read_dataset(tmp_path / "folder")
    assert sorted({i.label for i in items}) == ["stroma", "tumour"] and len({i.group for i in items}) == 4


@pytest.mark.parametrize(
    "rows, message",
    [
        ("path\tlabel\nimgs/0.png\ta\nmissing.png\ta\n", r"line 3: image .*missing.png does not exist"),
        ("path\tlabel\tgroup\nimgs/0.png\ta\tp1\nimgs/1.png\ta\tp1\nimgs/2.png\tb\tp2\n", r"\{'a': 1, 'b': 1\}"),
        (
            "path\tlabel\tgroup\tsplit\nimgs/0.png\ta\tp1\ttrain\nimgs/1.png\ta\tp1\ttest\nimgs/2.png\ta\tp2\ttrain\n",
            r"line 3: group 'p1' is in split 'test' here and in 'train' on line 2",
        ),
        ("path\tlabel\tsplit\nimgs/0.png\ta\ttrain\nimgs/1.png\ta\tholdout\n", r"line 3: split 'holdout'"),
        ("path\tlabel\tsplit\nimgs/0.png\ta\ttrain\nimgs/1.png\ta\t\n", r"line 3: no split, but other rows"),
        ("file\tlabel\nimgs/0.png\ta\n", r"missing column\(s\) \['path'\]"),
        ("path\tlabel\tcolour\nimgs/0.png\ta\tred\n", r"unknown column\(s\) \['colour'\]"),
    ],
)
def test_bad_manifests_are_one_line(tmp_path: Path, rows: str, message: str) -> None:
    for i in range(3):
        image(tmp_path / "imgs" / f"{i}.png", (1, 2, 3))
    (tmp_path / "m.tsv").write_text(rows)
    with pytest.raises(ConfigError, match=message) as e:
        read_dataset(tmp_path / "m.tsv")
    assert "\n" not in str(e.value) and "m.tsv" in str(e.value)


# --------------------------------------------------------------------------------------------------
# regions
def regions_file(path: Path, polygons: list[tuple[str, list]]) -> Path:
    feats = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": [255, 0, 0]}},
        }
        for name, ring in polygons
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def test_region_labelling_of_tiles_against_hand_drawn_polygons(tmp_path: Path) -> None:
    """Tiles of 100 px at (0,0), (100,0), (200,0), (0,100): a square region covering the first tile wholly,
    60 % of the second; a triangle covering half of the fourth; a second class over the third tile."""
    f = regions_file(
        tmp_path / "r.geojson",
        [
            ("tumour", [[0, 0], [160, 0], [160, 100], [0, 100], [0, 0]]),
            ("stroma", [[200, 0], [300, 0], [300, 100], [200, 100], [200, 0]]),
            ("tumour", [[0, 100], [100, 100], [0, 200], [0, 100]]),  # half of the tile at (0, 100)
            ("tumour", [[0, 0], [50, 0], [50, 50], [0, 50], [0, 0]]),  # overlaps the first: not counted twice
        ],
    )
    regions = read_regions(f, 1000, 1000)
    coords = np.array([[0, 0], [100, 0], [200, 0], [0, 100], [500, 500]])
    assert label_tiles(regions, coords, 100.0, 0.5) == ["tumour", "tumour", "stroma", "tumour", None]
    assert label_tiles(regions, coords, 100.0, 0.61) == ["tumour", None, "stroma", None, None]
    with pytest.raises(ConfigError, match=r"outside the slide \(150 x 150 level-0 px\)"):
        read_regions(f, 150, 150)


# --------------------------------------------------------------------------------------------------
# probe tiles are slide tiles
def test_probe_tiles_are_cut_as_slide_tiles(tmp_path: Path) -> None:
    """A 0.25 µm/px image probed at 0.5 µm/px in 32 px tiles: 64 px squares, centred, BOX-shrunk as
    `dirl tile` shrinks; labels, groups and made splits per tile."""
    from dirl.tiling import resize_tile

    rng = np.random.default_rng(0)
    rows = ["path\tlabel\tgroup"]
    for i in range(6):
        img = rng.integers(0, 255, (150, 140, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png\t{'ab'[i % 2]}\tg{i}")
    (tmp_path / "m.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "probe" / "tiles.zarr"
    argv = ["--dataset", "d", "--manifest", str(tmp_path / "m.tsv"), "--image-mpp", "0.25", "--mpp", "0.5"]
    splits_json = str(tmp_path / "probe" / "splits.json")
    assert cli(["probe-tiles", str(out), *argv, "--tile-px", "32", "--splits", splits_json]) == 0
    p = store.open_probe(out)
    assert len(p.label) == 6 * 4  # 2 x 2 squares of 64 px fit in 150 x 140
    img0 = np.asarray(Image.open(tmp_path / "0.png"))
    ox, oy = (140 - 128) // 2, (150 - 128) // 2
    np.testing.assert_array_equal(p.tiles.tile(0), resize_tile(img0[oy : oy + 64, ox : ox + 64], 32))
    assert p.tiles.coords[:2].tolist() == [[ox, oy], [ox + 64, oy]]
    assert p.class_names == ["a", "b"] and p.label[:4].tolist() == [0] * 4 and p.label[4:8].tolist() == [1] * 4
    splits = json.loads((tmp_path / "probe" / "splits.json").read_text())["groups"]
    for g in range(6):  # a group's tiles share its split
        assert {store.PROBE_SPLITS[k] for k in p.split[p.group == g]} == {splits[p.group_names[g]]}
    assert cli(["probe-tiles", str(tmp_path / "small.zarr"), *argv, "--tile-px", "128"]) == 1  # 256 px > 150
    assert not (tmp_path / "small.zarr").exists()
