"""Damaged stores and full disks end with one clear line naming the slide or the path, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dirl import synth

ROOT = Path(__file__).resolve().parents[1]


def dirl(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dirl.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("store")
    slide = synth.write_slide(d / "s.svs", 512, 512, mpp=0.5, tissue="full", seed=3)
    out = d / "tiles" / "s.zarr"
    proc = dirl("tile", str(slide), str(out), "--tile-px", "32", "--min-tissue", "0", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    return out


def damage(tiles: Path, tmp_path: Path) -> Path:
    """A copy of the store with one byte of its first shard's index flipped: the crc32c the shard
    format stores with its index no longer matches (what a bad disk or a torn copy gives)."""
    import shutil

    copy = tmp_path / "tiles" / "s.zarr"
    shutil.copytree(tiles, copy)
    shard = copy / "images" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize("command", ["segment", "extract"])
def test_damaged_shard_names_slide_store_and_remedy(tiles, tmp_path, command):
    bad = damage(tiles, tmp_path)
    if command == "segment":
        proc = dirl("segment", str(bad), str(tmp_path / "cells.zarr"), "--threads", "1")
    else:
        import timm
        import torch

        weights = tmp_path / "vit.pt"
        torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32).state_dict(), weights)
        proc = dirl(
            "extract",
            str(bad),
            "--encoder",
            "timm:vit_tiny_patch16_224",
            "--weights",
            str(weights),
            "--img-size",
            "32",
            "--out",
            str(tmp_path / "f.h5"),
            "--workers",
            "1",
            "--batch-size",
            "64",
        )
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"tile store {bad} (slide s)" in errors[0] and "rerun the tile stage" in errors[0]


def test_full_disk_names_the_path(tiles, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a small tmpfs here (needs root): no way to fill a disk safely")
    try:
        out = mnt / "cells" / "s.zarr"
        proc = dirl("segment", str(tiles), str(out), "--threads", "1")
        assert proc.returncode == 1, proc.stderr[-2000:]
        errors = [ln for ln in proc.stderr.splitlines() if " ERROR " in ln]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert f"no space left on the device (or quota exceeded) while writing {out}" in errors[0]
        assert not out.exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
