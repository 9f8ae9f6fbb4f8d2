"""Atomic outputs: every writer builds its output under a temporary sibling name and renames it into
place when complete, guarded by a lock against concurrent writers, and replaces only what dirl wrote.

Light on purpose (no zarr, no numpy): `dirl <command>` claims its outputs (`claim`) the moment it starts.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from dirl.errors import StoreError

log = logging.getLogger(__name__)


# outputs whose write ticket the running command took when it started (`claim`), by resolved path
_CLAIMS: dict[Path, int] = {}


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; rename it to `final` only if the block succeeds.

    Works for files and directories (Zarr stores). A failed or killed block leaves at most a
    `.tmp-*` sibling, never something at `final`; the next write of `final` removes it. Something
    already at `final` is replaced only if dirl wrote it (`check_replaceable`).

    Safe against a concurrent writer of the same output, such as an orphaned job of an earlier run
    that survived its `snakemake` (normal on a cluster): each write holds a number from the output's
    lock file (`.{name}.lock`, under an exclusive `flock`), taken when its command started (`claim`)
    or else when the block starts, and renames into place, under the same lock, only if no write of
    `final` took a number after it; otherwise its result is discarded (`StoreError`). While it works,
    a writer holds a lock on its temporary sibling, so the clean-up of leftovers removes only the
    temporaries of dead writers.
    """
    final = Path(final)
    check_replaceable(final)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    with _disk_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        ticket = _CLAIMS.pop(final.resolve(), None)
        with _locked(_lock_path(final)) as lock:
            if ticket is None:
                ticket = _next_ticket(lock)
            for stale in leftovers(final):
                _remove_if_dead(stale)
            alive = _hold(_lock_path(tmp))  # before the lock above is released: never seen as dead
    try:
        with _disk_errors(final):
            yield tmp
        with _disk_errors(final), _locked(_lock_path(final)) as lock:
            if _read_ticket(lock) != ticket:
                raise StoreError(
                    f"a newer write of {final} started while this one was running (an orphaned "
                    "job of an earlier run?); this result is discarded and the newer one kept"
                )
            check_replaceable(final)  # what appeared there meanwhile, too
            if final.exists():  # os.replace cannot replace a non-empty directory
                trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(final, trash)
                os.replace(tmp, final)
                _remove(trash)
            else:
                os.replace(tmp, final)
    finally:
        _remove(tmp)
        _release(alive)


def claim(outputs: list[str | os.PathLike], inputs: list[str | os.PathLike] = ()) -> None:
    """Take the write tickets of a command's outputs when it starts, before any work: a job that
    started earlier (an orphan of an earlier run) then holds an older ticket than this one, however late
    it opens its output, and its rename is refused. Also refuses, before any work, an output that is
    one of the inputs (or inside one, or holds one) and anything at an output that dirl did not write."""
    ins = [Path(p).resolve() for p in inputs if p]
    for out in outputs:
        final = Path(out)
        res = final.resolve()
        for i in ins:
            if res == i or i in res.parents or res in i.parents:
                raise StoreError(f"output {final} is the input {i} (or inside it, or holds it): choose another output")
        check_replaceable(final)
        with _disk_errors(final):
            final.parent.mkdir(parents=True, exist_ok=True)
            with _locked(_lock_path(final)) as lock:
                _CLAIMS[res] = _next_ticket(lock)


# What a file output of dirl starts with, by suffix: only such a file is replaced by a new write.
_MAGIC: dict[str, tuple[bytes, ...]] = {
    ".png": (b"\x89PNG",),
    ".jpg": (b"\xff\xd8",),
    ".h5": (b"\x89HDF",),
    ".pt": (b"PK\x03\x04",),
    ".npz": (b"PK\x03\x04", b"PK\x05\x06"),
    ".gz": (b"\x1f\x8b",),
    ".svs": (b"II*\x00", b"MM\x00*", b"II+\x00"),
    ".tiff": (b"II*\x00", b"MM\x00*", b"II+\x00"),
    ".tif": (b"II*\x00", b"MM\x00*", b"II+\x00"),
}
_JSON = {".json", ".geojson", ".jsonl"}
_TEXT = {".tsv", ".csv", ".md", ".txt", ".log"}


