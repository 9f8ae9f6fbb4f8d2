"""Shared by the stage benchmarks: print the result as JSON and optionally keep a copy."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], out: str | None = None) -> None:
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def add_run_arguments(ap: argparse.ArgumentParser, small: str) -> None:
    """The arguments every stage benchmark takes: --small (what it shrinks to), --workdir, --out."""
    ap.add_argument("--small", action="store_true", help=f"{small}: a quick CPU check")
    ap.add_argument("--workdir")
    ap.add_argument("--out", help="also write the JSON here")
