"""What a careless command or a hostile file must not do: replace what dirl did not write, write over its
own input, let an orphan that started first win, parse a file into an out-of-memory kill, or end in a
traceback where one line says what to fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers_kill import stopped_at

from dirl import store, synth

ROOT = Path(__file__).resolve().parents[1]


def dirl(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dirl.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def one_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The single ERROR line of a failed command (and no traceback)."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.write_slide(tmp_path_factory.mktemp("slide") / "s.svs", 512, 512, mpp=0.5, tissue="full", seed=5)


TILE = ["--tile-px", "64", "--min-tissue", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def tiles(slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiles") / "s.zarr"
    assert dirl("tile", str(slide), str(out), *TILE).returncode == 0
    return out


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# outputs replace only what dirl wrote, never an input
def test_a_users_directory_is_never_replaced(slide: Path, tiles: Path, tmp_path: Path) -> None:
    """`dirl tile s.svs <folder of slides>` and `dirl export ... --out <folder>` used to delete the folder."""
    folder = tmp_path / "my slides"
    folder.mkdir()
    (folder / "a.svs").write_bytes(slide.read_bytes())
    (folder / "notes.txt").write_text("mine\n")
    before = snapshot(folder)
    for argv in (["tile", str(slide), str(folder), *TILE], ["export", str(tiles), "--out", str(folder)]):
        err = one_error(dirl(*argv))
        assert f"{folder} exists and is not" in err
    assert snapshot(folder) == before


def test_an_output_that_is_an_input_is_refused(slide: Path, tiles: Path, tmp_path: Path) -> None:
    """`dirl tile a.svs a.svs` replaced the slide with a store; `dirl segment T T` the tiles with cells."""
    copy = tmp_path / "a.svs"
    copy.write_bytes(slide.read_bytes())
    err = one_error(dirl("tile", str(copy), str(copy), *TILE))
    assert "is the input" in err and copy.read_bytes() == slide.read_bytes()
    before = snapshot(tiles)
    err = one_error(dirl("segment", str(tiles), str(tiles), "--threads", "1"))
    assert "is the input" in err and snapshot(tiles) == before


def test_a_foreign_file_is_not_replaced_but_dirls_own_output_is(slide: Path, tmp_path: Path) -> None:
    qc = tmp_path / "qc.png"
    qc.write_text("a user's text, not a PNG\n")
    out = tmp_path / "t.zarr"
    err = one_error(dirl("tile", str(slide), str(out), "--qc", str(qc), *TILE))
    assert f"{qc} exists and is not a .png file dirl writes" in err and not out.exists()
    qc.unlink()
    assert dirl("tile", str(slide), str(out), "--qc", str(qc), *TILE).returncode == 0
    assert dirl("tile", str(slide), str(out), "--qc", str(qc), *TILE).returncode == 0  # its own: replaced
    assert len(store.open_tiles(out)) == 64 and qc.read_bytes()[:4] == b"\x89PNG"
    # a Zarr store another program wrote is not dirl's either
    import zarr

    theirs = tmp_path / "theirs.zarr"
    zarr.open_group(str(theirs), mode="w").attrs["by"] = "someone else"
    err = one_error(dirl("tile", str(slide), str(theirs), *TILE))
    assert "not a store dirl wrote" in err and zarr.open_group(str(theirs), mode="r").attrs["by"] == "someone else"


def square_nuclei(path: Path, tiles: store.TileStore, per_tile: int) -> None:
    """A QuPath-style GeoJSON of `per_tile` square nuclei in every tile, in level-0 pixels."""
    side = int(tiles.attrs["tile_px_level0"])
    feats = []
    for x, y in tiles.coords.tolist():
        for k in range(per_tile):
            x0, y0 = x + 4 + 10 * k, y + 4
            ring = [[x0, y0], [x0 + 6, y0], [x0 + 6, y0 + 6], [x0, y0 + 6], [x0, y0]]
            assert x0 + 6 < x + side
            feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


# --------------------------------------------------------------------------------------------------
# an orphan that started first never wins, however late it opens its output
PAUSE_BEFORE_OPENING = """
    from dirl import store
    original = store.map_store_writer
    def map_store_writer(*args, **kwargs):
        pause()  # the nuclei file is parsed; the output not yet opened
        return original(*args, **kwargs)
    store.map_store_writer = map_store_writer
