#!/usr/bin/env python
"""Write the fidelity experiment's report from a finished workflow run (prints Markdown, or --out FILE).

    .venv/bin/python bench/fidelity_report.py results/fidelity_cpu --config config/cohorts/fidelity_cpu.yaml \
        --pictures bench/fidelity --out bench/FIDELITY-run.md

Tables: per seed the attention headline of the untrained backbone, DINO and DiRL and the paired
differences; the DINO loss at the end against ln K and the collapse monitors per run; MIL per seed with
DiRL − DINO; the wall time of every stage from Snakemake's benchmarks. Saves the attention overview (a JPEG) and copies
the loss curves of seed 0 into --pictures.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from pathlib import Path

import yaml


def _ms(v: list[float], digits: int = 4, signed: bool = False) -> str:
    if not v:
        return "—"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{f.format(statistics.mean(v))} ± {sd:.{digits}f}"


def mil_cell(rows: list[dict], section: str, model: str, source: str, seed: str) -> str:
    """One AUC of summary.tsv: a method's (mean ± sd over seeds for `all`) or DiRL − DINO."""
    r = next(
        (
            r
            for r in rows
            if (r["section"], r["model"], r["metric"], r["source"], r["seed"]) == (section, model, "auc", source, seed)
        ),
        None,
    )
    if r is None or not r["mean"]:
        return "—"
    if section == "mil_delta":
        return f"{float(r['mean']):+.3f}"
    return f"{float(r['mean']):.3f}" + (f" ± {float(r['sd']):.3f}" if seed == "all" and r["sd"] else "")


