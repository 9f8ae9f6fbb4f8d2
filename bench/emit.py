"""Shared by the stage benchmarks: print the result as JSON and optionally keep a copy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], out: str | None = None) -> None:
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