"""


def test_an_orphan_that_opens_its_output_late_is_discarded(tiles: Path, tmp_path: Path) -> None:
    """An import-backend segment job parses its file before it opens its store: it used to take its write
    ticket only then, after a newer run had taken one, and its rename won (an older store replaced the
    newer). The ticket is taken when the command starts."""
    out = tmp_path / "cells" / "s.zarr"
    big, small = tmp_path / "orphan.geojson", tmp_path / "newer.geojson"
    t = store.open_tiles(tiles)
    square_nuclei(big, t, per_tile=5)
    square_nuclei(small, t, per_tile=2)
    argv = ["segment", str(tiles), str(out), "--backend", "import", "--threads", "1"]
    orphan = stopped_at(PAUSE_BEFORE_OPENING, [*argv, "--nuclei", str(big)], tmp_path / "reached")
    try:
        newer = dirl(*argv, "--nuclei", str(small))
        assert newer.returncode == 0, newer.stderr[-2000:]
    finally:
        os.kill(orphan.pid, signal.SIGCONT)
    assert orphan.wait(120) == 1
    assert "a newer write of" in orphan.stderr.read().decode()
    orphan.stderr.close()
    assert store.nucleus_count(out) == 2 * len(t)  # the newer run's nuclei, not the orphan's 5 per tile


# --------------------------------------------------------------------------------------------------
# hostile and malformed nuclei files: one line, bounded memory
def nuclei_error(tiles: Path, tmp_path: Path, path: Path) -> str:
    out = tmp_path / "cells.zarr"
    proc = dirl("segment", str(tiles), str(out), "--backend", "import", "--nuclei", str(path), "--threads", "1")
    assert not out.exists()
    return one_error(proc)


def test_deeply_nested_brackets_are_refused_before_parsing(tiles: Path, tmp_path: Path) -> None:
    """200 KB of nested brackets took 23 GB and the OOM killer (ijson is quadratic in depth)."""
    bomb = tmp_path / "bomb.geojson"
    bomb.write_text('{"type": "FeatureCollection", "features": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert "nested deeper than 32 levels" in nuclei_error(tiles, tmp_path, bomb)


def test_brackets_inside_strings_do_not_count(tiles: Path, tmp_path: Path) -> None:
    from dirl import jsonsafe

    name = '[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[ \\" {{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{ \\\\'
    ok = tmp_path / "ok.json"
    ok.write_text('{"features": [{"properties": {"classification": {"name": "' + name + '"}}}]}')
    for chunk in (3, 7, 1 << 20):  # escapes and strings cut by a chunk boundary
        jsonsafe.CHUNK = chunk
        try:
            jsonsafe.check(ok)
        finally:
            jsonsafe.CHUNK = 16 * 2**20


def test_malformed_nuclei_files_are_one_line(tiles: Path, tmp_path: Path) -> None:
    not_dicts = tmp_path / "list.geojson"
    not_dicts.write_text(json.dumps({"type": "FeatureCollection", "features": [1, "two", [3]]}))
    assert "malformed" in nuclei_error(tiles, tmp_path, not_dicts)
    folder = tmp_path / "a folder.geojson"
    folder.mkdir()
    assert "is not a regular file" in nuclei_error(tiles, tmp_path, folder)
    fifo = tmp_path / "pipe.geojson"
    os.mkfifo(fifo)
    assert "is not a regular file" in nuclei_error(tiles, tmp_path, fifo)


# --------------------------------------------------------------------------------------------------
# full disks and read-only directories: one line naming the path
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root): no way to fill a disk safely")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(mnt: Path) -> None:
    """Fill the file system to the last byte (unbuffered writes, smaller and smaller)."""
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for size in (2**20, 2**12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_a_full_disk_before_the_lock_ticket_is_one_line(slide: Path, small_disk: Path) -> None:
    (small_disk / "results").mkdir()
    fill(small_disk)
    out = small_disk / "results" / "tiles" / "s.zarr"
    err = one_error(dirl("tile", str(slide), str(out), *TILE))
    assert "no space left on the device" in err and str(small_disk / "results") in err


def test_a_full_disk_during_the_pretraining_checkpoint_is_one_line(small_disk: Path, tmp_path: Path) -> None:
    """torch.save on a full disk raises RuntimeError('... basic_ios::clear' / 'file write failed')."""
    from helpers_toy import TINY_PRETRAIN, write_toy_cohort

    t, p = write_toy_cohort(tmp_path / "cohort", n_slides=1, n_tiles=4, tile_px=64)
    out = small_disk / "pretrain" / "dirl"
    args = ["--tiles", *map(str, t), "--priors", *map(str, p), *TINY_PRETRAIN, "--epochs", "1", "--batch-size", "4"]
    proc = dirl("pretrain", str(out), *args, "--head-hidden-dim", "2048", "--out-dim", "65536")  # ~0.6 GB state
    err = one_error(proc)
    assert "no space left on the device" in err and "checkpoint.pt" in err
    assert not (out / "checkpoint.pt").exists()


def test_a_read_only_results_directory_is_one_line(slide: Path, small_disk: Path) -> None:
    (small_disk / "results").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    err = one_error(dirl("tile", str(slide), str(small_disk / "results" / "s.zarr"), *TILE))
    assert "cannot write" in err and "Read-only file system" in err


def test_a_torn_last_log_line_does_not_stop_the_resume(tmp_path: Path) -> None:
    """A job killed while writing log.jsonl leaves half a line: every resume used to crash on it."""
    from helpers_toy import TINY_PRETRAIN, write_toy_cohort

    t, p = write_toy_cohort(tmp_path / "cohort", n_slides=1, n_tiles=8, tile_px=64)
    out = tmp_path / "run"
    args = ["--tiles", *map(str, t), "--priors", *map(str, p), *TINY_PRETRAIN, "--epochs", "2", "--batch-size", "4"]
    assert dirl("pretrain", str(out), *args, "--stop-after-steps", "2").returncode == 0
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 7.')  # torn
    proc = dirl("pretrain", str(out), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_an_absurd_resolution_in_the_metadata_yields_to_the_sheet(tmp_path: Path) -> None:
    """The error says "set `mpp` in the sample sheet": the sheet's value must then be taken."""
    import tifffile

    from dirl.errors import SlideError
    from dirl.slide import Slide

    path = tmp_path / "x.tiff"  # resolution tags of 2 px/cm: 5,000 µm/px
    rgb = np.full((512, 512, 3), 200, np.uint8)
    tifffile.imwrite(path, rgb, tile=(256, 256), resolution=(2, 2), resolutionunit="CENTIMETER", photometric="rgb")
    with pytest.raises(SlideError, match="outside"):
        Slide.open(path)
    with Slide.open(path, mpp=0.5) as s:
        assert s.mpp == 0.5 and s.mpp_source == "sample sheet"