def save_thumbnail(src: Path, dst: Path, width: int = 1400) -> None:
    """The overview as a JPEG `width` px wide: the full-size PNG (~3 MB) is too heavy to keep in git."""
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("RGB")
        im.thumbnail((width, width))
        im.save(dst, quality=85)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--pictures", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    res, cfg = a.results, yaml.safe_load(a.config.read_text())
    cohort = res.name
    att = json.loads((res / "analysis" / "attention.json").read_text())
    runs = att["runs"]
    seeds = sorted({int(n.rsplit("-s", 1)[1]) for n in runs if "-s" in n})
    head = att["headline"]
    slides = cfg.get("attention", {}).get("slides") or ["all slides"]
    lines = [
        f"### Attention on {att['n_images']} tiles ({', '.join(slides)})",
        "",
        "Mean over heads of each head's normalised entropy H/log N (1 = uniform; lower = sparser), per seed:",
        "",
        "| seed | untrained | DINO | DiRL | DINO − untrained | DiRL − DINO | DiRL > DINO on tiles |",
        "|---|---|---|---|---|---|---|",
    ]
    d_dino, d_dirl = [], []
    for s in seeds:
        u, di, dr = (runs[f"{m}-s{s}"][head]["mean"] for m in ("untrained", "dino", "dirl"))
        cmp = att["comparisons"].get(f"dirl-s{s}_vs_dino-s{s}", {}).get(head, {})
        d_dino.append(di - u)
        d_dirl.append(cmp.get("mean_diff", dr - di))
        lines.append(
            f"| {s} | {u:.4f} | {di:.4f} | {dr:.4f} | {di - u:+.4f} | {d_dirl[-1]:+.4f} | "
            f"{cmp.get('frac_higher', float('nan')):.0%} (Wilcoxon p {cmp.get('wilcoxon_p') or float('nan'):.2g}) |"
        )
    lines += [f"| mean ± sd | | | | {_ms(d_dino, signed=True)} | {_ms(d_dirl, signed=True)} | |", ""]
    # the head-averaged map and enrichment
    lines += [
        "Head-averaged map (entropy, Gini, share of tokens holding 50 % of the mass), mean over seeds:",
        "",
        "| run | map entropy | Gini | top-50 % tokens |",
        "|---|---|---|---|",
    ]
    for m in ("untrained", "dino", "dirl"):
        vals = {
            k: [runs[f"{m}-s{s}"]["head_averaged_map"][k]["mean"] for s in seeds]
            for k in ("entropy", "gini", "top50_share")
        }
        lines.append(f"| {m} | {_ms(vals['entropy'])} | {_ms(vals['gini'])} | {_ms(vals['top50_share'])} |")
    cls = runs[f"dino-s{seeds[0]}"].get("class_share")
    if cls:
        lines += [
            "",
            "Attention share / area share per prior class (enrichment), mean over seeds:",
            "",
            "| class | area | untrained | DINO | DiRL |",
            "|---|---|---|---|---|",
        ]
        for c, name in enumerate(cls["classes"]):
            row = [name, f"{cls['area'][c]:.3f}"]
            for m in ("untrained", "dino", "dirl"):
                e = [runs[f"{m}-s{s}"]["class_share"]["enrichment"][c] for s in seeds]
                row.append(_ms([x for x in e if x is not None], 2) if all(x is not None for x in e) else "—")
            lines.append("| " + " | ".join(row) + " |")
    # training: does it learn?
    k = cfg["pretrain"].get("out_dim", 65536)
    lines += [
        "",
        f"### Training (last logged step; ln K = {math.log(k):.3f})",
        "",
        "| run | steps | DINO loss | dense loss | teacher entropy / ln K | batch-mean entropy / ln K | images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in seeds:
        for m in ("dino", "dirl"):
            rows = [json.loads(x) for x in (res / "pretrain" / f"{m}-s{s}" / "log.jsonl").read_text().splitlines()]
            r = rows[-1]
            ips = statistics.median(x["images_per_s"] for x in rows)
            lines.append(
                f"| {m}-s{s} | {r['step']} | {r['loss_dino']:.3f} | {r['loss_dense']:.3f} | "
                f"{r.get('teacher_entropy', float('nan')):.3f} | "
                f"{r.get('teacher_batch_entropy', float('nan')):.3f} | {ips:.0f} |"
            )
    # MIL
    summary = res / "summary.tsv"
    if summary.exists():
        rows = [
            dict(zip(["section", "model", "metric", "source", "seed", "mean", "sd", "n"], x.split("\t")))
            for x in summary.read_text().splitlines()[1:]
        ]
        lines += [
            "",
            "### Slide classification (MIL, AUC; mean over folds)",
            "",
            "| model | seed | DINO | DiRL | DiRL − DINO |",
            "|---|---|---|---|---|",
        ]
        for model in sorted({r["model"] for r in rows if r["section"] == "mil"}):
            for s in [str(x) for x in seeds] + ["all"]:
                cells = [
                    mil_cell(rows, sec, model, src, s)
                    for sec, src in (("mil", "dino"), ("mil", "dirl"), ("mil_delta", "dirl-dino"))
                ]
                lines.append(f"| {model} | {s if s != 'all' else 'mean ± sd'} | " + " | ".join(cells) + " |")
    # time
    bench = Path("benchmarks") / cohort
    if bench.exists():
        per: dict[str, float] = {}
        for f in bench.rglob("*.tsv"):
            rule = f.relative_to(bench).parts[0].removesuffix(".tsv")
            per[rule] = per.get(rule, 0.0) + float(f.read_text().splitlines()[1].split("\t")[0])
        lines += [
            "",
            f"### Time per stage (sum of its jobs' wall time, s; total {sum(per.values()) / 60:.1f} min)",
            "",
            "| " + " | ".join(per) + " |",
            "|" + "---|" * len(per),
            "| " + " | ".join(f"{v:.0f}" for v in per.values()) + " |",
        ]
    if a.pictures:
        a.pictures.mkdir(parents=True, exist_ok=True)
        save_thumbnail(res / "analysis" / "attention_overlays" / "overview.png", a.pictures / f"{cohort}_attention.jpg")
        for m in ("dino", "dirl"):
            shutil.copy(
                res / "pretrain" / f"{m}-s{seeds[0]}" / "loss_curves.png", a.pictures / f"{cohort}_{m}_loss.png"
            )
    text = "\n".join(lines) + "\n"
    if a.out:
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
