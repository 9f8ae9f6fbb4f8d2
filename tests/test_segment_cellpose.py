"""Cellpose 4 backend, for real and offline: a randomly initialised Cellpose-SAM network is saved to a
temporary file and loaded through `CellposeModel(pretrained_model=path)` exactly as trained weights
would be. A random network gives arbitrary masks, so the tests check shapes, dtypes, alignment, the
µm -> px diameter handling, and that the pipelined path reproduces `CellposeModel.eval`."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from helpers_segment import synth_tiles

from dirl import store
from dirl.cli import main as cli
from dirl.errors import ConfigError, DirlError
from dirl.segment import features
from dirl.segment.cellpose_backend import CellposeBackend, CellposeParams, diameter_px, rescale_factor, resolve_weights

pytest.importorskip("cellpose")


def test_diameter_um_to_pixels():
    assert diameter_px(8.0, 0.5) == 16.0 and diameter_px(8.0, 0.25) == 32.0
    assert rescale_factor(8.0, 0.5) == pytest.approx(30 / 16)  # eval(diameter=16) rescales by 30/16
    assert rescale_factor(15.0, 0.5) == 1.0
    assert rescale_factor(0.0, 0.5) == 1.0 and diameter_px(0.0, 0.5) is None


def test_missing_weights_fail_with_a_place_to_put_them(tmp_path, monkeypatch):
    from cellpose import models

    monkeypatch.setattr(models, "MODEL_DIR", tmp_path / "models")
    with pytest.raises(DirlError, match=str(tmp_path / "models" / "cpsam")):
        resolve_weights("cpsam", download=False)

    def offline(name):
        raise OSError("network is unreachable")

    monkeypatch.setattr(models, "cache_model_path", offline)
    with pytest.raises(DirlError, match="could not be downloaded.*put the weights file at"):
        resolve_weights("cpsam", download=True)
    with pytest.raises(ConfigError, match="unknown Cellpose model"):
        resolve_weights("not-a-model")  # no silent fallback to Cellpose's default model
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_weights(str(tmp_path / "weights.pt"))
    # the CLI reports it as one clear error (exit 1), before touching the tiles
    assert (
        cli(
            [
                "segment",
                str(tmp_path / "none.zarr"),
                str(tmp_path / "c.zarr"),
                "--backend",
                "cellpose",
                "--model",
                "cpsam",
                "--no-download",
            ]
        )
        == 1
    )
    assert not (tmp_path / "c.zarr").exists()


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    import torch
    from cellpose.vit import CPSAM

    torch.manual_seed(0)
    net = CPSAM(dtype=torch.float32)  # builds the SAM ViT-L encoder with checkpoint=None: offline
    path = tmp_path_factory.mktemp("cp") / "cpsam_random.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.slow
def test_cellpose_backend_end_to_end(random_weights, tmp_path, monkeypatch):
    """`dirl segment --backend cellpose` on one tile, fp32 on CPU; the pipelined path (network() on
    the batch, masks() in the pool) gives exactly what CellposeModel.eval gives for the tile."""
    from cellpose import core, models

    from dirl import synth
    from dirl.segment import base

    seen, flows = [], []
    run_net, network = core.run_net, CellposeBackend.network

    def spy_run_net(net, x, **kw):
        seen.append((x.shape, kw.get("rsz")))
        return run_net(net, x, **kw)

    def spy_network(self, tiles, mpp):
        out = network(self, tiles, mpp)
        flows.append(out)
        return out

    monkeypatch.setattr(core, "run_net", spy_run_net)
    monkeypatch.setattr(CellposeBackend, "network", spy_network)
    path, _, _ = synth_tiles(tmp_path / "t.zarr", (synth.POPULATIONS["tumour"],), grid=1, tile_px=128)
    out = tmp_path / "c.zarr"
    rc = cli(
        [
            "segment",
            str(path),
            str(out),
            "--backend",
            "cellpose",
            "--model",
            str(random_weights),
            "--gpu",
            "false",
            "--precision",
            "fp32",
            "--diameter-um",
            "8",
            "--batch-size",
            "4",
            "--threads",
            "2",
            "--min-area-um2",
            "0",
            "--max-area-um2",
            "1e9",
        ]
    )
    assert rc == 0
    # 8 µm at 0.5 µm/px = 16 px: the image goes to the network rescaled by 30 / 16
    assert seen == [((1, 128, 128, 3), pytest.approx(30 / 16))]
    labels = store.open_map(out, "labels", 1)
    assert labels.shape == (1, 128, 128) and labels.dtype == np.uint32
    lab = np.asarray(labels[0])
    assert set(np.unique(lab)) == set(range(int(lab.max()) + 1))
    t = store.read_nuclei(out)
    assert len(t["tile"]) == int(lab.max()) and set(t) == set(features.COLUMNS)
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["backend"] == "cellpose" and g.attrs["model"] == str(random_weights)
    assert g.attrs["device"] == "cpu" and g.attrs["dtype"] == "float32"
    assert g.attrs["parameters"]["diameter_um"] == 8.0 and g.attrs["parameters"]["flow_threshold"] == 0.4

    # the same tile through Cellpose's own per-image call
    rgb = store.open_tiles(path).read(0, 1)[0]
    ref = models.CellposeModel(gpu=False, pretrained_model=str(random_weights), use_bfloat16=False)
    ref_masks, ref_flows, _ = ref.eval(rgb, diameter=diameter_px(8.0, 0.5), batch_size=4)
    ((dP, prob),) = flows
    np.testing.assert_allclose(dP[:, 0], ref_flows[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(prob[0], ref_flows[2], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(lab, base.filter_relabel(ref_masks, 0.5, 0, 1e9))


def test_stream_keeps_order_across_chunks_and_blocks():
    """The pipeline (network on chunk j+1 while the pool does chunk j's masks) returns every block
    whole and in order. A stand-in network (flows pointing at per-tile blob centres) replaces the ViT
    so this runs in a second; the dynamics are Cellpose's own."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import torch

    b = object.__new__(CellposeBackend)
    b.params = CellposeParams(net_tiles=2, threads=3, diameter_um=15.0, min_area_um2=0, max_area_um2=1e9)
    b.device = b.masks_on = torch.device("cpu")
    b._pool = ThreadPoolExecutor(3)
    calls = []

    def network(tiles, mpp):
        calls.append(("net", len(tiles), threading.get_ident()))
        n, t = len(tiles), tiles.shape[1]
        yy, xx = np.mgrid[0:t, 0:t].astype(np.float32)
        dP = np.zeros((2, n, t, t), np.float32)
        prob = np.full((n, t, t), -5, np.float32)
        for i in range(n):
            k = int(tiles[i, 0, 0, 0]) + 1  # tile i holds k blobs along the diagonal
            for j in range(k):
                cy = cx = (j + 0.5) * t / k
                r2 = (yy - cy) ** 2 + (xx - cx) ** 2
                inside = r2 < (t / k / 3) ** 2
                prob[i][inside] = 5
                d = np.sqrt(r2) + 1e-6
                dP[0, i][inside] = 5 * (cy - yy)[inside] / d[inside]  # Cellpose flows are 5x unit
                dP[1, i][inside] = 5 * (cx - xx)[inside] / d[inside]
        time.sleep(0.05)
        return dP, prob

    b.network = network
    blocks = [np.zeros((s, 48, 48, 3), np.uint8) for s in (3, 5, 1)]
    for blk in blocks:
        blk[:, 0, 0, 0] = np.arange(len(blk)) % 3  # 1, 2 or 3 blobs
    out = list(b.stream(iter(blocks), 0.5))
    b.close()
    assert [len(o) for o in out] == [3, 5, 1]
    for blk, lab in zip(blocks, out, strict=True):
        assert lab.dtype == np.uint32
        assert [int(x.max()) for x in lab] == [int(v) + 1 for v in blk[:, 0, 0, 0]]
    assert [c[1] for c in calls] == [2, 1, 2, 2, 1, 1]  # chunks of net_tiles within each block
