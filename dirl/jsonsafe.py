"""Bounds on a JSON file before it is parsed: nesting depth and the size of one item.

A streaming parser (ijson) takes time quadratic in the nesting depth and holds one item (a GeoJSON
Feature, a HoVer-Net nucleus) in memory at a time, so a hostile or broken file — a few hundred KB of
nested brackets, one multi-GB feature — would exhaust memory instead of failing. `check` scans the bytes
with NumPy (strings and escapes honoured) at ~0.5 GB/s and refuses such a file in one line.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dirl.errors import DirlError

MAX_DEPTH = 32  # GeoJSON MultiPolygon coordinates sit at depth 7-8 of a FeatureCollection
MAX_ITEM_BYTES = 256 * 2**20  # one feature or nucleus (a polygon of ~10 million vertices)
CHUNK = 16 * 2**20
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_STEP = np.zeros(256, np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def open_json(path: str | os.PathLike) -> BinaryIO:
    """The file's bytes, gunzipped when it is gzip (QuPath and CellViT can write .geojson.gz)."""
    path = Path(path)
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def check(path: str | os.PathLike, item_depth: int = 2) -> None:
    """Raise DirlError if the JSON in `path` nests deeper than MAX_DEPTH or holds an item (a value at
    depth `item_depth`, e.g. one element of `features`) larger than MAX_ITEM_BYTES. Works on the
    positions of brackets and quotes only (a few passes over the bytes per chunk)."""
    depth, in_string, backslashes, pos = 0, 0, 0, 0
    item_start: int | None = None
    with open_json(path) as f:
        while chunk := f.read(CHUNK):
            b = np.frombuffer(chunk, np.uint8)
            quotes = np.flatnonzero(b == _QUOTE)
            if len(quotes) and (backslashes or (b == _BACKSLASH).any()):  # keep the unescaped ones
                plain = np.where(b != _BACKSLASH, np.arange(len(b)), -1)
                last = np.maximum.accumulate(plain)[np.maximum(quotes - 1, 0)]
                run = np.where(last >= 0, quotes - 1 - last, quotes + backslashes)
                run[quotes == 0] = backslashes
                quotes = quotes[run % 2 == 0]
            step = _STEP[b]
            at = np.flatnonzero(step)
            # a bracket after an odd number of unescaped quotes is inside a string
            outside = (np.searchsorted(quotes, at) + in_string) % 2 == 0
            at = at[outside]
            level = depth + np.cumsum(step[at], dtype=np.int64)
            if len(level) and level.max() > MAX_DEPTH:
                where = pos + int(at[np.argmax(level > MAX_DEPTH)])
                raise DirlError(
                    f"{path}: JSON nested deeper than {MAX_DEPTH} levels (at byte {where}): not a nuclei file "
                    "QuPath, CellViT or HoVer-Net write (damaged or hostile?)"
                )
            # items: where the level rises from item_depth (start) and falls back to it (end)
            before = np.concatenate([[depth], level[:-1]])
            starts = at[(before == item_depth) & (level == item_depth + 1)] + pos
            ends = at[(before == item_depth + 1) & (level == item_depth)] + pos
            if item_start is not None:
                starts = np.concatenate([[item_start], starts])
            item_start = int(starts[-1]) if len(starts) > len(ends) else None
            n = len(ends)
            biggest = int((ends - starts[:n]).max()) if n else 0
            if item_start is not None:
                biggest = max(biggest, pos + len(b) - item_start)
            if biggest > MAX_ITEM_BYTES:
                raise DirlError(
                    f"{path}: one feature or nucleus takes {biggest / 2**20:.0f} MB of JSON (the limit is "
                    f"{MAX_ITEM_BYTES // 2**20} MB): not a nucleus outline (damaged or hostile file?)"
                )
            depth = int(level[-1]) if len(level) else depth
            in_string = (in_string + len(quotes)) % 2
            tail = b[-64:] == _BACKSLASH  # trailing backslashes carry an escape into the next chunk
            run = len(tail) - 1 - int(np.flatnonzero(~tail)[-1]) if (~tail).any() else None
            backslashes = run if run is not None else (backslashes + len(b) if len(b) <= 64 else _count_tail(b))
            pos += len(b)


def _count_tail(b: np.ndarray) -> int:
    plain = np.flatnonzero(b != _BACKSLASH)
    return len(b) - 1 - int(plain[-1]) if len(plain) else len(b)
