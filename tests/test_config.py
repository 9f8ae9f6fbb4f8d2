"""Config schema, sample sheet checks, and the schema kept in step with the stage CLIs."""
from __future__ import annotations

import argparse
import re
import dataclasses
import importlib
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"

# config section -> (command module, config keys that are not flags of that command)
SECTIONS = {
    "tiling": ("dirl.tiling", {"threads", "tissue"}),
    "segmentation": ("dirl.segment.run", set()),
    "attention": ("dirl.analysis.attention", set()),
    "extract": ("dirl.extract", {"encoders", "gpus", "threads"}),  # threads: the job's, passed by the rule
    "mil": ("dirl.mil.train", {"models", "threads"}),
}


def schema_props(section: str) -> dict:
    return yaml.safe_load(SCHEMA.read_text())["properties"][section]["properties"]


def parser_defaults(module: str) -> dict:
    p = argparse.ArgumentParser()
    importlib.import_module(module).add_arguments(p)
    return {a.dest: a for a in p._actions if a.option_strings}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_schema_matches_cli(section: str) -> None:
    """Every config key is a flag of the stage's command with the same default: the schema cannot
    drift from the code that reads it."""
    module, not_flags = SECTIONS[section]
    actions = parser_defaults(module)
    for key, spec in schema_props(section).items():
        if key in not_flags:
            continue
        assert key in actions, f"{section}.{key} is not a flag of {module}"
        default = actions[key].default
        if isinstance(actions[key], argparse._StoreTrueAction):
            continue
        assert spec.get("default") == default, f"{section}.{key}: schema {spec.get('default')!r} vs CLI {default!r}"


def test_pretrain_schema_matches_settings() -> None:
    from dirl.ssl.settings import PretrainSettings

    props = schema_props("pretrain")
    fields = {f.name: f for f in dataclasses.fields(PretrainSettings)}
    assert set(props) - {"methods", "gpus", "threads"} == set(fields) - {"method"}
    for name, f in fields.items():
        if name != "method":
            want = list(f.default) if isinstance(f.default, tuple) else f.default
            assert props[name]["default"] == want, name


def load(cfg: dict) -> dict:
    validate(cfg, str(SCHEMA))
    return cfg


def test_demo_config_valid_and_defaults_filled() -> None:
    cfg = load(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    assert cfg["tiling"]["tissue"]["min_area_um2"] == 20000.0  # filled from the schema
    assert cfg["pretrain"]["methods"] == ["dirl", "dino"]
    assert cfg["mil"]["folds"] >= 2


@pytest.mark.parametrize("path", sorted((ROOT / "config" / "cohorts").glob("*.yaml")))
def test_cohort_templates_valid(path: Path) -> None:
    load(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("bad, match", [
    ({"tiling": {"tile_size": 224}}, "tile_size"),          # a typo of tile_px
    ({"tiling": {"mpp": "fine"}}, "fine"),
    ({"pretrain": {"methods": ["simclr"]}}, "simclr"),
    ({"unknown_stage": {}}, "unknown_stage"),
])
def test_bad_config_is_named(bad: dict, match: str) -> None:
    with pytest.raises(WorkflowError, match=match):
        load({"cohort": "x", "samples": "s.tsv", **bad})


def test_conda_environment_is_self_contained_and_pinned() -> None:
    """Snakemake copies envs/dirl.yaml alone into .snakemake/conda/, so it may not point at other
    files; its pins must equal the venv's (envs/constraints.txt) and cover every dependency jobs import."""
    import tomllib

    env = yaml.safe_load((ROOT / "envs" / "dirl.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.+]+", r) for r in pip), pip  # no -r, -c, -e, paths

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pins = {norm(r.split("==")[0]): r.split("==")[1] for r in pip}
    locked = {norm(line.split("==")[0]): line.split("==")[1].strip()
              for line in (ROOT / "envs" / "constraints.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    assert {k: v for k, v in pins.items() if locked.get(k) != v} == {}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    needed = {norm(re.split(r"[<>=!~ ]", d)[0]) for d in project} - {"snakemake", "snakemake-executor-plugin-slurm"}
    assert needed - set(pins) == set()


def test_rules_run_the_package_next_to_the_snakefile() -> None:
    """Jobs call `dirl`, the shell function common.smk's prefix defines as `<interpreter> -m dirl.cli`
    (found through the PYTHONPATH common.smk sets and the profiles keep in conda environments), never a
    `dirl` script or a bare `python` from PATH (tests/test_workflow_cohorts.py runs with a bare PATH)."""
    assert 'dirl() {{{{ {_py} -m dirl.cli "$@"; }}}}' in (ROOT / "workflow/rules/common.smk").read_text()
    for rules in (ROOT / "workflow" / "rules").glob("*.smk"):
        if rules.name != "common.smk":
            assert not re.search(r"python|torchrun", rules.read_text()), rules.name
    for profile in (ROOT / "profiles").glob("*/config.yaml"):
        assert yaml.safe_load(profile.read_text())["conda-not-block-search-path-envvars"] is True, profile