def check_replaceable(final: str | os.PathLike) -> None:
    """Raise unless `final` is absent or is an output dirl wrote, of the kind the path names: a Zarr store
    (`.zarr`) whose attributes carry `dirl_version`, or a regular file that starts as such a file does
    (PNG, HDF5, a torch or NumPy zip, JSON, text, TIFF...). A user's directory, a slide or any other file
    at an output path is never deleted."""
    final = Path(final)
    if not os.path.lexists(final):
        return
    what = f"{final} exists and is not "
    if final.suffix == ".zarr":
        try:
            meta = json.loads((final / "zarr.json").read_text())
            ours = "dirl_version" in meta.get("attributes", {})
        except (OSError, ValueError, AttributeError):
            ours = False
        if not (final.is_dir() and not final.is_symlink() and ours):
            raise StoreError(what + "a store dirl wrote: move it away or choose another output path")
        return
    if final.is_dir() or not final.is_file():
        raise StoreError(what + "a file (a directory, link or special file): choose another output path")
    head = _head(final)
    suffix = final.suffix.lower()
    if suffix in _MAGIC:
        ok = head.startswith(_MAGIC[suffix]) or not head
    elif suffix in _JSON:
        ok = not head.strip() or head.lstrip()[:1] in (b"{", b"[")
    elif suffix in _TEXT:
        ok = b"\x00" not in head
    else:
        ok = False
    if not ok:
        raise StoreError(what + f"a {suffix or 'suffix-less'} file dirl writes: move it away or choose another path")


def _head(path: Path, n: int = 4096) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


@contextlib.contextmanager
def _disk_errors(final: Path) -> Iterator[None]:
    """A full disk, an exceeded quota or a directory dirl may not write as one line naming the path."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(
                f"no space left on the device (or quota exceeded) while writing {final}: free "
                f"space where it lives (df -h {final.parent}) and rerun"
            ) from e
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise StoreError(
                f"cannot write {final}: {e.strerror} ({e.filename or final.parent}); give the results "
                "directory write permission or choose another"
            ) from e
        raise
    except RuntimeError as e:  # torch.save on a full disk: "file write failed", "basic_ios::clear"
        if _nearly_full(final.parent):
            raise StoreError(
                f"no space left on the device while writing {final} ({e}): free space where it lives "
                f"(df -h {final.parent}) and rerun"
            ) from e
        raise


def _nearly_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < 64 * 2**20
    except OSError:
        return False


def leftovers(final: str | os.PathLike) -> list[Path]:
    """The temporary siblings of `final` that `atomic_path` blocks (killed, or still running) leave."""
    final = Path(final)
    name = glob.escape(final.name)
    return sorted(
        p
        for pattern in (f".{name}.tmp-*", f".{name}.old-*")
        for p in final.parent.glob(pattern)
        if not p.name.endswith(".lock")
    )


def _lock_path(p: Path) -> Path:
    """`.{name}.lock` beside `p` (hidden; temporaries' names already start with a dot)."""
    return p.with_name(f"{'' if p.name.startswith('.') else '.'}{p.name}.lock")


def _hold(path: Path) -> int:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _release(fd: int) -> None:
    os.close(fd)  # closing the descriptor releases its flock


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[int]:
    fd = _hold(path)
    try:
        yield fd
    finally:
        _release(fd)


def _read_ticket(fd: int) -> int:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return int(text) if text.isdigit() else 0


def _next_ticket(fd: int) -> int:
    ticket = _read_ticket(fd) + 1
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(ticket).encode(), 0)
    return ticket


def _remove_if_dead(stale: Path) -> None:
    """Remove a temporary sibling unless a live writer holds its lock."""
    import fcntl

    lock = _lock_path(stale)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("leaving %s: another process is still writing it", stale)
            return
        log.warning("removing %s, left by an interrupted run", stale)
        _remove(stale)
        lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()
    _lock_path(p).unlink(missing_ok=True)
