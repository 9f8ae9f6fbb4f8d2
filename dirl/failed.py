"""`dirl failed-slides`: the slides whose tiling failed (under `allow_failed_slides`), one per line.

Each such slide has an empty tile store whose `failed` attribute holds the error; every later stage
sees zero tiles and leaves it out. This list is what a user reads (and the report shows) to see which
slides to fix.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tiles", nargs="+", help="tile stores tiles/{slide}.zarr")
    p.add_argument("--out", required=True, help="text file: `slide_id<TAB>error` per failed slide")


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    return [args.out], args.tiles


def main(args: argparse.Namespace) -> None:
    from dirl import store

    failed = []
    for path in args.tiles:
        ts = store.open_tiles(path)
        if ts.failed:
            failed.append(f"{ts.slide_id}\t{' '.join(str(ts.failed).split())}\n")
    with store.atomic_path(args.out) as tmp:
        tmp.write_text("".join(failed))
    log.info(
        "%d of %d slides failed%s", len(failed), len(args.tiles), "".join(f"\n  {line.rstrip()}" for line in failed)
    )
