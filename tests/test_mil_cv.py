"""MIL end to end on a synthetic cohort: tile stores from `dirl.synth` -> `dirl extract` with a small
random ViT -> `dirl mil` (ABMIL, TransMIL, mean pooling) -> `dirl summary`.

The label of a slide is the nucleus population it holds (lymphocyte vs tumour), and only a subset of
its tiles carry that population; the other tiles are the same plain stroma in both classes. So a MIL
model must find the signal tiles: its AUC must be well above chance and its attention must sit on them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers_models import write_backbone

from dirl import store

T = 64  # tile side, px (level 0, mpp 1.0: 64 µm tiles)
GRID = (8, 5)  # tiles per slide: 40
N_PER_CLASS = 8
CLASSES = ("lymphocyte", "tumour")
SIGNAL = 0.4  # share of a slide's tiles that carry its population


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one torch thread is fastest, and on a shared CPU much faster than several."""
    from dirl.runtime import torch_threads

    with torch_threads(1):
        yield


def tile_attrs(slide_id: str, n_x: int, n_y: int) -> store.TileAttrs:
    return store.TileAttrs.without_slide(slide_id, T, mpp=1.0, width=n_x * T, height=n_y * T)


def make_slide(path: Path, slide_id: str, population: str | None, seed: int, signal_fraction: float):
    """Tile store whose tiles are stroma except a random `signal_fraction` carrying `population`.
    Returns the boolean signal mask per tile (row order)."""
    from dirl import synth

    nx, ny = GRID
    w, h = nx * T, ny * T
    stroma, _, _ = synth.render(0, 0, w, h, mpp=1.0, populations=(), seed=seed, tissue="full")
    cells, _, _ = synth.render(
        0, 0, w, h, mpp=1.0, populations=(synth.POPULATIONS[population],), seed=seed, tissue="full"
    )
    rng = np.random.default_rng(seed)
    n = nx * ny
    signal = np.zeros(n, bool)
    signal[rng.choice(n, max(1, int(round(signal_fraction * n))), replace=False)] = True
    coords = np.array([(x * T, y * T) for y in range(ny) for x in range(nx)], dtype=np.int64)
    images = np.stack([(cells if s else stroma)[y : y + T, x : x + T] for (x, y), s in zip(coords, signal)])
    with store.tile_store_writer(
        path, coords=coords, tissue=np.ones(n), tile_px=T, attrs=tile_attrs(slide_id, nx, ny)
    ) as wr:
        wr.write(0, images)
    return signal


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    rows, signal = [], {}
    i = 0
    for label in CLASSES:
        for j in range(N_PER_CLASS):
            sid = f"{label[:3]}{j:02d}"
            # 2 slides per patient for the first two patients of each class: splits must keep them together
            pid = f"P-{label[:3]}-{j // 2 if j < 4 else j}"
            signal[sid] = make_slide(root / "tiles" / f"{sid}.zarr", sid, label, seed=100 + i, signal_fraction=SIGNAL)
            rows.append((sid, f"/slides/{sid}.svs", pid, label))
            i += 1
    # one labelled slide with no tiles at all: left out with a warning
    with store.tile_store_writer(
        root / "tiles" / "empty.zarr",
        coords=np.zeros((0, 2)),
        tissue=np.zeros(0),
        tile_px=T,
        attrs=tile_attrs("empty", 1, 1),
    ):
        pass
    rows.append(("empty", "/slides/empty.svs", "P-empty", CLASSES[0]))
    sheet = root / "samples.tsv"
    with open(sheet, "w") as fh:
        fh.write("slide_id\tpath\tpatient_id\tlabel\n")
        for r in rows:
            fh.write("\t".join(r) + "\n")
    write_backbone(root / "pretrain" / "dirl", method="dirl", seed=0)
    write_backbone(root / "pretrain" / "dino", img=32, method="dino", seed=1)
    from dirl.cli import main

    stores = sorted(str(p) for p in (root / "tiles").glob("*.zarr"))
    for method in ("dirl", "dino"):
        assert (
            main(
                [
                    "extract",
                    *stores,
                    "--encoder",
                    str(root / "pretrain" / method),
                    "--out",
                    str(root / "features" / method),
                    "--workers",
                    "0",
                    "--threads",
                    "1",
                ]
            )
            == 0
        )
    return {"root": root, "sheet": sheet, "signal": signal}


