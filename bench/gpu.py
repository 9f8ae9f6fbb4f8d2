#!/usr/bin/env python
"""Every GPU figure in one go on one GPU, written to bench/RESULTS-gpu.md with the device named.

    bench/gpu.sh                      # on the GPU machine (installs the carried wheels, then this)
    python bench/gpu.py --dry-run     # the same code path on the CPU, tiny sizes (tests/test_bench.py)

Sections, each a subprocess with its own time limit (a failed or timed-out section is reported and the
others still run):
  loaders    per-core rates of the pretraining and extraction loaders (bench/loaders.py)
  step       DiRL and DINO training step, ViT-S/16, 224 px, bf16, batch 256, synthetic batch, with and
             without torch.compile (bench/pretrain.py): goal DiRL <= 1.10x DINO
  train      `dirl pretrain` with the real loader (15 workers) on a tile store with priors: images/s and
             the share of time waiting for data, from log.jsonl: goal >= 1,500 images/s on an H100
  extract    `dirl extract` against the bare forward pass, ViT-S/16 (bench/extract.py): goal >= 8,000 tiles/s
  cellpose   Cellpose-SAM (random weights, the real architecture) at 256 px (bench/segment.py): goal >= 50 tiles/s
  torchrun   `dirl pretrain` under torchrun, one process, NCCL (what `pretrain.gpus > 1` launches)
  oom        a real out-of-memory during extraction (GPU filled first): the batch is halved and the
             features equal an unhindered run's
  fidelity   config/cohorts/fidelity_gpu.yaml through the workflow: DINO's per-head attention entropy
             >= 0.05 below the untrained backbone's, DiRL against DINO, three seeds
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable


def run(cmd: list[str], timeout: float, cwd: Path = ROOT, env: dict | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            cmd,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )
        out = {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr[-3000:]}
    except subprocess.TimeoutExpired as e:
        out = {"rc": "timeout", "stdout": e.stdout or "", "stderr": str(e.stderr or "")[-3000:]}
    out["seconds"] = time.perf_counter() - t0
    return out


def last_json(text: str) -> dict[str, Any] | None:
    sys.path.insert(0, str(HERE))
    from run_all import last_json as parse

    return parse(text)


def bench(script: str, args: list[str], timeout: float) -> dict[str, Any]:
    r = run([PY, str(HERE / script), *args], timeout)
    return {
        "ok": r["rc"] == 0,
        "seconds": r["seconds"],
        "result": last_json(r["stdout"]) if r["rc"] == 0 else None,
        "error": None if r["rc"] == 0 else r["stderr"][-1500:],
    }


def cohort(work: Path, tiles: int, img: int) -> tuple[Path, Path]:
    """A tile store with prior maps (bench/extract.py and bench/loaders.py make them)."""
    sys.path.insert(0, str(HERE))
    from extract import make_store
    from loaders import make_priors

    t, p = work / "tiles" / "c.zarr", work / "priors" / "c.zarr"
    if not t.exists():
        make_store(t, tiles, img, "zstd")
        make_priors(t, p)
    return t, p


def pretrain(
    work: Path, tiles: Path, priors: Path, settings: dict, steps: int, timeout: float, launcher: list[str] | None = None
) -> dict[str, Any]:
    out = work / f"run-{len(list(work.glob('run-*')))}"
    cmd = [
        *(launcher or [PY, "-m", "dirl.cli"]),
        "pretrain",
        str(out),
        "--tiles",
        str(tiles),
        "--priors",
        str(priors),
        "--settings",
        json.dumps(settings),
        "--stop-after-steps",
        str(steps),
    ]
    r = run(cmd, timeout)
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()] if (out / "log.jsonl").exists() else []
    steady = rows[1:] or rows  # the first log line holds worker start-up and compilation
    res = {
        "ok": r["rc"] == 0 and bool(rows),
        "seconds": r["seconds"],
        "error": None if r["rc"] == 0 else r["stderr"][-1500:],
    }
    if steady:
        res.update(
            images_per_s=sum(x["images_per_s"] for x in steady) / len(steady),
            data_wait_frac=sum(x["data_wait_frac"] for x in steady) / len(steady),
            steps=rows[-1]["step"],
        )
    return res


def oom(work: Path, tiles: Path, dry: bool, timeout: float) -> dict[str, Any]:
    """Extraction with most GPU memory taken by another tensor: the first batch runs out of memory, the
    batch is halved (dirl.oom), and the features equal a run with the memory free."""
    code = f"""
import json, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from dirl.encoders import load_timm
from dirl.extract import extract_slide
from dirl import store
dev = torch.device("cpu" if {dry} else "cuda")
import logging
logging.basicConfig(level=logging.INFO)
enc = load_timm("vit_tiny_patch16_224" if {dry} else "vit_small_patch16_224", "random", embed_kind="cls")
enc.model.to(dev).eval()
a = extract_slide({str(tiles)!r}, {str(work / "free.h5")!r}, enc, dev, batch=1024, workers=2)
hog = None
if not {dry}:
    free, total = torch.cuda.mem_get_info()
    hog = torch.empty(int(free - 3 * 2**30), dtype=torch.uint8, device=dev)  # leave ~3 GB
