"""Each stage SIGKILLed mid-write: nothing at the final path looks complete, and the rerun completes
the output (identical to an uninterrupted run) and clears what the killed run left.

Extraction's case lives with its other tests in test_extract.py."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers_kill import in_progress, kill_at, stopped_at

from dirl import store, synth
from dirl.cli import main
from dirl.errors import StoreError


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.write_slide(tmp_path_factory.mktemp("slide") / "s.svs", 1024, 1024, mpp=0.5, tissue="full", seed=11)


TILE_ARGS = ["--tile-px", "32", "--min-tissue", "0", "--threads", "1"]  # 1024 tiles: 4 shards


@pytest.fixture(scope="module")
def tiles(slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiles") / "s.zarr"
    assert main(["tile", str(slide), str(out), *TILE_ARGS]) == 0
    return out


def pause_at_tile_shard(n: int) -> str:
    """A patch for `kill_at`: the tile writer pauses before writing shard `n`."""
    return f"""
        from dirl import store
        original = store.TileWriter.write_encoded
        def write_encoded(self, shard, chunks):
            if shard == {n}:
                pause()
            return original(self, shard, chunks)
        store.TileWriter.write_encoded = write_encoded
    """


def test_killed_tiling(slide: Path, tiles: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiles" / "s.zarr"
    patch = pause_at_tile_shard(2)
    kill_at(patch, ["tile", str(slide), str(out), *TILE_ARGS], tmp_path / "reached")
    assert not out.exists() and in_progress(out)
    with pytest.raises(StoreError):
        store.open_tiles(out)
    assert main(["tile", str(slide), str(out), *TILE_ARGS]) == 0
    assert not store.leftovers(out)
    a, b = store.open_tiles(out), store.open_tiles(tiles)
    assert len(a) == 1024
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.read(0, len(a)), b.read(0, len(b)))


def test_orphaned_writer_never_replaces_a_newer_store(slide: Path, tiles: Path, tmp_path: Path) -> None:
    """snakemake killed, its job survives (an orphan, frozen here mid-write); after --unlock the rerun
    writes the store; then the orphan wakes up and finishes. The rerun's store stays; the orphan's
    result is discarded with a clear error, and its temporary output was never cleared under it."""
    out = tmp_path / "tiles" / "s.zarr"
    patch = pause_at_tile_shard(1)
    orphan = stopped_at(patch, ["tile", str(slide), str(out), *TILE_ARGS], tmp_path / "reached")
    try:
        assert in_progress(out)
        assert main(["tile", str(slide), str(out), *TILE_ARGS]) == 0  # the rerun
        assert in_progress(out)  # the orphan's (live) temporary store was left alone
        rerun = sorted(p.name for p in out.rglob("*"))
    finally:
        os.kill(orphan.pid, signal.SIGCONT)
    assert orphan.wait(120) == 1
    assert "a newer write of" in orphan.stderr.read().decode()
    orphan.stderr.close()
    assert sorted(p.name for p in out.rglob("*")) == rerun and not store.leftovers(out)
    a, b = store.open_tiles(out), store.open_tiles(tiles)
    np.testing.assert_array_equal(a.read(0, len(a)), b.read(0, len(b)))


def test_killed_segmentation(tiles: Path, tmp_path: Path) -> None:
    out, clean = tmp_path / "cells" / "s.zarr", tmp_path / "clean.zarr"
    args = ["--threads", "1"]
    patch = """
        from dirl import store
        original = store.NucleusTableWriter.append
        calls = []
        def append(self, cols):
            calls.append(1)
            if len(calls) == 2:  # one shard of masks and nuclei written
                pause()
            return original(self, cols)
        store.NucleusTableWriter.append = append
    """
    kill_at(patch, ["segment", str(tiles), str(out), *args], tmp_path / "reached")
    assert not out.exists() and in_progress(out)
    assert main(["segment", str(tiles), str(out), *args]) == 0
    assert main(["segment", str(tiles), str(clean), *args]) == 0
    assert not store.leftovers(out)
    a, b = zarr.open_group(str(out), mode="r"), zarr.open_group(str(clean), mode="r")
    assert a.attrs["n_nuclei"] == b.attrs["n_nuclei"] > 100
    np.testing.assert_array_equal(a["labels"][:], b["labels"][:])


def test_killed_pretraining_resumes_exactly(tmp_path: Path) -> None:
    """Killed mid-epoch, after a step that was logged but not checkpointed: the rerun resumes from the
    last checkpoint, drops the orphan log line and ends with the uninterrupted run's losses."""
    from helpers_toy import TINY_PRETRAIN, write_toy_cohort

    from dirl.runtime import torch_threads

    t, p = write_toy_cohort(tmp_path / "cohort", n_slides=2, n_tiles=8, tile_px=64)
    args = [
        "--tiles",
        *map(str, t),
        "--priors",
        *map(str, p),
        *TINY_PRETRAIN,
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--local-crops-number",
        "1",
        "--local-crop-size",
        "32",
        "--checkpoint-every-steps",
        "2",
    ]
    full, killed = tmp_path / "full", tmp_path / "killed"
    with torch_threads(1):  # a tiny model: one thread is fastest on a shared CPU
        assert main(["pretrain", str(full), *args]) == 0
    patch = """
        import torch
        torch.set_num_threads(1)
        from dirl.ssl import trainer as train
        original = train.Trainer.step
        def step(self, batch, step, epoch):
            if step == 3:  # steps 0-2 done and logged; the checkpoint holds 2 of them
                pause()
            return original(self, batch, step, epoch)
        train.Trainer.step = step
    """
    kill_at(patch, ["pretrain", str(killed), *args], tmp_path / "reached")
    log = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and not (killed / "backbone.pt").exists()
    with torch_threads(1):
        assert main(["pretrain", str(killed), *args]) == 0

    def losses(out: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]

    assert losses(killed) == losses(full) and len(losses(full)) == 4
    assert not store.leftovers(killed / "checkpoint.pt")
