"""The unet backend (learned nucleus centres, hematoxylin outlines) and its training command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers_segment import synth_tiles

from dirl import store
from dirl.cli import main as cli
from dirl.errors import ConfigError
from dirl.runtime import fold_batchnorm
from dirl.segment import base, unet, unet_train
from dirl.segment.watershed import WatershedParams, segment_tile

CRC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "crc-typed-train"
IMAGES = ("img1", "img20", "img50", "img83")  # stroma, crowded glands, inflammation, mixed


def crc(names=IMAGES) -> list[tuple[str, np.ndarray, np.ndarray]]:
    if not CRC.exists():
        pytest.skip("../shared/data/crc-typed-train not present")
    from PIL import Image

    xy: dict[str, list] = {}
    with open(CRC / "nuclei.tsv") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            if r["image"] in names:
                xy.setdefault(r["image"], []).append((float(r["x"]), float(r["y"])))
    return [(n, np.asarray(Image.open(CRC / "images" / f"{n}.png").convert("RGB")), np.array(xy[n])) for n in names]


def inside(labels: np.ndarray, xy: np.ndarray) -> float:
    """Share of marked centres that fall inside a segmented nucleus."""
    return float((labels[xy[:, 1].astype(int), xy[:, 0].astype(int)] > 0).mean())


def splits(labels: np.ndarray, xy: np.ndarray, um: float = 4.0) -> float:
    """Share of marked centres with two or more segmented centroids within `um` (a nucleus cut in two)."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    c = np.array(ndimage.center_of_mass(labels > 0, labels, np.arange(1, labels.max() + 1)))[:, ::-1]
    return float((cKDTree(c).query_ball_point(xy, um / 0.5, return_length=True) >= 2).mean())


def merges(labels: np.ndarray, xy: np.ndarray) -> float:
    """Share of segmented nuclei holding two or more marked centres."""
    hit = labels[xy[:, 1].astype(int), xy[:, 0].astype(int)]
    return float((np.bincount(hit[hit > 0]) >= 2).sum() / max(int(labels.max()), 1))


def test_shipped_weights_carry_their_validation():
    net, meta = unet.load(unet.SHIPPED)
    assert meta["images"] == 70 and meta["centres"] == 15533 and meta["mpp"] == 0.5
    v = meta["validation"]
    assert len(v["folds"]) >= 3 and v["f1"] > 0.65 and v["recall"] > 0.8  # validated by image, not in-sample
    assert sum(p.numel() for p in net.parameters()) < 300_000


def test_finds_more_of_the_marked_nuclei_than_the_watershed():
    """Real H&E: large pale epithelial nuclei and crowded glands are where the watershed fails."""
    data = crc()
    with base.create("unet", {"threads": 2}) as b:
        got = [b.segment(rgb[None], 0.5)[0] for _, rgb, _ in data]
    ws = [base.filter_relabel(segment_tile(rgb, 0.5, WatershedParams()), 0.5, 10, 400) for _, rgb, _ in data]
    r_unet = np.mean([inside(g, xy) for g, (_, _, xy) in zip(got, data)])
    r_ws = np.mean([inside(g, xy) for g, (_, _, xy) in zip(ws, data)])
    assert r_unet >= 0.85 and r_unet > r_ws + 0.05, (r_unet, r_ws)
    for g, w, (name, _, xy) in zip(got, ws, data):  # one nucleus per marked centre: few cut in two, fewer merged
        assert splits(g, xy) <= 0.1, (name, splits(g, xy), splits(w, xy))
        assert merges(g, xy) <= merges(w, xy) + 0.01, (name, merges(g, xy), merges(w, xy))


