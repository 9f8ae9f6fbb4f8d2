"""Names of the pretraining runs, one per method and seed: `<method>` when the cohort has one seed,
`<method>-s<seed>` with several (replicates). A run's name is its directory under pretrain/, its feature
source under features/ and its MIL and probe source; the workflow, the diagnostics, the probe and the
summary all read names through here."""

from __future__ import annotations

import re

from dirl.errors import ConfigError

RUN_NAME = re.compile(r"^(?P<method>.+?)(?:-s(?P<seed>\d+))?$")
DIRL, DINO = "dirl", "dino"
METHODS = (DIRL, DINO)
UNTRAINED = "untrained"  # the untrained backbone of a run's architecture and seed (the reference)
COLOUR = "colour"  # the probe's colour-statistics baseline
SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a file name everywhere, and a wildcard


def run_name(method: str, seed: int, n_seeds: int) -> str:
    return method if n_seeds == 1 else f"{method}-s{seed}"


def runs(methods: list[str], seeds: list[int]) -> dict[str, tuple[str, int]]:
    """{run name: (method, seed)}, seed-major (dirl-s0, dino-s0, dirl-s1, ...)."""
    return {run_name(m, s, len(seeds)): (m, s) for s in seeds for m in methods}


def split_run(name: str) -> tuple[str, str]:
    """('dirl', '1') for 'dirl-s1'; ('dirl', '') for a single-seed 'dirl'."""
    m = RUN_NAME.match(name)
    return m["method"], m["seed"] or ""


def untrained_name(seed: str | int | None) -> str:
    return f"{UNTRAINED}-s{seed}" if seed not in (None, "") else UNTRAINED


def check_encoder_names(names: list[str], run_names: list[str]) -> None:
    """`extract.encoders` names are feature sources beside the runs: file-name safe, and never a run's
    name, a method's, or a name the untrained references and the colour baseline take."""
    for name in names:
        if not SOURCE_NAME.match(name):
            raise ConfigError(
                f"config extract.encoders: name {name!r} may hold only letters, digits, '.', '_' and '-' "
                "(it names features/<name>/ and the other outputs of that source)"
            )
        method, _ = split_run(name)
        if name in run_names or method in (*METHODS, UNTRAINED, COLOUR, "summary"):
            raise ConfigError(
                f"config extract.encoders: {name!r} is the name of a pretraining run, a method or a reference "
                f"({', '.join(run_names)}, {UNTRAINED}, {COLOUR}): give the encoder another name"
            )
