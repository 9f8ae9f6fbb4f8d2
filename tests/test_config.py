"""Config schema, sample sheet checks, and the schema kept in step with the stage CLIs."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from dirl.settings import SECTIONS, bounds, settings_class

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
RANGE = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}


def schema_props(section: str) -> dict:
    return yaml.safe_load(SCHEMA.read_text())["properties"][section]["properties"]


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_config_key_is_a_setting_with_the_same_default(section: str) -> None:
    """Each config section's keys are the fields of its commands' settings classes (plus the workflow's
    own keys, listed once in dirl.settings.SECTIONS), with the same defaults: the schema Snakemake
    validates against cannot drift from the code that reads the values."""
    targets, workflow_keys = SECTIONS[section]
    props = (
        schema_props(section)
        if section != "synth"
        else yaml.safe_load(SCHEMA.read_text())["properties"]["synth"]["additionalProperties"]["properties"]
    )
    fields = {}
    for t in targets:
        for f in dataclasses.fields(settings_class(t)):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            fields.setdefault(f.name, default)
            if f.name in props:  # ranges and choices: the schema says what the settings check
                ranges = {RANGE[k]: v for k, v in bounds(f).items()}
                assert {k: props[f.name][k] for k in RANGE.values() if k in props[f.name]} == ranges, f.name
                if f.metadata.get("choices"):
                    assert props[f.name]["enum"] == list(f.metadata["choices"]), f.name
    if section == "pretrain":  # set per run by the workflow
        fields.pop("method"), fields.pop("seed")
    assert workflow_keys <= set(props), sorted(workflow_keys - set(props))
    assert set(props) - workflow_keys == set(fields)
    for key, default in fields.items():
        want = props[key].get("default", {})
        got = (
            default.to_dict()
            if hasattr(default, "to_dict")
            else (list(default) if isinstance(default, tuple) else default)
        )
        if hasattr(default, "to_dict"):  # nested settings: the schema lists each key's default
            want = {k: v["default"] for k, v in props[key]["properties"].items()}
        assert want == got, f"{section}.{key}: schema {want!r} vs settings {got!r}"


def test_every_stage_cli_takes_its_settings_as_json() -> None:
    """One way in from the workflow: `--settings JSON` on every command that has settings."""
    for targets, _ in SECTIONS.values():
        for t in targets:
            name = t.split(":")[0]
            module = importlib.import_module(
                {"dirl.ssl.settings": "dirl.ssl.train", "dirl.analysis.settings": "dirl.analysis.attention"}.get(
                    name, name
                )
            )
            p = argparse.ArgumentParser()
            module.add_arguments(p)
            assert "--settings" in p._option_string_actions, t


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


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"tiling": {"tile_size": 224}}, "tile_size"),  # a typo of tile_px
        ({"tiling": {"mpp": "fine"}}, "fine"),
        ({"pretrain": {"methods": ["simclr"]}}, "simclr"),
        ({"unknown_stage": {}}, "unknown_stage"),
    ],
)
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
    locked = {
        norm(line.split("==")[0]): line.split("==")[1].strip()
        for line in (ROOT / "envs" / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
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
