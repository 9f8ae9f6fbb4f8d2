"""`dirl extract`: features equal the backbone's output on the stored tiles, in the tile store's row
order, in a file CLAM and TRIDENT read; a failed or killed run leaves nothing at the final path."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from helpers_kill import in_progress, kill_at
from helpers_models import write_backbone

from dirl import store
from dirl.cli import main
from dirl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one torch thread is fastest, and on a shared CPU much faster than several."""
    from dirl.runtime import torch_threads

    with torch_threads(1):
        yield


def make_store(
    path: Path,
    n: int,
    tile_px: int,
    *,
    seed: int = 0,
    slide_mpp: float = 0.499,
    mpp: float = 0.998,
    read_level: int = 1,
) -> np.ndarray:
    """A tile store of smooth random tiles with shuffled (non-raster) coordinates; returns coords."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float32)
    img = (
        torch.nn.functional.interpolate(
            torch.from_numpy(base).permute(0, 3, 1, 2), size=(tile_px, tile_px), mode="bilinear"
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    l0 = int(round(tile_px * mpp / slide_mpp))
    grid = np.array([(x, y) for y in range(20) for x in range(20)])[rng.permutation(400)[:n]] * l0
    attrs = dataclasses.replace(
        store.TileAttrs.without_slide(path.stem, tile_px, mpp=mpp, slide_mpp=slide_mpp, width=20 * l0, height=20 * l0),
        read_level=read_level,
    )
    shard_tiles = store.SHARD_TILES
    try:
        store.SHARD_TILES = 16  # several shards even for a small test store
        with store.tile_store_writer(path, coords=grid, tissue=np.ones(n), tile_px=tile_px, attrs=attrs) as w:
            w.write(0, img)
    finally:
        store.SHARD_TILES = shard_tiles
    return grid


def make_backbone(folder: Path, img: int = 32, embed: str = "mean") -> Path:
    return write_backbone(folder, img, embed, mean=[0.7, 0.5, 0.6], std=[0.2, 0.25, 0.3])


def reference(tiles: Path, backbone: Path, embed: str) -> np.ndarray:
    """The backbone's output for each tile, read straight from Zarr, without dirl's pipeline."""
    import timm

    meta = json.loads((backbone / "backbone.json").read_text())
    m = timm.create_model(
        meta["arch"], pretrained=False, num_classes=0, img_size=meta["img_size"], dynamic_img_size=True
    )
    m.load_state_dict(torch.load(backbone / "backbone.pt", weights_only=True))
    m.eval()
    imgs = np.asarray(zarr.open_group(str(tiles), mode="r")["images"][:])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    s = meta["img_size"]
    if x.shape[-1] != s:
        x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        tok = m.forward_features(x)
        return (tok[:, 0] if embed == "cls" else tok[:, m.num_prefix_tokens :].mean(1)).numpy()


def extract_args(tiles, bb, out, workers: int) -> list[str]:
    """`dirl extract` in batches of 8 (dividing neither the 37 tiles nor the 16-tile shards), one thread."""
    return ["extract", str(tiles), "--encoder", str(bb), "--out", str(out), "--batch-size", "8"] + [
        "--workers",
        str(workers),
        "--threads",
        "1",
    ]


@pytest.mark.parametrize("tile_px,embed,workers", [(48, "mean", 0), (32, "cls", 1)])
def test_features_equal_backbone_output_in_row_order(tmp_path, tile_px, embed, workers):
    tiles = tmp_path / "s1.zarr"
    coords = make_store(tiles, 37, tile_px)
    bb = make_backbone(tmp_path / "pretrain" / "dirl", img=32, embed=embed)
    out = tmp_path / "features" / "s1.h5"
    # batch 8 does not divide 37 tiles nor align with the 16-tile shards: order must still hold
    assert main(extract_args(tiles, bb, out, workers)) == 0
    x, c, attrs = store.read_features(out)
    assert x.dtype == np.float32 and x.shape == (37, 192)
    assert c.dtype == np.int64 and np.array_equal(c, coords)
    np.testing.assert_allclose(x, reference(tiles, bb, embed), atol=1e-5, rtol=1e-5)
    assert attrs["encoder"].startswith(f"dirl:vit_tiny_patch16_224 embed={embed} img=32 weights=sha256:")


def test_clam_and_trident_read_the_file(tmp_path):
    tiles = tmp_path / "tiles" / "slideA.zarr"
    make_store(tiles, 300, 32, slide_mpp=0.499, mpp=0.998, read_level=1)
    bb = make_backbone(tmp_path / "bb")
    assert (
        main(["extract", str(tiles), "--encoder", str(bb), "--out", str(tmp_path / "features"), "--threads", "1"]) == 0
    )
    path = tmp_path / "features" / "slideA.h5"
    # CLAM: datasets 'features' and 'coords'; heatmaps read coords.attrs patch_level / patch_size
    with h5py.File(path, "r") as f:
        features = torch.from_numpy(f["features"][:])
        coords = f["coords"][:]
        patch_level = f["coords"].attrs["patch_level"]
        patch_size = f["coords"].attrs["patch_size"]
        assert features.shape == (300, 192) and coords.shape == (300, 2)
        assert (int(patch_level), int(patch_size)) == (1, 32)
        # TRIDENT: level-0 patch size and magnifications on coords
        a = dict(f["coords"].attrs)
        assert int(a["patch_size_level0"]) == 64
        assert int(a["level0_magnification"]) == 20 and int(a["target_magnification"]) == 10
        ratio = a["level0_magnification"] // a["target_magnification"]
        assert int(a["patch_size_level0"]) == int(a["patch_size"]) * ratio
        assert a["name"] == "slideA" and int(a["overlap"]) == 0 and int(a["level0_width"]) == 1280
        assert "encoder" in f["features"].attrs
        # chunked by hundreds of rows, not one chunk per row nor one for the whole slide
        assert f["features"].chunks == (256, 192) and f["coords"].chunks[0] == 256
    contract = ROOT.parent / "shared" / "tools" / "contract.py"
    if contract.exists():
        r = subprocess.run([sys.executable, str(contract), str(tmp_path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_empty_store_gives_valid_empty_file(tmp_path):
    tiles = tmp_path / "e.zarr"
    with store.tile_store_writer(
        tiles,
        coords=np.zeros((0, 2)),
        tissue=np.zeros(0),
        tile_px=32,
        attrs=store.TileAttrs.without_slide("e", 32, width=1, height=1),
    ):
        pass
    bb = make_backbone(tmp_path / "bb")
    assert main(["extract", str(tiles), "--encoder", str(bb), "--out", str(tmp_path / "e.h5")]) == 0
    x, c, attrs = store.read_features(tmp_path / "e.h5")
    assert x.shape == (0, 192) and c.shape == (0, 2) and attrs["patch_size"] == 32


def test_failure_mid_extraction_leaves_no_file(tmp_path, monkeypatch):
    """Fault injection: the tile store's read fails at row 16; nothing appears at the final path."""
    tiles = tmp_path / "s.zarr"
    make_store(tiles, 40, 32)
    bb = make_backbone(tmp_path / "bb")
    out = tmp_path / "features" / "s.h5"
    original = store.TileStore.read

    def failing(self, a, b):
        if b > 16:
            raise OSError("injected read failure")
        return original(self, a, b)

    monkeypatch.setattr(store.TileStore, "read", failing)
    with pytest.raises(OSError, match="injected"):
        main(["extract", str(tiles), "--encoder", str(bb), "--out", str(out), "--batch-size", "8", "--workers", "0"])
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == [".s.h5.lock"]  # the partial temporary file is removed too