def _mil(c, method: str, model: str, *extra) -> Path:
    from dirl.cli import main

    out = c["root"] / "mil" / method / model
    splits = c["root"] / "mil" / "splits.json"
    if not splits.exists():  # once per cohort, as the workflow's splits rule
        assert main(["splits", "--samples", str(c["sheet"]), "--out", str(splits), "--folds", "4"]) == 0
    assert (
        main(
            [
                "mil",
                "--samples",
                str(c["sheet"]),
                "--features",
                str(c["root"] / "features" / method),
                "--model",
                model,
                "--out",
                str(out),
                "--seed",
                "0",
                "--splits",
                str(c["root"] / "mil" / "splits.json"),
                "--tiles",
                str(c["root"] / "tiles"),
                "--heatmaps",
                "2",
                "--epochs",
                "40",
                "--patience",
                "8",
                "--threads",
                "1",
                *extra,
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def abmil(cohort):
    return _mil(cohort, "dirl", "abmil")


def test_empty_slide_gives_valid_feature_file(cohort):
    x, c, attrs = store.read_features(cohort["root"] / "features" / "dirl" / "empty.h5")
    assert x.shape == (0, 192) and c.shape == (0, 2) and "patch_size_level0" in attrs


def test_abmil_learns_the_population(cohort, abmil):
    m = json.loads((abmil / "metrics.json").read_text())
    assert m["pooled"]["auc"] > 0.8, m["pooled"]
    assert m["mean"]["auc"] > 0.8, m["folds"]
    assert m["excluded_slides"] == ["empty"]
    assert m["n_slides"] == 2 * N_PER_CLASS and len(m["folds"]) == 4
    for k in ("auc", "balanced_accuracy", "f1_macro"):
        assert k in m["mean"] and k in m["sd"] and all(k in f for f in m["folds"])
    for i in range(4):
        ck = abmil / f"fold{i}" / "model.pt"
        assert ck.exists()
    with open(abmil / "predictions.csv") as fh:
        preds = list(csv.DictReader(fh))
    assert sorted(r["slide_id"] for r in preds) == sorted(cohort["signal"])
    assert {"prob_lymphocyte", "prob_tumour", "fold", "patient_id", "label"} <= set(preds[0])
    assert (abmil / "roc.png").stat().st_size > 1000
    heat = sorted((abmil / "heatmaps").glob("*.png"))
    assert len(heat) == 2


def test_abmil_attention_sits_on_signal_tiles(cohort, abmil):
    import torch

    from dirl.mil.models import Standardized, build

    splits = json.loads((abmil.parents[1] / "splits.json").read_text())
    saved = store.read_tile_scores(abmil / "attention.npz")  # what `dirl export` shows in QuPath
    assert sorted(saved) == sorted(cohort["signal"])
    ratios = []
    for i, f in enumerate(splits["splits"]):
        ck = torch.load(abmil / f"fold{i}" / "model.pt", weights_only=False)
        core = build(ck["model"], ck["in_dim"], len(ck["classes"]), **ck["options"])
        model = Standardized(core, torch.zeros(ck["in_dim"]), torch.ones(ck["in_dim"]))
        model.load_state_dict(ck["state_dict"])
        model.eval()
        for s in f["test"]:
            if s == "empty":
                continue
            x, _, _ = store.read_features(cohort["root"] / "features" / "dirl" / f"{s}.h5")
            with torch.inference_mode():
                _, a = model(torch.from_numpy(x))
            a = a.numpy()
            assert np.allclose(saved[s], a, rtol=1e-4, atol=1e-7)  # out of fold: the model that tested it
            sig = cohort["signal"][s]
            ratios.append(a[sig].mean() / a[~sig].mean())
    ratios = np.array(ratios)
    # the signal tiles (40 % of each slide) get more attention than stroma, on most slides and overall
    assert np.median(ratios) > 1.5, ratios
    assert (ratios > 1).mean() >= 0.75, ratios


def test_splits_reused_and_models_and_summary(cohort, abmil):
    from dirl.cli import main

    root = cohort["root"]
    shared = root / "mil" / "splits.json"
    before = shared.read_text()
    mtime = shared.stat().st_mtime_ns
    outs = {("dirl", "abmil"): abmil}
    outs[("dino", "abmil")] = _mil(cohort, "dino", "abmil", "--epochs", "10")
    outs[("dirl", "meanpool")] = _mil(cohort, "dirl", "meanpool", "--epochs", "10")
    # TransMIL's learning is tested on a toy problem in test_mil_models; here: it runs and paints maps
    outs[("dirl", "transmil")] = _mil(cohort, "dirl", "transmil", "--epochs", "3")
    assert shared.read_text() == before and shared.stat().st_mtime_ns == mtime  # reused, not rewritten
    for out in outs.values():
        assert (out / "metrics.json").exists()
    assert not (outs[("dirl", "meanpool")] / "heatmaps").exists()
    assert len(list((outs[("dirl", "transmil")] / "heatmaps").glob("*.png"))) == 2

    # summary of the real runs (the seed-by-seed logic: test_summary.py)
    args = ["summary", "--out", str(root / "summary")]
    args += [a for k, out in outs.items() for a in ("--metrics", f"{k[0]}/{k[1]}={out / 'metrics.json'}")]
    assert main(args) == 0
    rows = [
        dict(zip(["section", "model", "metric", "source", "seed", "mean", "sd", "n"], ln.split("\t")))
        for ln in (root / "summary" / "summary.tsv").read_text().splitlines()[1:]
    ]
    auc = {(r["section"], r["model"], r["source"]): r for r in rows if r["metric"] == "auc" and r["seed"] == "all"}
    assert {m for (_, m, _) in auc} == {"abmil", "meanpool", "transmil"}
    delta = float(auc[("mil_delta", "abmil", "dirl-dino")]["mean"])
    dirl_auc = json.loads((outs[("dirl", "abmil")] / "metrics.json").read_text())["mean"]["auc"]
    dino_auc = json.loads((outs[("dino", "abmil")] / "metrics.json").read_text())["mean"]["auc"]
    assert delta == pytest.approx(dirl_auc - dino_auc, abs=1e-5)
    assert ("mil", "meanpool", "dino") not in auc  # not run: absent, not zero
    md = (root / "summary" / "summary.md").read_text()
    assert "| abmil |" in md and "±" in md and "DiRL − DINO" in md


def test_changed_cohort_refuses_stale_splits(cohort, abmil, tmp_path):
    from dirl.cli import main

    sheet = tmp_path / "samples.tsv"
    lines = cohort["sheet"].read_text().splitlines()
    sheet.write_text("\n".join(lines[:-2]) + "\n")  # one slide fewer
    splits = tmp_path / "splits.json"
    splits.write_text((cohort["root"] / "mil" / "splits.json").read_text())
    run = [
        "mil",
        "--samples",
        str(sheet),
        "--features",
        str(cohort["root"] / "features" / "dirl"),
        "--model",
        "meanpool",
        "--out",
        str(tmp_path / "out"),
        "--splits",
        str(splits),
        "--epochs",
        "2",
        "--heatmaps",
        "0",
        "--threads",
        "1",
    ]
    assert main(run) == 1  # stale splits: a clear error, nothing written
    assert not (tmp_path / "out" / "metrics.json").exists()
    assert main(["splits", "--samples", str(sheet), "--out", str(splits), "--folds", "4"]) == 0
    assert main(run) == 0
    assert len(json.loads(splits.read_text())["slides"]) == len(lines) - 3


def test_final_model_records_what_applying_it_needs(cohort, abmil, tmp_path):
    """`--final`: one more model on every labelled slide for the folds' median best epoch count, and
    model.json with the classes, encoder, tile geometry and folds; a deployment plan refuses what does not
    fit, each in one line."""
    import torch

    from dirl.errors import ConfigError
    from dirl.mil import deploy

    root = cohort["root"]
    spec = {"encoder": str(root / "pretrain" / "dirl" / "backbone.pt")}
    out = _mil(cohort, "dirl", "meanpool", "--final", "--encoder-spec", json.dumps(spec))
    meta = json.loads((out / "model.json").read_text())
    folds = json.loads((out / "metrics.json").read_text())["folds"]
    assert meta["classes"] == list(CLASSES) and meta["encoder_spec"] == spec
    assert meta["tiles"] == {"mpp": 1.0, "tile_px": T} and meta["settings"]["final"] is True
    assert meta["final"]["epochs"] == int(np.median([f["best_epoch"] + 1 for f in folds]))
    ck = torch.load(out / "final" / "model.pt", weights_only=False)
    assert ck["n_slides"] == 2 * N_PER_CLASS and ck["epochs"] == meta["final"]["epochs"]
    x = store.read_features(root / "features" / "dirl" / "lym00.h5")[0]
    p, _ = deploy.apply(deploy.load_models(out, "final"), x)
    assert p.shape == (2,) and abs(p.sum() - 1) < 1e-5
    assert json.loads((abmil / "model.json").read_text())["final"] is None  # trained without --final

    tiling = {"mpp": 1.0, "tile_px": T}
    plan = deploy.plan({"from": str(root), "models": ["meanpool"], "sources": ["dirl"]}, tiling, ["tumour"])
    assert plan.pairs == {("dirl", "meanpool"): out} and plan.specs == {"dirl": spec}
    refusals = [
        ({"from": str(root), "models": ["abmil"], "sources": ["dirl"]}, tiling, [], "has no final model"),
        ({"from": str(root), "sources": ["dirl"], "models": ["abmil"], "use": "folds"}, tiling, [], "no encoder spec"),
        (
            {"from": str(root), "sources": ["dirl"], "models": ["meanpool"]},
            {"mpp": 0.5, "tile_px": T},
            [],
            "at 1 µm/px",
        ),
        ({"from": str(root), "sources": ["dirl"], "models": ["meanpool"]}, tiling, ["stroma"], "not among the trained"),
        ({"from": str(tmp_path)}, tiling, [], "not a trained cohort's results directory"),
    ]
    for section, tiles, labels, message in refusals:
        with pytest.raises(ConfigError, match=message):
            deploy.plan(section, tiles, labels)


def test_patient_bootstrap_resamples_patients():
    from dirl.mil.deploy import patient_bootstrap

    y = np.array([0, 0, 1, 1, 0, 1])
    prob = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.45, 0.55], [0.6, 0.4]])
    ci = patient_bootstrap(y, prob, ["a", "a", "b", "c", "d", "e"], n_boot=300)
    lo, hi = ci["auc"]
    assert 0 <= lo < 0.78 < hi <= 1  # the point estimate (7/9) lies inside
    assert patient_bootstrap(np.zeros(3, int), prob[:3], ["a", "b", "c"], n_boot=10)["auc"] is None