def test_tiles_at_another_pixel_size_are_seen_at_the_networks():
    """A 40x tile (0.25 µm/px) gives the nuclei of the same tissue at 20x, at twice the coordinates."""
    import cv2

    ((_, rgb, xy),) = crc(("img20",))
    half = rgb[:224, :224]
    big = cv2.resize(half, (448, 448), interpolation=cv2.INTER_CUBIC)
    with base.create("unet", {"threads": 1}) as b:
        a = b.segment(half[None], 0.5)[0]
        c = b.segment(big[None], 0.25)[0]
    assert abs(int(c.max()) - int(a.max())) <= 0.15 * a.max()
    keep = (xy[:, 0] < 224) & (xy[:, 1] < 224)
    assert inside(c, xy[keep] * 2) >= inside(a, xy[keep]) - 0.05


def test_the_inference_network_paints_the_trained_ones_map():
    """BatchNorm folded into the convolutions for speed: the same centre map to float rounding."""
    net, _ = unet.load(unet.SHIPPED)
    ((_, rgb, _),) = crc(("img83",))
    tiles = np.stack([rgb[:96, :96], rgb[200:296, 300:396]])
    a, b = unet.centre_maps(net, tiles), unet.centre_maps(fold_batchnorm(net), tiles)
    assert a.max() > 0.5 and np.abs(a - b).max() < 1e-4


def test_glass_gives_nothing():
    glass = np.full((2, 96, 96, 3), 242, np.uint8)
    glass[1] = (230, 150, 200)  # flat pink: eosin only
    with base.create("unet", {"threads": 1}) as b:
        assert b.segment(glass, 0.5).max() == 0


@pytest.mark.slow
def test_the_training_command_learns_centres_and_validates_by_image(tmp_path):
    """Synthetic nuclei with known centres: a short training run on some tiles finds those of others."""
    from PIL import Image

    from dirl import synth

    pops = (synth.POPULATIONS["lymphocyte"], synth.POPULATIONS["tumour"])
    (tmp_path / "img").mkdir()
    rows = []
    for k in range(4):
        _, gt, _ = synth_tiles(tmp_path / f"t{k}.zarr", pops, grid=1, tile_px=192, seed=10 + k)
        tiles = store.open_tiles(tmp_path / f"t{k}.zarr")
        Image.fromarray(tiles.read(0, 1)[0]).save(tmp_path / "img" / f"s{k}.png")
        from scipy import ndimage

        ids = np.unique(gt[0][gt[0] > 0])
        for cy, cx in ndimage.center_of_mass(np.ones_like(gt[0]), gt[0], ids):
            rows.append(f"s{k}\t{cx:.1f}\t{cy:.1f}")
    (tmp_path / "points.tsv").write_text("image\tx\ty\n" + "\n".join(rows) + "\n")
    out = tmp_path / "w.npz"
    unet_train.main([str(tmp_path / "img"), str(tmp_path / "points.tsv"), str(out), "--steps", "120", "--folds", "2"])
    net, meta = unet.load(out)
    assert meta["images"] == 4 and meta["steps"] == 120 and len(meta["validation"]["folds"]) == 2
    # validated on tiles it did not train on; an untrained network finds nothing above threshold
    assert meta["validation"]["f1"] > 0.6, meta["validation"]
    data = unet_train.read_points(tmp_path / "img", tmp_path / "points.tsv", 0.5)
    assert unet_train.score(unet.network().eval(), data)["f1"] < 0.2
    # and the backend takes the file by name
    rc = cli(["segment", str(tmp_path / "t0.zarr"), str(tmp_path / "c.zarr"), "--backend", "unet"]
             + ["--weights", str(out), "--threads", "1"])  # fmt: skip
    assert rc == 0 and store.nucleus_count(tmp_path / "c.zarr") > 10


def test_bad_weights_are_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no such file"):
        base.create("unet", {"weights": str(tmp_path / "missing.npz")})
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not U-Net weights written by dirl"):
        base.create("unet", {"weights": str(bad)})
    other = tmp_path / "other.npz"
    np.savez(other, __meta__=np.array(json.dumps({"width": 16})), x=np.zeros(3))
    with pytest.raises(ConfigError, match="do not fit"):
        base.create("unet", {"weights": str(other)})
