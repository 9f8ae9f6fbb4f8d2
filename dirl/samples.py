"""The sample sheet: one parser for the workflow (at start-up) and for `dirl mil` / `dirl splits`.

A tab-separated file with a header row. Columns: `slide_id` and `path` (required), `patient_id` (slides
of one patient never straddle folds; default: the slide id), `label` (slide class for MIL; empty =
unlabelled, pretraining only), `mpp` (µm/px for slides whose metadata lacks it), `nuclei` (the
slide's typed nuclei, GeoJSON or HoVer-Net JSON, for `segmentation.backend: import`), `regions` (classified
QuPath annotations drawn on the slide, for the probe) and `cell_labels` (typed example nuclei or points
that train the nucleus classifier, `phenotypes.source: trained`). A line whose first
character is `#` is a comment; `#` anywhere else is data
(a path `CMU#1.svs`, a patient `case#1`). Every error names the file, the line and the column.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from dirl.errors import ConfigError

COLUMNS = ("slide_id", "path", "patient_id", "label", "mpp", "nuclei", "regions", "cell_labels")
REQUIRED = ("slide_id", "path")
# letters, digits, '.', '_' and '-': safe as a file name on every file system and in Snakemake wildcards
SLIDE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Sample:
    slide_id: str
    path: str
    patient_id: str
    label: str | None = None
    mpp: float | None = None
    line: int = 0  # line in the sheet (1 = header), for messages
    nuclei: str | None = None  # typed nuclei to import (segmentation.backend: import)
    regions: str | None = None  # classified QuPath annotations drawn on the slide (probe.regions)
    cell_labels: str | None = None  # typed example nuclei or points that train the nucleus classifier


def read_samples(path: str | os.PathLike) -> list[Sample]:
    """Parse and check a sample sheet; rows in sheet order."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sample sheet {path} not found (config key `samples`)")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"sample sheet {path} is not UTF-8 text ({e})") from e
    rows = [(i, ln) for i, ln in enumerate(lines, start=1) if ln.strip() and not ln.startswith("#")]
    if not rows:
        raise ConfigError(f"sample sheet {path} is empty: it needs a header row ({', '.join(REQUIRED)}, ...)")
    header_line, header = rows[0]
    columns = [c.strip() for c in header.split("\t")]
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        hint = " (is it tab-separated?)" if len(columns) == 1 else ""
        raise ConfigError(
            f"sample sheet {path}: missing column(s) {missing}{hint}; expected "
            f"{', '.join(COLUMNS)} (all but the first two optional)"
        )
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise ConfigError(f"sample sheet {path}: unknown column(s) {unknown}; known: {', '.join(COLUMNS)}")
    dup_cols = sorted({c for c in columns if columns.count(c) > 1})
    if dup_cols:
        raise ConfigError(f"sample sheet {path}: column(s) {dup_cols} appear twice")
    samples: list[Sample] = []
    for i, text in rows[1:]:
        cells = text.split("\t")
        if len(cells) > len(columns):
            raise ConfigError(f"sample sheet {path}, line {i}: {len(cells)} fields but {len(columns)} columns")
        rec = {c: v.strip() for c, v in zip(columns, cells) if v.strip()}
        samples.append(_sample(path, i, rec))
    if not samples:
        raise ConfigError(f"sample sheet {path} has no slides")
    _check_cohort(path, samples)
    return samples


