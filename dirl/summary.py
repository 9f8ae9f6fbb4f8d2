"""`dirl summary`: what the cohort's experiment shows, DiRL against DINO, seed by seed (TSV and Markdown).

Inputs: `metrics.json` files of `dirl mil` (`SOURCE/MODEL=PATH`), and optionally the attention JSON of
`dirl attention`. Feature sources named `<method>-s<seed>` are replicates: each method's figure is the
mean ± sd over seeds, and DiRL − DINO is taken seed by seed (paired: same seed, same folds, same tiles)
and then summarised over seeds. A source without the suffix is one seed. Sources that are not pretrained
runs (`extract.encoders`) appear beside them.

summary.tsv, one row per figure: `section model metric source seed mean sd n` (section: mil,
mil_delta, attention, attention_delta, probe, probe_delta, external; seed `all` = over seeds).
summary.md: the same as tables.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dirl import store
from dirl.errors import ConfigError
from dirl.runs import DINO, DIRL, UNTRAINED, split_run

log = logging.getLogger(__name__)
METRICS = (("auc", "AUC"), ("balanced_accuracy", "BA"), ("f1_macro", "F1"))


@dataclass(frozen=True)
class Row:
    section: str
    model: str
    metric: str
    source: str
    seed: str
    mean: float | None
    sd: float | None = None
    n: int | None = None


def _mean_sd(v: list[float]) -> tuple[float | None, float | None]:
    if not v:
        return None, None
    a = np.asarray(v, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else 0.0)


# --------------------------------------------------------------------------------------------------
def load_metrics(specs: list[str], flag: str = "--metrics") -> dict[tuple[str, str], dict]:
    runs: dict[tuple[str, str], dict] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or "/" not in name:
            raise ConfigError(f"{flag} {spec!r}: write SOURCE/MODEL=PATH, e.g. dirl/abmil=mil/dirl/abmil/metrics.json")
        source, model = name.split("/", 1)
        if not Path(path).exists():
            raise ConfigError(
                f"metrics file {path} does not exist: run `dirl {flag[2:].replace('metrics', 'mil')}` first"
            )
        if (source, model) in runs:
            raise ConfigError(f"two metrics files for {source}/{model}")
        runs[(source, model)] = json.loads(Path(path).read_text())
    return runs


def mil_rows(runs: dict[tuple[str, str], dict]) -> list[Row]:
    rows: list[Row] = []
    models = sorted({m for _, m in runs})
    methods: dict[str, dict[str, str]] = {}  # method -> seed -> source
    for source, _ in runs:
        method, seed = split_run(source)
        methods.setdefault(method, {})[seed] = source
    for model in models:
        for key, _ in METRICS:
            for method, seeds in methods.items():
                per = {seed: runs[(src, model)]["mean"].get(key) for seed, src in seeds.items() if (src, model) in runs}
                if not per:
                    continue
                for seed, v in per.items():
                    sd = runs[(seeds[seed], model)]["sd"].get(key)
                    rows.append(
                        Row(
                            "mil",
                            model,
                            key,
                            method,
                            seed or "-",
                            v,
                            sd,
                            len(runs[(seeds[seed], model)].get("folds", [])),
                        )
                    )
                mean, sd = _mean_sd([v for v in per.values() if v is not None])
                rows.append(Row("mil", model, key, method, "all", mean, sd, len(per)))
            if DIRL in methods and DINO in methods:
                both = sorted(set(methods[DIRL]) & set(methods[DINO]))
                diffs = {}
                for seed in both:
                    a, b = runs.get((methods[DIRL][seed], model)), runs.get((methods[DINO][seed], model))
                    if a and b and a["mean"].get(key) is not None and b["mean"].get(key) is not None:
                        diffs[seed] = a["mean"][key] - b["mean"][key]
                rows += [Row("mil_delta", model, key, "dirl-dino", s or "-", d) for s, d in diffs.items()]
                mean, sd = _mean_sd(list(diffs.values()))
                rows.append(Row("mil_delta", model, key, "dirl-dino", "all", mean, sd, len(diffs)))
    return rows


def attention_rows(doc: dict[str, Any]) -> list[Row]:
    """Per run and seed: the headline (mean per-head entropy); differences from the replicates."""
    key = doc.get("headline", "head_entropy")
    rows = []
    per_method: dict[str, list[float]] = {}
    for name, res in doc["runs"].items():
        method, seed = split_run(name)
        v = res[key]["mean"]
        rows.append(Row("attention", "-", key, method, seed or "-", v, res[key]["sd"], len(res["per_image"][key])))
        per_method.setdefault(method, []).append(v)
    for method, vs in per_method.items():
        mean, sd = _mean_sd(vs)
        rows.append(Row("attention", "-", key, method, "all", mean, sd, len(vs)))
    for pair, r in doc.get("replicates", {}).items():
        label = pair.replace("_minus_", "-")
        rows += [
            Row("attention_delta", "-", key, label, s if len(r["per_seed"]) > 1 else "-", d)
            for s, d in r["per_seed"].items()
        ]
        rows.append(Row("attention_delta", "-", key, label, "all", r["mean"], r["sd"], r["n_seeds"]))
    return rows


def probe_rows(docs: dict[str, dict[str, Any]]) -> list[Row]:
    """Per probe dataset and protocol (model `<dataset>/<protocol>`): each source's test balanced accuracy
    and its interval (metrics `balanced_accuracy`, `..._ci_low`, `..._ci_high`), and the paired differences
    (section probe_delta, source = the comparison)."""
    rows = []
    for dataset, doc in docs.items():
        for source, per in doc["sources"].items():
            method, seed = split_run(source)
            for proto, m in per.items():
                ci = m.get("balanced_accuracy_ci") or [None, None]
                for metric, v in (("balanced_accuracy", m["balanced_accuracy"]), ("ci_low", ci[0]), ("ci_high", ci[1])):
                    rows.append(Row("probe", f"{dataset}/{proto}", metric, source, seed or "-", v))
        for proto, diffs in doc["differences"].items():
            for label, d in diffs.items():
                ci = d.get("ci") or [None, None]
                for metric, v in (("difference", d["difference"]), ("ci_low", ci[0]), ("ci_high", ci[1])):
                    rows.append(Row("probe_delta", f"{dataset}/{proto}", metric, label, "-", v))
    return rows


def probe_markdown(rows: list[Row]) -> list[str]:
    out = []
    models = sorted({r.model for r in rows if r.section == "probe"})
    for dataset in sorted({m.split("/")[0] for m in models}):
        protos = [m for m in models if m.split("/")[0] == dataset]

        def cell(section: str, model: str, source: str, key: str) -> str:
            v = {r.metric: r.mean for r in rows if r.section == section and r.model == model and r.source == source}
            if v.get(key) is None:
                return "—"
            ci = f" [{v['ci_low']:.3f}, {v['ci_high']:.3f}]" if v.get("ci_low") is not None else ""
            return f"{v[key]:+.3f}{ci}" if section == "probe_delta" else f"{v[key]:.3f}{ci}"

        sources = list(dict.fromkeys(r.source for r in rows if r.section == "probe" and r.model in protos))
        heads = [m.split("/")[1] for m in protos]
        out += [
            f"## What the encoders are worth: probe `{dataset}` (test balanced accuracy [95 % interval])",
            "",
            "| source | " + " | ".join(heads) + " |",
            "|" + "---|" * (1 + len(heads)),
        ]
        out += [
            f"| {s} | " + " | ".join(cell("probe", m, s, "balanced_accuracy") for m in protos) + " |" for s in sources
        ]
        pairs = list(dict.fromkeys(r.source for r in rows if r.section == "probe_delta" and r.model in protos))
        if pairs:
            out += ["", "| paired difference | " + " | ".join(heads) + " |", "|" + "---|" * (1 + len(heads))]
            out += [
                f"| {p} | " + " | ".join(cell("probe_delta", m, p, "difference") for m in protos) + " |" for p in pairs
            ]
        out += [
            "",
            "k-NN: k = 20 on train-mean-centred, L2-normalised features; logreg: L2 logistic regression, C chosen "
            "on the validation split; intervals and paired differences from the same resamples of the test "
            "split's groups.",
            "",
        ]
    return out


def external_rows(docs: dict[tuple[str, str], dict[str, Any]]) -> list[Row]:
    """A deployment's metrics on the new cohort (`dirl deploy`'s metrics.json), with the 95 % interval from
    resampling its patients (metrics `<key>_ci_low`, `<key>_ci_high`); n is the labelled slide count."""
    rows = []
    for (source, model), d in sorted(docs.items()):
        n = d.get("n_labelled")
        for key, _ in METRICS:
            value = (d.get("metrics") or {}).get(key)
            rows.append(Row("external", model, key, source, "-", value, None, n))
            ci = (d.get("intervals") or {}).get(key)
            if ci:
                rows += [Row("external", model, f"{key}_ci_low", source, "-", ci[0], None, n)]
                rows += [Row("external", model, f"{key}_ci_high", source, "-", ci[1], None, n)]
    return rows


def external_markdown(rows: list[Row]) -> list[str]:
    ext = [r for r in rows if r.section == "external"]
    if not ext:
        return []
    out = [
        "## External validation (trained cohort's models on this cohort [95 % interval over patients])",
        "",
        "| model | source | " + " | ".join(h for _, h in METRICS) + " | slides |",
        "|" + "---|" * (3 + len(METRICS)),
    ]
    for model, source in dict.fromkeys((r.model, r.source) for r in ext):
        v = {r.metric: r for r in ext if r.model == model and r.source == source}
        cells = []
        for key, _ in METRICS:
            m, lo, hi = (v.get(k) for k in (key, f"{key}_ci_low", f"{key}_ci_high"))
            ci = f" [{lo.mean:.3f}, {hi.mean:.3f}]" if lo and hi else ""
            cells.append(f"{_f(m.mean if m else None)}{ci}")
        out.append(f"| {model} | {source} | " + " | ".join(cells) + f" | {v[METRICS[0][0]].n or 0} |")
    return [*out, ""]


# --------------------------------------------------------------------------------------------------
def _f(v: float | None, sd: float | None = None, signed: bool = False, digits: int = 3) -> str:
    if v is None:
        return "—"
    s = f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    return f"{s} ± {sd:.{digits}f}" if sd is not None else s


def markdown(rows: list[Row], classes: str, folds: str) -> str:
    out = []
    att = [r for r in rows if r.section == "attention"]
    if att:
        seeds = sorted({r.seed for r in att if r.seed != "all"}, key=lambda s: (s == "-", s))
        methods = [m for m in (UNTRAINED, DINO, DIRL) if any(r.source == m for r in att)] + sorted(
            {r.source for r in att} - {UNTRAINED, DINO, DIRL}
        )
        deltas = sorted({r.source for r in rows if r.section == "attention_delta"})
        out += [
            "## Attention: mean per-head entropy H/log N (1 = uniform; lower = sparser)",
            "",
            "| seed | " + " | ".join(methods + [f"Δ {d}" for d in deltas]) + " |",
            "|" + "---|" * (1 + len(methods) + len(deltas)),
        ]
        for seed in seeds + (["all"] if len(seeds) > 1 else []):
            cells = []
            for m in methods:
                r = next((r for r in att if r.source == m and r.seed == seed), None)
                cells.append(_f(r.mean, r.sd if seed == "all" else None, digits=4) if r else "—")
            for d in deltas:
                r = next((r for r in rows if r.section == "attention_delta" and r.source == d and r.seed == seed), None)
                cells.append(_f(r.mean, r.sd if seed == "all" else None, signed=True, digits=4) if r else "—")
            out.append(f"| {'mean ± sd over seeds' if seed == 'all' else seed} | " + " | ".join(cells) + " |")
        out.append("")
    mil = [r for r in rows if r.section == "mil"]
    if mil:
        models = sorted({r.model for r in mil})
        methods = [m for m in (DIRL, DINO) if any(r.source == m for r in mil)] + sorted(
            {r.source for r in mil} - {DIRL, DINO}
        )
        out += [
            "## Slide classification (MIL): mean over folds, then mean ± sd over seeds",
            "",
            "| model | "
            + " | ".join(f"{m} {lab}" for m in methods for _, lab in METRICS)
            + " | "
            + " | ".join(f"Δ {lab} (DiRL − DINO)" for _, lab in METRICS)
            + " |",
            "|" + "---|" * (1 + len(methods) * len(METRICS) + len(METRICS)),
        ]
        for model in models:
            cells = []
            for m in methods:
                for key, _ in METRICS:
                    r = next(
                        (x for x in mil if x.model == model and x.source == m and x.seed == "all" and x.metric == key),
                        None,
                    )
                    single = r is not None and r.n == 1
                    if single:  # one seed: the spread over folds
                        r1 = next(
                            x for x in mil if x.model == model and x.source == m and x.metric == key and x.seed != "all"
                        )
                        cells.append(_f(r1.mean, r1.sd))
                    else:
                        cells.append(_f(r.mean, r.sd) if r else "—")
            for key, _ in METRICS:
                r = next(
                    (
                        x
                        for x in rows
                        if x.section == "mil_delta" and x.model == model and x.metric == key and x.seed == "all"
                    ),
                    None,
                )
                cells.append(_f(r.mean, r.sd if r and (r.n or 0) > 1 else None, signed=True) if r else "—")
            out.append(f"| {model} | " + " | ".join(cells) + " |")
        per_seed = [r for r in rows if r.section == "mil_delta" and r.seed not in ("all", "-")]
        if per_seed:
            out += [
                "",
                "DiRL − DINO per seed (AUC): "
                + "; ".join(
                    f"{r.model} s{r.seed} {r.mean:+.3f}" for r in per_seed if r.metric == "auc" and r.mean is not None
                ),
            ]
        out += [
            "",
            f"Folds: {folds} patient-level cross-validation folds, identical for every feature source "
            f"and seed; classes: {classes}. With one seed the ± is the sd over folds, with several the "
            "sd over seeds of the fold means. AUC: one-vs-rest macro (binary: plain); BA: balanced "
            "accuracy; F1: macro F1.",
        ]
    out += external_markdown(rows)
    out += probe_markdown(rows)
    return "# DiRL vs DINO\n\n" + "\n".join(out) + "\n"


def write(out: Path, rows: list[Row], classes: str = "", folds: str = "") -> tuple[Path, Path]:
    tsv, md = out / "summary.tsv", out / "summary.md"
    with store.atomic_path(tsv) as tmp:
        head = "section\tmodel\tmetric\tsource\tseed\tmean\tsd\tn"
        lines = [
            "\t".join(
                "" if v is None else (f"{v:.6f}" if isinstance(v, float) else str(v))
                for v in (r.section, r.model, r.metric, r.source, r.seed, r.mean, r.sd, r.n)
            )
            for r in rows
        ]
        tmp.write_text("\n".join([head, *lines]) + "\n")
    with store.atomic_path(md) as tmp:
        tmp.write_text(markdown(rows, classes, folds))
    return tsv, md


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics", dest="named", action="append", default=[], help="SOURCE/MODEL=PATH of a metrics.json (repeatable)"
    )
    p.add_argument("--attention", help="the JSON of `dirl attention`")
    p.add_argument("--probe", action="append", default=[], metavar="DATASET=PATH", help="a probe's summary.json")
    p.add_argument(
        "--deploy", action="append", default=[], metavar="SOURCE/MODEL=PATH", help="a `dirl deploy` metrics.json"
    )
    p.add_argument("--out", required=True, help="output directory for summary.tsv and summary.md")


def io(args: argparse.Namespace) -> tuple[list, list]:
    """(outputs, inputs): claimed and checked by `dirl` before the command runs (dirl.atomic.claim)."""
    probes = [item.partition("=")[2] for item in args.probe + args.deploy]
    return [Path(args.out) / n for n in ("summary.tsv", "summary.md")], [args.attention, *probes]


def main(args: argparse.Namespace) -> None:
    runs = load_metrics(args.named)
    deployed = load_metrics(args.deploy, flag="--deploy")
    if not runs and not deployed and not args.attention and not args.probe:
        raise ConfigError("nothing to summarise: give --metrics, --deploy, --attention and/or --probe")
    rows = mil_rows(runs)
    if args.attention:
        rows += attention_rows(json.loads(Path(args.attention).read_text()))
    probes = {}
    for item in args.probe:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--probe {item!r}: write DATASET=PATH")
        probes[name] = json.loads(Path(path).read_text())
    rows += probe_rows(probes)
    rows += external_rows(deployed)
    classes = "; ".join(sorted({", ".join(m.get("classes", [])) for m in runs.values()}))
    folds = "/".join(map(str, sorted({len(m.get("folds", [])) for m in runs.values()})))
    tsv, md = write(Path(args.out), rows, classes, folds)
    log.info("wrote %s and %s", tsv, md)
    print(md.read_text())
