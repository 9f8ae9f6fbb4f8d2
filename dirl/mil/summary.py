"""`dirl summary`: MIL results of several feature sources side by side (TSV and Markdown).

Inputs are `metrics.json` files of `dirl mil`, given as `SOURCE/MODEL=PATH` or as bare paths (source
and model then come from the file, falling back to the `mil/{source}/{model}/metrics.json` layout).
Rows: MIL model. Columns: per feature source, mean ± sd over folds of AUC, balanced accuracy and macro
F1; then DiRL − DINO differences of the means where both exist. Sources are ordered dirl, dino, then
the rest alphabetically.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dirl import store
from dirl.errors import ConfigError

log = logging.getLogger(__name__)
METRICS = (("auc", "AUC"), ("balanced_accuracy", "BA"), ("f1_macro", "F1"))


def _parse(spec: str) -> tuple[str, str, Path]:
    if "=" in spec:
        name, path = spec.split("=", 1)
        if "/" not in name:
            raise ConfigError(f"--metrics {spec!r}: write SOURCE/MODEL=PATH, e.g. dirl/abmil=mil/dirl/abmil/"
                              "metrics.json")
        source, model = name.split("/", 1)
        return source, model, Path(path)
    p = Path(spec)
    return "", "", p


def load(specs: list[str]) -> dict[tuple[str, str], dict]:
    runs: dict[tuple[str, str], dict] = {}
    for spec in specs:
        source, model, path = _parse(spec)
        if not path.exists():
            raise ConfigError(f"metrics file {path} does not exist: run `dirl mil` first")
        m = json.loads(path.read_text())
        source = source or m.get("feature_source") or path.parent.parent.name
        model = model or m.get("model") or path.parent.name
        if (source, model) in runs:
            raise ConfigError(f"two metrics files for {source}/{model}")
        runs[(source, model)] = m
    if not runs:
        raise ConfigError("no metrics files given")
    return runs


def _order(sources) -> list[str]:
    first = [s for s in ("dirl", "dino") if s in sources]
    return first + sorted(s for s in sources if s not in first)


def _fmt(mean, sd) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.3f} ± {sd:.3f}" if sd is not None else f"{mean:.3f}"


def table(runs: dict[tuple[str, str], dict]) -> tuple[list[str], list[list], list[str], list[list[str]]]:
    """(tsv header, tsv rows, markdown header, markdown rows)."""
    sources = _order({s for s, _ in runs})
    models = sorted({m for _, m in runs})
    delta = "dirl" in sources and "dino" in sources
    th = ["model"] + [f"{s}.{k}_{x}" for s in sources for k, _ in METRICS for x in ("mean", "sd")]
    th += [f"n_slides.{s}" for s in sources]
    mh = ["model"] + [f"{s} {lab}" for s in sources for _, lab in METRICS]
    if delta:
        th += [f"delta_dirl_dino.{k}" for k, _ in METRICS]
        mh += [f"Δ {lab} (DiRL − DINO)" for _, lab in METRICS]
    trows, mrows = [], []
    for model in models:
        tr, mr = [model], [model]
        for s in sources:
            m = runs.get((s, model))
            for k, _ in METRICS:
                mean = m["mean"].get(k) if m else None
                sd = m["sd"].get(k) if m else None
                tr += [mean, sd]
                mr.append(_fmt(mean, sd) if m else "—")
        tr += [runs[(s, model)].get("n_slides") if (s, model) in runs else None for s in sources]
        if delta:
            a, b = runs.get(("dirl", model)), runs.get(("dino", model))
            for k, _ in METRICS:
                ok = a and b and a["mean"].get(k) is not None and b["mean"].get(k) is not None
                d = a["mean"][k] - b["mean"][k] if ok else None
                tr.append(d)
                mr.append(f"{d:+.3f}" if d is not None else "—")
        trows.append(tr)
        mrows.append(mr)
    return th, trows, mh, mrows


def write(out: Path, runs: dict[tuple[str, str], dict]) -> tuple[Path, Path]:
    th, trows, mh, mrows = table(runs)
    tsv = out / "summary.tsv"
    md = out / "summary.md"
    with store.atomic_path(tsv) as tmp:
        lines = ["\t".join(th)] + ["\t".join("" if v is None else (f"{v:.6f}" if isinstance(v, float) else str(v))
                                             for v in r) for r in trows]
        tmp.write_text("\n".join(lines) + "\n")
    classes = sorted({tuple(m.get("classes", [])) for m in runs.values()})
    folds = sorted({len(m.get("folds", [])) for m in runs.values()})
    note = (f"Mean ± sd over {'/'.join(map(str, folds))} patient-level cross-validation folds "
            f"(identical splits across feature sources); classes: "
            f"{'; '.join(', '.join(c) for c in classes)}. AUC: one-vs-rest macro (binary: plain); "
            "BA: balanced accuracy; F1: macro F1.")
    with store.atomic_path(md) as tmp:
        body = ["| " + " | ".join(mh) + " |", "|" + "---|" * len(mh)]
        body += ["| " + " | ".join(r) + " |" for r in mrows]
        tmp.write_text("# MIL: feature sources compared\n\n" + "\n".join(body) + "\n\n" + note + "\n")
    return tsv, md


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("metrics", nargs="*", help="metrics.json files (source/model read from them)")
    p.add_argument("--metrics", dest="named", action="append", default=[],
                   help="SOURCE/MODEL=PATH (repeatable)")
    p.add_argument("--out", required=True, help="output directory for summary.tsv and summary.md")


def main(args: argparse.Namespace) -> None:
    runs = load(list(args.named) + list(args.metrics))
    tsv, md = write(Path(args.out), runs)
    log.info("wrote %s and %s (%d runs)", tsv, md, len(runs))