b = extract_slide({str(tiles)!r}, {str(work / "hogged.h5")!r}, enc, dev, batch=1024, workers=2)
x, _, _ = store.read_features({str(work / "free.h5")!r}); y, _, _ = store.read_features({str(work / "hogged.h5")!r})
print(json.dumps({{"max_abs_diff": float(abs(x - y).max()), "tiles": len(x)}}))
"""
    r = run([PY, "-c", code], timeout)
    res = last_json(r["stdout"]) if r["rc"] == 0 else None
    if res is not None:
        res["batch_halved"] = "GPU out of memory in feature extraction at batch size" in r["stderr"]
    ok = r["rc"] == 0 and res is not None and res["max_abs_diff"] < 1e-2 and (dry or res["batch_halved"])
    return {"ok": ok, "result": res, "error": r["stderr"][-1500:]}


def fidelity(dry: bool, timeout: float) -> dict[str, Any]:
    """The README's command on the GPU config, in the checkout (results/fidelity_gpu/)."""
    args = [
        PY,
        "-m",
        "snakemake",
        "--configfile",
        "config/cohorts/fidelity_gpu.yaml",
        "--cores",
        str(os.cpu_count() or 2),
    ]
    if dry:  # the CPU dry run: the plan only
        args.append("-n")
    r = run(args, timeout)
    res = {"ok": r["rc"] == 0, "seconds": r["seconds"], "error": None if r["rc"] == 0 else r["stderr"][-1500:]}
    summary = ROOT / "results" / "fidelity_gpu" / "summary.md"
    if summary.exists():
        res["summary_md"] = summary.read_text()
    return res


def report(path: Path, res: dict[str, Any], device: str, dry: bool) -> None:
    lines = [
        f"# GPU figures ({'CPU dry run, tiny sizes: not figures' if dry else device})",
        "",
        f"{dt.datetime.now().isoformat(timespec='seconds')}, `python bench/gpu.py{' --dry-run' if dry else ''}`, "
        f"{platform.node()}, {os.cpu_count()} CPUs",
        "",
    ]
    for name, r in res.items():
        ok = r.get("ok")
        lines.append(f"## {name}: {'ok' if ok else 'FAILED'} ({r.get('seconds', 0):.0f} s)")
        body = (
            r.get("result")
            if isinstance(r.get("result"), dict)
            else {k: v for k, v in r.items() if k not in ("ok", "error", "summary_md")}
        )
        if body:
            lines += ["```json", json.dumps(body, indent=1)[:4000], "```"]
        if r.get("summary_md"):
            lines += [r["summary_md"]]
        if not ok and r.get("error"):
            lines += ["```", str(r["error"])[-1500:], "```"]
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the code path, no figures")
    ap.add_argument("--only", help="comma-separated sections")
    ap.add_argument("--out", default=str(HERE / "RESULTS-gpu.md"))
    a = ap.parse_args()
    dry = a.dry_run
    import torch

    device = "cpu" if dry else torch.cuda.get_device_name(0)
    work = Path(tempfile.mkdtemp(prefix="dirl-gpu-"))
    img = 32 if dry else 224
    tiles, priors = cohort(work, 64 if dry else 8192, img)
    arch = "vit_tiny_patch16_224" if dry else "vit_small_patch16_224"
    base = {
        "arch": arch,
        "img_size": img,
        "batch_size": 8 if dry else 256,
        "out_dim": 256 if dry else 65536,
        "dense_out_dim": 128 if dry else 4096,
        "epochs": 100,
        "warmup_epochs": 0,
        "head_bn": True,
        "num_workers": 1 if dry else 15,
        "precision": "fp32" if dry else "bf16",
        "log_every": 2 if dry else 20,
        "device": "cpu" if dry else "cuda",
    }
    steps = 6 if dry else 200
    sections = {
        "loaders": lambda: bench("loaders.py", ["--small"] if dry else ["--img", "224"], 300),
        "step": lambda: bench(
            "pretrain.py",
            ["--small", "--device", "cpu", "--steps", "2", "--warmup", "1"]
            if dry
            else ["--device", "cuda", "--precision", "bf16", "--steps", "20", "--warmup", "5"],
            400,
        ),
        "step_compiled": lambda: (
            {"ok": True, "skipped": "dry run"}
            if dry
            else bench(
                "pretrain.py",
                ["--device", "cuda", "--precision", "bf16", "--compile", "--steps", "20", "--warmup", "10"],
                600,
            )
        ),
        "train_dino": lambda: pretrain(work, tiles, priors, {**base, "method": "dino"}, steps, 600),
        "train_dirl": lambda: pretrain(work, tiles, priors, {**base, "method": "dirl"}, steps, 600),
        "extract": lambda: bench(
            "extract.py",
            ["--small", "--device", "cpu"] if dry else ["--device", "cuda", "--tiles", "16384", "--workers", "15"],
            600,
        ),
        "cellpose": lambda: bench("segment.py", ["--small"] if dry else ["--cellpose-tiles", "512"], 600),
        "torchrun": lambda: pretrain(
            work,
            tiles,
            priors,
            {**base, "method": "dirl"},
            4 if dry else 20,
            300,
            launcher=[PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "dirl.cli"],
        ),
        "oom": lambda: oom(work, tiles, dry, 600),
        "fidelity": lambda: fidelity(dry, 900),
    }
    only = set(a.only.split(",")) if a.only else set(sections)
    res: dict[str, Any] = {}
    for name, fn in sections.items():
        if name in only:
            t0 = time.perf_counter()
            try:
                res[name] = fn()
            except Exception as e:  # a broken section must not hide the others
                res[name] = {"ok": False, "error": repr(e)}
            res[name].setdefault("seconds", time.perf_counter() - t0)
            print(f"{name}: {'ok' if res[name].get('ok') else 'FAILED'} in {res[name]['seconds']:.0f} s", flush=True)
    report(Path(a.out), res, device, dry)
    print(json.dumps({"device": device, "dry_run": dry, "sections": {k: bool(v.get("ok")) for k, v in res.items()}}))


if __name__ == "__main__":
    main()
