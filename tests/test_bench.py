"""The GPU script's CPU dry run (same code path, tiny sizes, --device cpu) and the loader benchmark: what
runs on a GPU machine when one is lent must already work here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "RESULTS-gpu.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["dry_run"] and summary["device"] == "cpu"
    assert summary["sections"] == {
        k: True
        for k in (
            "loaders",
            "step",
            "step_compiled",
            "train_dino",
            "train_dirl",
            "extract",
            "cellpose",
            "torchrun",
            "oom",
            "fidelity",
        )
    }, out.read_text()[-4000:]
    text = out.read_text()
    assert "CPU dry run" in text and "## train_dirl: ok" in text and "images_per_s" in text