def test_killed_run_leaves_no_complete_looking_file(tmp_path):
    """SIGKILL during extraction (after some rows were written): no file at the final path; a rerun
    completes it and clears the partial file."""
    tiles = tmp_path / "s.zarr"
    make_store(tiles, 40, 32)
    bb = make_backbone(tmp_path / "bb")
    out = tmp_path / "features" / "s.h5"
    patch = """
        from dirl import store
        original = store.TileStore.read
        def read(self, a, b):
            if a >= 24:
                pause()
            return original(self, a, b)
        store.TileStore.read = read
    """
    kill_at(patch, extract_args(tiles, bb, out, 0), tmp_path / "reached")
    assert not out.exists() and in_progress(out), "rows should be going into a temporary sibling"
    assert main(["extract", str(tiles), "--encoder", str(bb), "--out", str(out), "--threads", "1"]) == 0
    assert store.read_features(out)[0].shape == (40, 192) and not store.leftovers(out)


def test_timm_encoder_with_local_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    from dirl.encoders import load_encoder

    torch.manual_seed(1)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32)
    save_file(m.state_dict(), str(tmp_path / "w.safetensors"))  # with a classifier head: dropped
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, tmp_path / "w.pth")
    a = load_encoder(
        "timm:vit_tiny_patch16_224", weights=str(tmp_path / "w.safetensors"), img_size=32, embed_kind="cls"
    )
    b = load_encoder("timm:vit_tiny_patch16_224", weights=str(tmp_path / "w.pth"), img_size=32, embed_kind="cls")
    assert a.dim == 192 and a.img_size == 32 and a.mean == (0.5, 0.5, 0.5)  # the model's own config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m.forward_head(m.forward_features(x), pre_logits=True)
        np.testing.assert_allclose(a.embed_batch(x), ref, atol=1e-5)
        np.testing.assert_allclose(b.embed_batch(x), ref, atol=1e-5)
    assert a.encoder_id.startswith("timm:vit_tiny_patch16_224 embed=cls img=32 weights=sha256:")
    with pytest.raises(ConfigError, match="local weights"):
        load_encoder("timm:vit_tiny_patch16_224")
    with pytest.raises(ConfigError, match="does not fit"):
        load_encoder("timm:vit_small_patch16_224", weights=str(tmp_path / "w.safetensors"), img_size=32)
    # a Hugging Face-style timm folder (config.json + weights), as public pathology encoders ship
    from timm.models._hub import save_for_hf

    save_for_hf(m, str(tmp_path / "hf"), model_config={"img_size": 32})
    c = load_encoder(f"local-dir:{tmp_path / 'hf'}")
    assert c.img_size == 32 and c.embed == "pooled"
    with torch.no_grad():
        np.testing.assert_allclose(c.embed_batch(x), ref, atol=1e-5)
    # and through the CLI
    tiles = tmp_path / "s.zarr"
    make_store(tiles, 10, 32)
    assert (
        main(
            [
                "extract",
                str(tiles),
                "--encoder",
                "timm:vit_tiny_patch16_224",
                "--weights",
                str(tmp_path / "w.safetensors"),
                "--img-size",
                "32",
                "--out",
                str(tmp_path / "s.h5"),
            ]
        )
        == 0
    )
    assert store.read_features(tmp_path / "s.h5")[0].shape == (10, 192)


def test_bad_backbone_is_a_clear_error(tmp_path):
    tiles = tmp_path / "s.zarr"
    make_store(tiles, 4, 32)
    assert main(["extract", str(tiles), "--encoder", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.h5")]) == 1
    bb = make_backbone(tmp_path / "bb")
    meta = json.loads((bb / "backbone.json").read_text())
    (bb / "backbone.json").write_text(json.dumps({**meta, "arch": "vit_small_patch16_224"}))
    assert main(["extract", str(tiles), "--encoder", str(bb), "--out", str(tmp_path / "x.h5")]) == 1
    assert not (tmp_path / "x.h5").exists()
