"""GPU out-of-memory: the batch is halved and the same rows retried, down to 1, then a clear DirlError.

Fault injection, no GPU needed: the real models (a tiny timm ViT for `dirl extract`, a small network
run through Cellpose's own `core.run_net` for `dirl segment`) are wrapped in a module that raises
`torch.OutOfMemoryError`, the error CUDA raises, when it is given more than `k` images at once. The
retried results must equal an un-retried run exactly: same rows, same order, same values."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from test_extract import make_backbone, make_store

from dirl import store
from dirl.errors import DirlError
from dirl.oom import GpuOutOfMemoryError, HalvingBatch, is_oom


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    from dirl.runtime import torch_threads

    with torch_threads(1):
        yield


def _oom(n: int, k: int) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} images (limit {k}).")


# --------------------------------------------------------------------------------------------------
# the helper
def test_map_halves_retries_the_same_rows_and_keeps_order(caplog):
    seen: list[tuple[int, int]] = []

    def fn(chunk):
        if len(chunk) > 3:
            raise _oom(len(chunk), 3)
        seen.append((int(chunk[0]), len(chunk)))
        return chunk * 10

    hb = HalvingBatch(16, setting="extract.batch_size", slide="s1", what="test model")
    with caplog.at_level(logging.WARNING, logger="dirl.oom"):
        out = hb.map(fn, np.arange(37))
    np.testing.assert_array_equal(np.concatenate(out), np.arange(37) * 10)
    rows = np.concatenate([np.arange(a, a + m) for a, m in seen])
    np.testing.assert_array_equal(rows, np.arange(37))  # each row exactly once, in order
    assert hb.batch == 2 and hb.retries == 3  # 16 -> 8 -> 4 -> 2, then it stays at 2
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 3 and all("slide 's1'" in m and "extract.batch_size" in m for m in msgs)
    assert "retrying with batch size 8" in msgs[0] and "retrying with batch size 2" in msgs[-1]


def test_map_short_last_chunk_and_later_failures():
    """A chunk shorter than the batch halves from its own size; an OOM in the middle of a run (memory
    taken by someone else) only redoes that chunk."""
    calls: list[tuple[int, int]] = []
    limit = {"k": 100}

    def fn(chunk):
        calls.append((int(chunk[0]), len(chunk)))
        if len(chunk) > limit["k"]:
            raise _oom(len(chunk), limit["k"])
        if int(chunk[0]) == 8:
            limit["k"] = 2  # from now on only 2 fit
        return chunk.copy()

    hb = HalvingBatch(8, setting="x")
    out = hb.map(fn, np.arange(21))
    np.testing.assert_array_equal(np.concatenate(out), np.arange(21))
    # 0..7 ok, 8..15 ok (then memory shrinks), 16..20 (5 rows) fails -> 2 (from 5, not from 8)
    assert calls[:4] == [(0, 8), (8, 8), (16, 5), (16, 2)] and hb.batch == 2


def test_run_halves_the_batch_argument_and_remembers_it():
    calls: list[int] = []

    def fn(bs):
        calls.append(bs)
        if bs > 5:
            raise RuntimeError("CUDA error: out of memory")  # the older, plain RuntimeError form
        return bs

    hb = HalvingBatch(32, setting="segmentation.batch_size")
    assert hb.run(fn) == 4 and calls == [32, 16, 8, 4]
    assert hb.run(fn) == 4 and calls[-1] == 4 and len(calls) == 5  # no new failures next time


def test_gives_up_at_batch_one_with_a_clear_error():
    calls: list[int] = []

    def fn(chunk):
        calls.append(len(chunk))
        raise _oom(len(chunk), 0)

    hb = HalvingBatch(4, setting="extract.batch_size", slide="slideX", what="feature extraction")
    with pytest.raises(DirlError, match=r"slide 'slideX'.*batch size 1.*smaller extract\.batch_size") as ei:
        hb.map(fn, np.arange(10))
    assert isinstance(ei.value, GpuOutOfMemoryError)
    assert isinstance(ei.value.__cause__, torch.OutOfMemoryError)
    assert calls == [4, 2, 1]
    with pytest.raises(GpuOutOfMemoryError, match="segmentation.batch_size"):
        HalvingBatch(8, setting="segmentation.batch_size").run(lambda bs: (_ for _ in ()).throw(_oom(bs, 0)))


def test_other_errors_are_not_retried():
    calls: list[int] = []

    def fn(chunk):
        calls.append(len(chunk))
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        HalvingBatch(8, setting="x").map(fn, np.arange(10))
    assert calls == [8]
    assert is_oom(_oom(1, 0)) and is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_oom(ValueError("out of memory")) and not is_oom(RuntimeError("device-side assert"))


# --------------------------------------------------------------------------------------------------
# dirl extract
class OomAbove(torch.nn.Module):
    """A timm model that, like a GPU short of memory, fails on batches of more than `k` images."""

    def __init__(self, model: torch.nn.Module, k: int):
        super().__init__()
        self.model, self.k, self.sizes = model, k, []
        self.num_prefix_tokens = model.num_prefix_tokens
        self.global_pool = model.global_pool

    def forward_features(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.k:
            raise _oom(x.shape[0], self.k)
        return self.model.forward_features(x)

    def forward_head(self, x, pre_logits: bool = False):
        return self.model.forward_head(x, pre_logits=pre_logits)


@pytest.fixture(scope="module")
def extract_inputs(tmp_path_factory):
    from dirl.encoders import load_encoder

    d = tmp_path_factory.mktemp("oom_extract")
    tiles = d / "slideA.zarr"
    make_store(tiles, 37, 32)  # 16-tile shards; 37 rows: a short last batch
    enc = load_encoder(str(make_backbone(d / "bb", img=32, embed="mean")))
    return tiles, enc


def _extract(tiles, enc, out, batch):
    from dirl.extract import extract_slide

    extract_slide(tiles, out, enc, torch.device("cpu"), batch=batch, workers=0)
    x, c, _ = store.read_features(out)
    return x, c


def test_extract_retries_with_smaller_batches_and_gives_identical_features(extract_inputs, tmp_path, caplog):
    import dataclasses

    """Bit for bit equal to an un-retried run whose model calls have the size the retry settles on;
    equal to float32 rounding (CPU and GPU matrix kernels block sums by batch size) to the un-retried
    run at the original batch size."""
    tiles, enc = extract_inputs
    ref_x, ref_c = _extract(tiles, enc, tmp_path / "ref.h5", batch=16)
    ref2_x, _ = _extract(tiles, enc, tmp_path / "ref2.h5", batch=2)  # same forward sizes as the retry

    wrapped = OomAbove(enc.model, k=3)
    enc_oom = dataclasses.replace(enc, model=wrapped)
    with caplog.at_level(logging.WARNING, logger="dirl.oom"):
        x, c = _extract(tiles, enc_oom, tmp_path / "oom.h5", batch=16)
    np.testing.assert_array_equal(c, ref_c)
    np.testing.assert_array_equal(x, ref2_x)  # bit for bit at the same forward sizes
    np.testing.assert_allclose(x, ref_x, rtol=1e-5, atol=1e-6)  # and the un-retried batch-16 run
    assert wrapped.sizes[:4] == [16, 8, 4, 2] and max(wrapped.sizes[4:]) == 2
    assert sum(s for s in wrapped.sizes if s <= 3) == 37  # every tile through the model once
    msgs = [r.getMessage() for r in caplog.records]
    assert any("slide 'slideA'" in m and "retrying with batch size 2" in m for m in msgs)


def test_extract_gives_up_at_batch_one_naming_slide_and_setting(extract_inputs, tmp_path):
    import dataclasses

    tiles, enc = extract_inputs
    out = tmp_path / "features" / "slideA.h5"
    with pytest.raises(DirlError, match=r"slide 'slideA'.*batch size 1.*extract\.batch_size"):
        _extract(tiles, dataclasses.replace(enc, model=OomAbove(enc.model, k=0)), out, batch=8)
    assert not out.exists() and not store.leftovers(out)  # nothing left behind (but the writers' lock)


# --------------------------------------------------------------------------------------------------
# dirl segment, Cellpose backend
class TinyFlowNet(torch.nn.Module):
    """Stands in for Cellpose-SAM (a ViT-L, far too slow for a unit test) behind the same interface
    `cellpose.core.run_net` uses: `.device`, `.dtype`, forward -> (flows+prob (B, 3, H, W), style)."""

    def __init__(self, k: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 5, padding=2)
        self.k, self.sizes = k, []
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.k:
            raise _oom(x.shape[0], self.k)
        y = self.conv(x)
        return y, y.mean(dim=(2, 3)).repeat(1, 86)[:, :256]


def _cellpose_backend(k: int, batch_size: int):
    """A CellposeBackend over TinyFlowNet; everything but the network (loading weights) is the real one."""
    from types import SimpleNamespace

    pytest.importorskip("cellpose")
    from dirl.segment.base import Backend
    from dirl.segment.cellpose_backend import CellposeBackend, CellposeParams

    b = CellposeBackend.__new__(CellposeBackend)
    Backend.__init__(b, CellposeParams(batch_size=batch_size, net_tiles=64, threads=1, diameter_um=0.0))
    b.cp = SimpleNamespace(net=TinyFlowNet(k))
    b.weights, b.bf16 = "tiny", False
    b.device = b.masks_on = torch.device("cpu")
    b._pool = ThreadPoolExecutor(1)
    b._init_net_batch()
    return b


def test_cellpose_network_retries_with_fewer_patches_per_forward(caplog):
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (7, 48, 48, 3)).astype(np.uint8)
    ref = _cellpose_backend(k=100, batch_size=8)
    small = _cellpose_backend(k=100, batch_size=2)
    oom = _cellpose_backend(k=2, batch_size=8)
    try:
        dP0, p0 = ref.network(tiles, 0.5)
        dP2, p2 = small.network(tiles, 0.5)
        with caplog.at_level(logging.WARNING, logger="dirl.oom"):
            dP, p = oom.network(tiles, 0.5)
    finally:
        for b in (ref, small, oom):
            b.close()
    assert oom.cp.net.sizes[:3] == [7, 4, 2] and max(oom.cp.net.sizes[3:]) == 2 and oom.net_batch.batch == 2
    assert dP.shape == (2, 7, 48, 48) and p.shape == (7, 48, 48)
    np.testing.assert_array_equal(dP, dP2)
    np.testing.assert_array_equal(p, p2)
    np.testing.assert_allclose(dP, dP0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p, p0, rtol=1e-5, atol=1e-6)
    assert any("segmentation.batch_size" in r.getMessage() for r in caplog.records)


def test_segment_gives_up_at_batch_one_naming_the_slide(tmp_path):
    from dirl.segment.run import segment_store

    tiles = tmp_path / "slideB.zarr"
    make_store(tiles, 5, 32)
    out = tmp_path / "cells" / "slideB.zarr"
    b = _cellpose_backend(k=0, batch_size=4)
    msg = r"slide 'slideB'.*Cellpose network.*batch size 1.*segmentation\.batch_size"
    with b, pytest.raises(DirlError, match=msg):
        segment_store(tiles, out, b, threads=1)
    assert not out.exists()