def _sample(path: Path, i: int, rec: dict[str, str]) -> Sample:
    where = f"sample sheet {path}, line {i}"
    for c in REQUIRED:
        if c not in rec:
            raise ConfigError(f"{where}: empty {c}")
    sid = rec["slide_id"]
    if not SLIDE_ID.match(sid):
        raise ConfigError(
            f"{where}: slide_id {sid!r} may hold only letters, digits, '.', '_' and '-' "
            "(it names every output file of the slide)"
        )
    for col in ("path", "nuclei", "regions", "cell_labels"):
        if re.search(r"[{}]", rec.get(col, "")):
            raise ConfigError(
                f"{where} ({sid}): {col} {rec[col]!r} contains '{{' or '}}', which Snakemake "
                "reads as a wildcard; rename the file or point to a link without them"
            )
        if rec.get(col, "").startswith("@"):
            raise ConfigError(
                f"{where} ({sid}): {col} {rec[col]!r} starts with '@', which `dirl` reads as a file of "
                f"arguments; write ./{rec[col]}"
            )
    mpp = None
    if "mpp" in rec:
        try:
            mpp = float(rec["mpp"])
        except ValueError:
            raise ConfigError(f"{where} ({sid}): mpp {rec['mpp']!r} is not a number") from None
        if not math.isfinite(mpp) or mpp <= 0:
            raise ConfigError(f"{where} ({sid}): mpp {rec['mpp']!r} must be a positive number (µm/px)")
    return Sample(
        sid,
        rec["path"],
        rec.get("patient_id", sid),
        rec.get("label"),
        mpp,
        i,
        rec.get("nuclei"),
        rec.get("regions"),
        rec.get("cell_labels"),
    )


def _check_cohort(path: Path, samples: list[Sample]) -> None:
    seen: dict[str, Sample] = {}
    for s in samples:  # ids equal up to case name the same files on macOS and Windows
        first = seen.setdefault(s.slide_id.casefold(), s)
        if first is not s:
            same = "the same slide_id" if first.slide_id == s.slide_id else "slide_ids equal up to case"
            raise ConfigError(
                f"sample sheet {path}: {same} {first.slide_id!r} (line {first.line}) and {s.slide_id!r} "
                f"(line {s.line}): each slide needs its own id (its output files are named by it)"
            )
    files: dict[str, Sample] = {}
    for s in samples:  # one slide under two ids would sit in two folds
        first = files.setdefault(os.path.realpath(s.path), s)  # relative to the working directory, as jobs read it
        if first is not s:
            raise ConfigError(
                f"sample sheet {path}: slides {first.slide_id!r} (line {first.line}) and {s.slide_id!r} "
                f"(line {s.line}) are the same file {s.path!r}: list each slide once"
            )
    for column in ("patient_id", "label"):  # "café" typed two ways is one patient, one class
        forms: dict[str, Sample] = {}
        for s in samples:
            value = getattr(s, column)
            if value is None:
                continue
            first = forms.setdefault(unicodedata.normalize("NFC", value).casefold(), s)
            if getattr(first, column) != value:
                raise ConfigError(
                    f"sample sheet {path}: {column} {getattr(first, column)!r} (line {first.line}) and "
                    f"{value!r} (line {s.line}) differ only in case or Unicode form: write them the same way"
                )
    labels: dict[str, Sample] = {}
    for s in samples:
        if s.label is None:
            continue
        first = labels.setdefault(s.patient_id, s)
        if first.label != s.label:
            raise ConfigError(
                f"sample sheet {path}: patient {s.patient_id!r} has two labels, {first.label!r} "
                f"(line {first.line}) and {s.label!r} (line {s.line}); slide classification "
                "needs one label per patient"
            )


def labelled(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if s.label is not None]


def check_mil_labels(path: str | os.PathLike, samples: list[Sample], folds: int) -> None:
    """MIL needs at least two classes, each with at least `folds` patients."""
    lab = labelled(samples)
    if not lab:
        raise ConfigError(f"sample sheet {path}: no slide has a label; MIL needs the `label` column")
    patients: dict[str, set[str]] = {}
    for s in lab:
        patients.setdefault(s.label, set()).add(s.patient_id)
    if len(patients) < 2:
        raise ConfigError(
            f"sample sheet {path}: only one label ({next(iter(patients))!r}); slide "
            "classification needs at least two (or set mil.models: [] to leave MIL out)"
        )
    few = {k: len(v) for k, v in sorted(patients.items()) if len(v) < folds}
    if few:
        raise ConfigError(
            f"sample sheet {path}: label(s) {few} have fewer patients than mil.folds = {folds}; "
            "lower mil.folds or add patients"
        )
