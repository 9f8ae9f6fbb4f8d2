#!/usr/bin/env python
"""Run every stage benchmark, one after another, and write the performance report.

    python bench/run_all.py [--small] [--only tile,mil] [--stage-args 'mil=--bags 32'] [--timeout S]

Each of bench/{tile,segment,pretrain,extract,extract_jobs,mil,loaders,export,deploy,plan}.py runs as its own subprocess
(never two at once: they would time each other), with `--small` when given here. Its result is the last JSON object it
prints on stdout. Writes

- bench/RESULTS.md: per stage, each figure beside its same-run baseline and the ratio, peak memory,
  the stated goals marked met / not met, the machine, the date and the exact command;
- bench/results.json: the raw JSON of every stage plus the same metadata.

A stage that fails (non-zero exit, timeout, no JSON) is reported as failed with the last lines of its
stderr; the other stages still run. Exit status: 0 when every stage ran, 1 otherwise (goals not met
do not change it: they are a finding, not an error).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STAGES = ("tile", "segment", "pretrain", "extract", "extract_jobs", "mil", "loaders", "export", "deploy", "plan")
STDERR_TAIL = 30  # lines of a failed stage's stderr in the report

# The goals stated in DESIGN.md / the issue: (stage, description, value getter, test, threshold text)
GOALS: list[tuple[str, str, str, str, float]] = [
    ("tile", "dirl tile >= 10x the naive per-tile loop", "dirl_over_naive", ">=", 10.0),
    ("tile", "dirl tile >= half the bare-read rate", "dirl_over_bare", ">=", 0.5),
    ("tile", "tile loop alone >= half the bare-read rate", "loop_over_bare", ">=", 0.5),
    ("pretrain", "DiRL step <= 1.10x the DINO step", "dirl_over_dino_ratio", "<=", 1.10),
    ("extract", "extraction >= 90 % of the bare forward pass", "extract_vs_bare", ">=", 0.9),
    (
        "loaders",
        "pretraining loader >= 100 images/s per core (224 px, DiRL views)",
        "pretrain_images_per_s_per_core",
        ">=",
        100.0,
    ),
    ("loaders", "extraction loader >= 500 tiles/s per core", "extract_tiles_per_s_per_core", ">=", 500.0),
    ("export", "import of typed nuclei >= the watershed stage on the same tiles", "import_over_watershed", ">=", 1.0),
]

# A TCGA-BRCA-sized cohort on one node with 4 GPUs and 64 cores, from the measured per-core rates and,
# where no GPU was measured, the GPU goals (marked as assumptions): 1,000 slides, 20,000 tiles each at
# 0.5 µm/px, pretrain.tiles_per_slide 2,000 (what segmentation and priors then cover), 100 epochs per
# method (config/cohorts/tcga_brca.yaml).
COHORT = {
    "slides": 1000,
    "tiles_per_slide": 20000,
    "subset_per_slide": 2000,
    "epochs": 100,
    "methods": 2,
    "gpus": 4,
    "cores": 64,  # 16 per GPU: the core budget behind the loader goals (16 x 100 images/s >= 1,500)
    "nodes": 1,
}
# The same recipe for 10,000 slides on 8 such nodes (issue #23): DDP across nodes assumed to scale
# linearly; per-slide jobs spread over every node's cores and GPUs.
CLUSTER = {**COHORT, "slides": 10000, "nodes": 8, "bundle": 8}
# Per-slide cluster jobs of the TCGA template (qupath_export on, two feature sources), and which of them
# run in bundles: the CPU rules through profiles/slurm's commented block (Snakemake groups), extraction
# through extract.slides_per_job (one process per bundle: a Snakemake group would ask a GPU per member)
PER_SLIDE_JOBS = {"tile": 1, "segment": 1, "priors": 1, "export": 1, "extract": 2}
BUNDLED = ("tile", "priors", "export", "extract")
COHORT_JOBS = 14  # phenotype, pretrain x 2, attention, MIL, summary, report ... (the dry run's count)
# Storage per tile at 224 px. Tiles: measured (CMU-1-Small-Region, 49 tiles: zstd 133 KB, JPEG 20 KB
# per tile). Cells and priors: the 96 px stores of config/cohorts/probe_cpu.yaml (7.9 and 1.4 KB per
# tile), scaled by area (x 5.44). Features: ViT-S/16, 384 float32 + 2 int64 coordinates.
BYTES_PER_TILE = {
    "tiles (zstd)": 133e3,
    "tiles (JPEG, the template)": 20.5e3,
    "cells (subset)": 43e3,
    "priors (subset)": 7.7e3,
    "features (2 sources, every tile)": 2 * (384 * 4 + 16),
}
GPU_ASSUMED = {"cellpose_tiles_per_s": 50.0, "pretrain_images_per_s": 1500.0, "extract_tiles_per_s": 8000.0}


# --------------------------------------------------------------------------------------------------
# running one stage
def last_json(text: str) -> dict[str, Any] | None:
    """The last JSON object printed on stdout, one-line or indented (`json.dumps(indent=...)` starts it
    with '{' in the first column; objects nested inside it are indented, so they are not candidates)."""
    dec = json.JSONDecoder()
    lines = text.splitlines(keepends=True)
    offsets, pos = [], 0
    for line in lines:
        offsets.append(pos)
        pos += len(line)
    for off, line in zip(reversed(offsets), reversed(lines)):
        if not line.startswith("{"):
            continue
        try:
            obj, end = dec.raw_decode(text, off)
        except ValueError:
            continue
        rest = text[end:].splitlines()
        if isinstance(obj, dict) and not any(ln.strip()[:1] in ("{", "}", "]", ",") for ln in rest):
            return obj
    return None


def _pump(stream, sink: list[str], echo, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sink.append(line)
        if echo is not None:
            echo.write(prefix + line)
            echo.flush()
    stream.close()


def run_stage(name: str, cmd: list[str], timeout: float | None, echo: bool) -> dict[str, Any]:
    """Run one benchmark; returns its record (status, seconds, peak RSS incl. children, JSON, stderr tail)."""
    rec: dict[str, Any] = {"command": shlex.join(cmd)}
    print(f"[run_all] {name}: {rec['command']}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    out: list[str] = []
    err: list[str] = []
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, out, None, ""), daemon=True),
        threading.Thread(
            target=_pump, args=(proc.stderr, err, sys.stderr if echo else None, f"  [{name}] "), daemon=True
        ),
    ]
    for t in pumps:
        t.start()
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the benchmark and its workers (its own session)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill) if timeout else None
    if timer:
        timer.start()
    try:
        # wait4, not wait: it also gives the peak RSS of the child (and of its waited-for children)
        _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
        kill()
        raise
    finally:
        if timer:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in pumps:
        t.join(timeout=10)
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    rec["returncode"] = proc.returncode
    rec["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    stdout = "".join(out)
    result = last_json(stdout)
    if timed_out.is_set():
        rec.update(status="failed", reason=f"timed out after {timeout:g} s")
    elif proc.returncode != 0:
        rec.update(status="failed", reason=f"exit status {proc.returncode}")
    elif result is None:
        rec.update(status="failed", reason="no JSON object on stdout")
    else:
        rec["status"] = "ok"
    if result is not None:
        rec["result"] = result
    if rec["status"] != "ok":
        tail = "".join(err).splitlines()[-STDERR_TAIL:]
        if not tail:
            tail = stdout.splitlines()[-STDERR_TAIL:]
        rec["stderr_tail"] = tail
    print(
        f"[run_all] {name}: {rec['status']} in {rec['seconds']} s"
        + (f" ({rec['reason']})" if rec["status"] != "ok" else ""),
        file=sys.stderr,
        flush=True,
    )
    return rec


# --------------------------------------------------------------------------------------------------
# the machine
def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info.setdefault("cpu", platform.processor() or platform.machine())
    info["cpu_count"] = os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    # torch / GPU in a child process: the parent holds no CUDA context while the benchmarks run
    probe = (
        "import json, torch\n"
        "d = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'gpu': None}\n"
        "if torch.cuda.is_available():\n"
        "    d['gpu'] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]\n"
        "    d['gpu_mem_gib'] = [round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)"
        " for i in range(torch.cuda.device_count())]\n"
        "print(json.dumps(d))\n"
    )
    try:
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
        info.update(json.loads(r.stdout.strip().splitlines()[-1]))
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        info["torch"] = f"unknown ({type(e).__name__})"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        if head:
            info["git"] = head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# --------------------------------------------------------------------------------------------------
# the report
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        return f"{v:.{digits}g}"
    return str(v)


def _fmt_ratio(r: Any) -> str:
    if not isinstance(r, (int, float)) or isinstance(r, bool):
        return "—"
    return f"{r:.2f}x" if abs(r) >= 0.1 else f"{r:.2g}x"


def _ratio(a: Any, b: Any) -> float | None:
    try:
        return float(a) / float(b) if a is not None and b else None
    except (TypeError, ValueError):
        return None


def _get(d: dict[str, Any] | None, *path: str) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


Row = tuple[str, Any, str, Any, Any]  # figure, value, baseline name, baseline value, ratio


def rows_for(stage: str, r: dict[str, Any]) -> tuple[list[Row], list[tuple[str, Any]]]:
    """Table rows (figure, value, baseline, baseline value, ratio) and peak-memory entries of a stage."""
    rows: list[Row] = []
    mem: list[tuple[str, Any]] = []
    if stage == "tile":
        d = r.get("dirl_tiles_per_s")
        rows += [
            (
                "dirl tile, tiles/s (end to end)",
                d,
                "naive read_region + PNG loop",
                r.get("naive_png_tiles_per_s"),
                r.get("dirl_over_naive"),
            ),
            (
                "dirl tile, tiles/s (end to end)",
                d,
                f"bare read_region ({r.get('threads')} threads, dirl's tile order)",
                r.get("bare_read_tiles_per_s"),
                r.get("dirl_over_bare"),
            ),
            (
                "dirl tile, tiles/s (end to end)",
                d,
                f"bare read_region ({r.get('threads')} threads, row-major order)",
                r.get("bare_read_row_major_tiles_per_s"),
                r.get("dirl_over_bare_row_major"),
            ),
            (
                "dirl tile loop alone (reads, compression, writes), tiles/s",
                r.get("dirl_loop_tiles_per_s"),
                f"bare read_region ({r.get('threads')} threads)",
                r.get("bare_read_tiles_per_s"),
                r.get("loop_over_bare"),
            ),
        ]
        mem.append(("dirl tile process peak RSS, MiB", r.get("dirl_peak_rss_mib")))
    elif stage == "segment":
        w = r.get("watershed") or {}
        base = w.get("per_tile_sequential_tiles_per_s")
        for k, v in sorted(w.items()):
            if k.startswith("batched_threads") and k.endswith("_tiles_per_s"):
                th = k[len("batched_threads") : -len("_tiles_per_s")]
                rows.append(
                    (f"watershed, batched, threads={th}, tiles/s", v, "per-tile call, 1 thread", base, _ratio(v, base))
                )
        for k, v in sorted((r.get("watershed_stage") or {}).items()):
            if k.startswith("stage_threads") and k.endswith("_tiles_per_s"):
                th = k[len("stage_threads") : -len("_tiles_per_s")]
                rows.append(
                    (
                        f"dirl segment stage (watershed), threads={th}, tiles/s",
                        v,
                        "per-tile call, 1 thread",
                        base,
                        _ratio(v, base),
                    )
                )
        u = r.get("unet") or {}
        if u:
            ws_rate = u.get("watershed_tiles_per_s")
            for label, key in (("unet backend", "unet_tiles_per_s"), ("unet network", "unet_network_tiles_per_s")):
                v = u.get(key)
                rows.append((f"{label}, tiles/s", v, "watershed, same tiles", ws_rate, _ratio(v, ws_rate)))
        for k, v in sorted((r.get("unet_stage") or {}).items()):
            if k.startswith("stage_threads") and k.endswith("_tiles_per_s"):
                th = k[len("stage_threads") : -len("_tiles_per_s")]
                ws_stage = (r.get("watershed_stage") or {}).get(k)
                label = f"dirl segment stage (unet), threads={th}, tiles/s"
                rows.append((label, v, "same stage, watershed", ws_stage, _ratio(v, ws_stage)))
        c = r.get("cellpose") or {}
        if "skipped" in c:
            rows.append(("cellpose", "skipped: " + str(c["skipped"]), "", None, None))
        elif c:
            p = c.get("pipelined_tiles_per_s")
            dev = f"{c.get('device')}, {c.get('dtype')}, {c.get('tiles')} tiles"
            rows += [
                (
                    f"cellpose pipelined ({dev}), tiles/s",
                    p,
                    "CellposeModel.eval per tile",
                    c.get("eval_per_tile_tiles_per_s"),
                    c.get("speedup_vs_eval_per_tile"),
                ),
                (
                    f"cellpose pipelined ({dev}), tiles/s",
                    p,
                    "CellposeModel.eval, stacked batch",
                    c.get("eval_stacked_tiles_per_s"),
                    c.get("speedup_vs_eval_stacked"),
                ),
                (
                    "cellpose network only, tiles/s",
                    c.get("network_only_tiles_per_s"),
                    "pipelined",
                    p,
                    _ratio(c.get("network_only_tiles_per_s"), p),
                ),
                (
                    "cellpose masks only (serial), tiles/s",
                    c.get("masks_only_serial_tiles_per_s"),
                    "pipelined",
                    p,
                    _ratio(c.get("masks_only_serial_tiles_per_s"), p),
                ),
            ]
            if c.get("gpu_peak_mem_gb") is not None:
                mem.append(("cellpose GPU peak allocated, GB", c.get("gpu_peak_mem_gb")))
        mem.append(("benchmark process peak RSS, MiB", r.get("peak_rss_mb")))
    elif stage == "pretrain":
        dino, dirl = r.get("dino") or {}, r.get("dirl") or {}
        setup = f"{r.get('arch')}, {r.get('img_size')} px, batch {r.get('batch_size')}, {r.get('precision')}"
        rows += [
            (
                f"DiRL step, s ({setup})",
                dirl.get("s_per_step"),
                "DINO step, s",
                dino.get("s_per_step"),
                r.get("dirl_over_dino_ratio"),
            ),
            (
                "DiRL, images/s",
                dirl.get("images_per_s"),
                "DINO, images/s",
                dino.get("images_per_s"),
                _ratio(dirl.get("images_per_s"), dino.get("images_per_s")),
            ),
        ]
        if dino.get("peak_mem_mb") is not None:
            mem += [
                ("DINO step GPU peak allocated, MiB", dino.get("peak_mem_mb")),
                ("DiRL step GPU peak allocated, MiB", dirl.get("peak_mem_mb")),
            ]
        if r.get("process_max_rss_mb") is not None:
            mem.append(("benchmark process peak RSS, MiB", r.get("process_max_rss_mb")))
    elif stage == "extract":
        setup = (
            f"{r.get('arch')}, {r.get('img')} px, batch {r.get('batch')}, {r.get('precision')}, "
            f"{r.get('workers')} workers"
        )
        e = r.get("extract_tiles_per_s")
        rows += [
            (
                f"dirl extract, tiles/s ({setup})",
                e,
                "bare forward pass (tensors on device)",
                r.get("bare_tiles_per_s"),
                r.get("extract_vs_bare"),
            ),
            (
                "tile store read alone (DataLoader), tiles/s",
                r.get("read_tiles_per_s"),
                "dirl extract",
                e,
                _ratio(r.get("read_tiles_per_s"), e),
            ),
        ]
    elif stage == "extract_jobs":
        rows.append(
            (
                f"bundle job of {r.get('slides')} slides x {r.get('tiles_per_slide')} tiles ({r.get('arch')}), "
                "tiles/s per job",
                r.get("bundle_job_tiles_per_s"),
                "one job per slide",
                r.get("per_slide_jobs_tiles_per_s"),
                r.get("bundle_vs_per_slide"),
            )
        )
        rows.append(
            (
                "start-up a job pays (process, imports, encoder), s",
                r.get("startup_s_per_job"),
                "a slide's extraction inside the bundle, s",
                r.get("slide_s_in_bundle"),
                _ratio(r.get("startup_s_per_job"), r.get("slide_s_in_bundle")),
            )
        )
    elif stage == "loaders":
        rows += [
            (
                f"pretraining loader, DiRL views ({r.get('img')} px), images/s per core",
                _get(r, "pretrain_dirl", "images_per_s"),
                "DINO views only",
                _get(r, "pretrain_dino", "images_per_s"),
                _ratio(_get(r, "pretrain_dirl", "images_per_s"), _get(r, "pretrain_dino", "images_per_s")),
            ),
            (
                "pretraining loader + 8 local crops, images/s per core",
                _get(r, "pretrain_multicrop", "images_per_s"),
                "DiRL views",
                _get(r, "pretrain_dirl", "images_per_s"),
                _ratio(_get(r, "pretrain_multicrop", "images_per_s"), _get(r, "pretrain_dirl", "images_per_s")),
            ),
            (
                "extraction loader (decode + normalise), tiles/s per core",
                _get(r, "extract", "tiles_per_s"),
                "store decode alone",
                _get(r, "decode", "tiles_per_s"),
                r.get("extract_over_decode"),
            ),
        ]
    elif stage == "export":
        rows.append(
            (
                f"dirl export (GeoJSON for QuPath), nuclei/s ({r.get('nuclei')} nuclei, {r.get('tiles')} tiles)",
                r.get("dirl_nuclei_per_s"),
                "per-nucleus find_contours + one json.dump",
                r.get("naive_nuclei_per_s"),
                r.get("dirl_over_naive"),
            )
        )
        rows.append(
            (
                "dirl segment, backend import of that file, tiles/s (process, 1 thread)",
                r.get("import_tiles_per_s"),
                "dirl segment, watershed, same tiles",
                r.get("watershed_tiles_per_s"),
                r.get("import_over_watershed"),
            )
        )
        if r.get("import_process_max_rss_mb") is not None:
            mem.append(("dirl segment (import) process peak RSS, MiB", r.get("import_process_max_rss_mb")))
        if r.get("process_max_rss_mb") is not None:
            mem.append(("benchmark process peak RSS, MiB", r.get("process_max_rss_mb")))
    elif stage == "plan":
        big, base = r.get("cohort") or {}, r.get("baseline") or {}
        rows.append(
            (
                f"snakemake dry run (TCGA template, SLURM profile), CPU s per slide at {big.get('slides')} slides "
                f"({big.get('jobs')} jobs; {big.get('cpu_s')} s in all)",
                r.get("cpu_s_per_slide"),
                f"the same at {base.get('slides')} slides",
                r.get("baseline_cpu_s_per_slide"),
                r.get("per_slide_ratio"),
            )
        )
        mem.append((f"dry run of {big.get('slides')} slides, peak RSS, MiB", big.get("peak_rss_mb")))
    elif stage == "deploy":
        rows.append(
            (
                f"dirl deploy ({r.get('model')}: predictions, attention, metrics), "
                f"s/slide of {r.get('tiles_per_slide')} tiles",
                r.get("deploy_s_per_slide"),
                f"dirl extract of the same slides ({r.get('arch')}), s/slide",
                r.get("extract_s_per_slide"),
                r.get("deploy_vs_extract"),
            )
        )
    elif stage == "mil":
        models = r.get("models") or {}
        base = _get(models, "meanpool", "bags_per_s")
        for name, m in models.items():
            if name == "meanpool" and base is not None:
                continue  # the baseline itself
            rows.append(
                (
                    f"{name} training, bags/s ({r.get('bags')} bags, D={r.get('dim')})",
                    m.get("bags_per_s"),
                    "mean pooling, bags/s",
                    base,
                    m.get("vs_meanpool", _ratio(m.get("bags_per_s"), base)),
                )
            )
            if m.get("peak_gpu_mb") is not None:
                mem.append((f"{name} GPU peak allocated, MiB", m.get("peak_gpu_mb")))
    return rows, mem


def goal_results(stages: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for stage, text, key, op, thr in GOALS:
        rec = stages.get(stage)
        if rec is None:
            continue  # not run (--only)
        v = _get(rec.get("result"), key)
        if rec.get("status") != "ok" or v is None:
            met = None
        else:
            met = bool(v >= thr) if op == ">=" else bool(v <= thr)
        out.append({"stage": stage, "goal": text, "key": key, "op": op, "threshold": thr, "value": v, "met": met})
    return out


def _mark(met: bool | None) -> str:
    return "**met**" if met else ("**not met**" if met is False else "not measured (stage failed)")


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    gpu = ", ".join(f"{g} ({mem} GiB)" for g, mem in zip(m.get("gpu") or [], m.get("gpu_mem_gib") or []))
    L = [
        "# DiRL benchmark results",
        "",
        f"- **Date**: {report['date']}"
        + (
            f" (the stages not rerun are from {report['updated_from']['date']}: `{report['updated_from']['command']}`)"
            if report.get("updated_from")
            else ""
        ),
        f"- **Command**: `{report['command']}` (in `{report['cwd']}`)",
        f"- **Machine**: {m.get('cpu')}; {m.get('cpu_count')} logical CPUs"
        + (f" ({m['cpus_usable']} usable)" if m.get("cpus_usable") not in (None, m.get("cpu_count")) else "")
        + f"; {m.get('ram_gib', '?')} GiB RAM; GPU: {gpu or 'none'}",
        f"- **Software**: Python {m.get('python')}, torch {m.get('torch')}"
        + (f" (CUDA {m['cuda']})" if m.get("cuda") else "")
        + f"; {m.get('platform')}"
        + (f"; dirl at git {m['git']}" if m.get("git") else ""),
        f"- **Mode**: {'--small (quick, CI-sized inputs)' if report['small'] else 'full size'}; "
        "stages run one after another, each in its own process; every figure is compared with a "
        "baseline measured in the same run (absolute times on a shared machine are noise).",
        "",
        "## Goals",
        "",
        "| stage | goal | value | result |",
        "| --- | --- | --- | --- |",
    ]
    for g in report["goals"]:
        L.append(
            f"| {g['stage']} | {g['goal']} | {_fmt(g['value'])} ({g['key']} {g['op']} {g['threshold']:g}) "
            f"| {_mark(g['met'])} |"
        )
    if not report["goals"]:
        L.append("| — | no stage with a stated goal was run | — | — |")
    for stage, rec in report["stages"].items():
        L += [
            "",
            f"## {stage}",
            "",
            f"`{rec['command']}` — {rec['status']}, {rec.get('seconds')} s wall, "
            f"peak RSS {_fmt(rec.get('peak_rss_mib'))} MiB (benchmark process and its children)",
            "",
        ]
        if rec["status"] != "ok":
            L += [f"**FAILED**: {rec.get('reason')}. Last lines of stderr:", "", "```"]
            L += [ln.replace("```", "'''") for ln in rec.get("stderr_tail", [])] or ["(empty)"]
            L += ["```"]
            if not rec.get("result"):
                continue
        rows, mem = rows_for(stage, rec["result"])
        if rows:
            L += ["| figure | value | same-run baseline | baseline value | ratio |", "| --- | --- | --- | --- | --- |"]
            for fig, v, bname, bv, ratio in rows:
                L.append(f"| {fig} | {_fmt(v)} | {bname} | {_fmt(bv)} | {_fmt_ratio(ratio)} |")
        goals = [g for g in report["goals"] if g["stage"] == stage]
        if goals:
            L.append("")
            L += [f"- Goal: {g['goal']} — {_fmt(g['value'])}: {_mark(g['met'])}" for g in goals]
        mem = [(k, v) for k, v in mem if v is not None]
        if mem:
            L += ["", "Peak memory: " + "; ".join(f"{k} {_fmt(v)}" for k, v in mem)]
    L += cohort_estimate(report["stages"])
    L += cohort_estimate(report["stages"], CLUSTER)
    L += ["", f"Raw JSON of every stage: `{report['json']}`.", ""]
    return "\n".join(L)


def cohort_estimate(stages: dict[str, dict[str, Any]], c: dict[str, Any] = COHORT) -> list[str]:
    """Hours per stage for the cohort `c` on its nodes, from this run's rates (per core, or per GPU where
    one was measured) and GPU_ASSUMED otherwise; for more than one node also node-hours, cluster jobs
    and storage."""
    res = {k: (v.get("result") or {}) for k, v in stages.items()}
    tiles_all = c["slides"] * c["tiles_per_slide"]
    subset = c["slides"] * c["subset_per_slide"]
    rows = []

    def add(stage: str, work: float, unit: str, rate: float | None, per: str, workers: int, source: str) -> None:
        workers *= c["nodes"]
        hours = work / (rate * workers) / 3600 if rate else None
        rows.append((stage, f"{work:,.0f} {unit}", f"{_fmt(rate)} {unit}/s per {per}", workers, source, hours))

    tile_rate = _get(res, "tile", "dirl_tiles_per_s")
    add(
        "tile",
        tiles_all,
        "tiles",
        tile_rate / max(1, _get(res, "tile", "threads") or 2) if tile_rate else None,
        "core",
        c["cores"],
        "measured (20k px slide, end to end)",
    )
    add(
        "segment (Cellpose, subset)",
        subset,
        "tiles",
        GPU_ASSUMED["cellpose_tiles_per_s"],
        "GPU",
        c["gpus"],
        "assumed: the GPU goal, not yet measured",
    )
    ws = _get(res, "segment", "watershed_stage") or {}
    ws_rate = next((v for k, v in ws.items() if k.startswith("stage_threads1")), None)
    add("segment (watershed, subset, instead)", subset, "tiles", ws_rate, "core", c["cores"], "measured (1 thread)")
    steps = c["epochs"] * subset * c["methods"]
    add(
        "pretrain (both methods)",
        steps,
        "images",
        GPU_ASSUMED["pretrain_images_per_s"],
        "GPU",
        c["gpus"],
        "assumed: the GPU goal, not yet measured",
    )
    loader = _get(res, "loaders", "pretrain_images_per_s_per_core")
    add(
        "  its loader",
        steps,
        "images",
        loader,
        "core",
        c["cores"],
        "measured, two global views (the GPU goal's recipe)",
    )
    multicrop = _get(res, "loaders", "pretrain_multicrop_images_per_s_per_core")
    add(
        "  its loader, 8 local crops instead",
        steps,
        "images",
        multicrop,
        "core",
        c["cores"],
        "measured (TCGA template)",
    )
    add(
        "extract (both methods, every tile)",
        tiles_all * c["methods"],
        "tiles",
        GPU_ASSUMED["extract_tiles_per_s"],
        "GPU",
        c["gpus"],
        "assumed: the GPU goal, not yet measured",
    )
    ext_loader = _get(res, "loaders", "extract_tiles_per_s_per_core")
    add("  its loader", tiles_all * c["methods"], "tiles", ext_loader, "core", c["cores"], "measured")
    nodes = "one node" if c["nodes"] == 1 else f"{c['nodes']} nodes"
    where = f"{nodes} with {c['gpus']} GPUs and {c['cores']} cores" + (" each" if c["nodes"] > 1 else "")
    L = [
        "",
        f"## {c['slides']:,} slides on {nodes} (estimate)",
        "",
        f"{c['slides']:,} slides x {c['tiles_per_slide']:,} tiles at 0.5 µm/px; pretrain.tiles_per_slide "
        f"{c['subset_per_slide']:,} (segmentation, priors and pretraining cover that subset); {c['epochs']} epochs "
        f"per method; {where}. A stage's hours = its work / "
        "(rate x workers); where no GPU figure exists yet the GPU goal stands in (marked).",
        "",
        "| stage | work | rate | workers | rate from | hours |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for stage, work, rate, workers, source, hours in rows:
        L.append(f"| {stage} | {work} | {rate} | {workers} | {source} | {_fmt(hours)} |")
    # a GPU stage takes as long as the slower of the GPUs and the loader that feeds them
    total, stage = 0.0, None
    for s_, *_, h in rows:
        if "instead" in s_ or h is None:
            continue
        if s_.startswith(" "):
            total += max(0.0, h - stage) if stage is not None else h
        else:
            total, stage = total + h, h
    L += [
        "",
        f"Total, slides to features (tile, Cellpose, pretraining, extraction; each GPU stage at the slower of its "
        f"GPUs and its loader): **{_fmt(total)} h** (MIL and the report: minutes).",
    ]
    if loader and multicrop:
        need = GPU_ASSUMED["pretrain_images_per_s"]
        L.append(
            f"What it shows: the loaders, not the GPUs, set the pace when cores are short. Feeding "
            f"{need:,.0f} images/s per GPU takes {math.ceil(need / loader)} loader cores per GPU with two "
            f"global views and {math.ceil(need / multicrop)} with DINO's 8 local crops (the TCGA template's "
            "recipe, whose GPU step is also slower): on a node with fewer cores, set "
            "`pretrain.local_crops_number: 0` or accept the longer run."
        )
    if c["nodes"] > 1:
        L += cluster_costs(c, total)
    return L


def cluster_costs(c: dict[str, Any], hours: float) -> list[str]:
    """Node-hours, the cluster jobs with and without bundles, and storage per stage."""
    n = c["slides"]
    plain = n * sum(PER_SLIDE_JOBS.values()) + COHORT_JOBS
    bundled = sum(math.ceil(n / c["bundle"]) * k if r in BUNDLED else n * k for r, k in PER_SLIDE_JOBS.items())
    unbundled = n * sum(k for r, k in PER_SLIDE_JOBS.items() if r not in BUNDLED)
    tiles_all, subset = n * c["tiles_per_slide"], n * c["subset_per_slide"]
    L = [
        "",
        f"Node-hours: {_fmt(hours * c['nodes'])} ({c['nodes']} nodes x {_fmt(hours)} h). Cluster jobs: "
        f"{plain:,} one per slide and stage; {bundled + COHORT_JOBS:,} with the profile's bundles of "
        f"{c['bundle']} ({', '.join(BUNDLED)}; extraction with extract.slides_per_job); Cellpose segmentation "
        f"({unbundled:,} GPU jobs) is still one job per slide.",
        "",
        "| stored | per tile | tiles | TB |",
        "| --- | --- | --- | --- |",
    ]
    for what, b in BYTES_PER_TILE.items():
        count = subset if "subset" in what else tiles_all
        L.append(f"| {what} | {b / 1e3:,.1f} KB | {count:,} | {b * count / 1e12:,.2f} |")
    return L


# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="pass --small to every benchmark (quick check)")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    ap.add_argument(
        "--stage-args",
        action="append",
        default=[],
        metavar="STAGE=ARGS",
        help="extra arguments for one benchmark, e.g. 'extract=--tiles 8192' (repeatable)",
    )
    ap.add_argument("--timeout", type=float, default=0, help="seconds per stage before it is killed (0: none)")
    ap.add_argument("--md", default=str(HERE / "RESULTS.md"), help="report (default bench/RESULTS.md)")
    ap.add_argument("--json", default=str(HERE / "results.json"), help="raw JSON (default bench/results.json)")
    ap.add_argument("--quiet", action="store_true", help="do not echo the benchmarks' stderr")
    ap.add_argument(
        "--update",
        action="store_true",
        help="keep the other stages of the existing --json (rerun only --only's stages; with --only none, "
        "just rewrite the report)",
    )
    a = ap.parse_args(argv)
    named = [s.strip() for s in (a.only or "").split(",")]
    a.stages = [s for s in named if s and s != "none"] if a.only else list(STAGES)
    bad = [s for s in a.stages if s not in STAGES]
    if bad:
        ap.error(f"--only: unknown stage(s) {bad}; choose from {','.join(STAGES)}")
    a.extra = {}
    for spec in a.stage_args:
        stage, sep, rest = spec.partition("=")
        if not sep or stage not in STAGES:
            ap.error(f"--stage-args {spec!r}: expected STAGE=ARGS with STAGE one of {','.join(STAGES)}")
        a.extra.setdefault(stage, []).extend(shlex.split(rest))
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    orig = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    report: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(orig) if argv is None else shlex.join([sys.executable, __file__, *argv]),
        "cwd": os.getcwd(),
        "json": _rel(a.json),
        "small": a.small,
        "machine": machine_info(),
        "stages": {},
    }
    if a.update and Path(a.json).exists():
        before = json.loads(Path(a.json).read_text())
        report["stages"] = {k: v for k, v in before["stages"].items() if k not in a.stages}
        report["updated_from"] = before.get("updated_from") or {k: before.get(k) for k in ("date", "command")}
    for stage in a.stages:
        cmd = [sys.executable, str(HERE / f"{stage}.py")] + (["--small"] if a.small else []) + a.extra.get(stage, [])
        report["stages"][stage] = run_stage(stage, cmd, a.timeout or None, echo=not a.quiet)
        # keep what we have after every stage: a later crash or Ctrl-C loses nothing
        report["goals"] = goal_results(report["stages"])
        write(report, a)
    report["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    report["goals"] = goal_results(report["stages"])
    write(report, a)
    print(f"[run_all] wrote {a.md} and {a.json}", file=sys.stderr)
    return 0 if all(r["status"] == "ok" for r in report["stages"].values()) else 1


def _rel(p: str) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def write(report: dict[str, Any], a: argparse.Namespace) -> None:
    for path, text in ((Path(a.json), json.dumps(report, indent=1) + "\n"), (Path(a.md), render_markdown(report))):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
