"""Start-up checks of the typed examples that train the nucleus classifier (`phenotypes.source: trained`):
the workflow runs them before any job, so a missing file, a class with too few examples or a cohort with no
example at all is one line at once, not an error hours later."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from dirl.errors import ConfigError, DirlError


def count_examples(path: str | os.PathLike) -> Counter:
    """Examples per type name in one cell_labels file (points and nuclei), as the import backend reads it."""
    from dirl.segment.nuclei_files import read_file

    c = read_file(path, slide_mpp=None)  # names only: no coordinates are converted
    return Counter(c.points.names) + Counter(c.nuclei.names)


def check_cell_labels(labels: dict[str, str], sheet: str, phenotypes: dict[str, Any]) -> None:
    from dirl.segment.typed_classes import type_mapping

    if not labels:
        raise ConfigError(
            f"phenotypes.source trained learns cell classes from typed examples: the sample sheet {sheet} names "
            "none (column cell_labels: QuPath typed points or typed nuclei, one file per slide)"
        )
    total: Counter = Counter()
    for sid, path in labels.items():
        if not os.path.exists(path):
            raise ConfigError(f"sample sheet {sheet}, slide {sid}: cell_labels file {path} does not exist")
        try:
            total += count_examples(path)
        except DirlError as e:
            raise ConfigError(f"sample sheet {sheet}, slide {sid}: {e}") from None
    mapping = type_mapping(sorted(total), tuple(phenotypes.get("type_classes") or ()), phenotypes["unknown_types"])
    per_class: Counter = Counter()
    for name, n in total.items():
        if mapping[name] is not None:
            per_class[mapping[name]] += n
    few = {c: n for c, n in sorted(per_class.items()) if n < phenotypes["min_examples"]}
    if few:
        raise ConfigError(
            f"phenotypes.source trained: class(es) {few} have fewer than phenotypes.min_examples = "
            f"{phenotypes['min_examples']} examples in the cell_labels files: label more, merge them "
            "(phenotypes.type_classes) or lower min_examples"
        )
    if len(per_class) < 2:
        raise ConfigError(f"phenotypes.source trained: the cell_labels files hold one class only ({dict(per_class)})")
