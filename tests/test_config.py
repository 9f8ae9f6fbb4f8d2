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


COMMAND_SECTIONS = {  # `dirl <command>` -> (config section, its settings class when the section is shared)
    "tile": ("tiling", None),
    "segment": ("segmentation", None),
    "phenotype": ("phenotypes", "dirl.segment.phenotype:PhenotypeSettings"),
    "priors": ("phenotypes", "dirl.segment.priors:PriorSettings"),
    "pretrain": ("pretrain", None),
    "attention": ("attention", None),
    "extract": ("extract", None),
    "splits": ("mil", "dirl.mil.splits:SplitSettings"),
    "mil": ("mil", "dirl.mil.train:MilSettings"),
    "probe-tiles": ("probe", None),
    "probe": ("probe", None),
}


@pytest.mark.parametrize("path", sorted((ROOT / "config" / "cohorts").glob("*.yaml")), ids=lambda p: p.stem)
def test_a_cohort_runs_its_own_settings_not_the_demos(path: Path, tmp_path: Path) -> None:
    """`snakemake --configfile <template>` from the checkout, as the README says: Snakemake used to merge the
    template over config/config.yaml, so the TCGA template ran the demo's recipe (lr 0.005, out_dim 4,096,
    colour jitter 0.5, 8 synthetic slides ...) wherever it set no key. Every job's settings must be the
    template's plus the schema's defaults, key by key."""
    import json
    import shlex
    import subprocess
    import sys

    import dirl.config
    from dirl.settings import command_settings

    template = yaml.safe_load(path.read_text())
    prepared = [d["manifest"] for d in (template.get("probe") or {}).get("datasets", {}).values()]
    if any(not (ROOT / m).exists() for m in prepared):  # a start-up error by design, said in the template
        pytest.skip(f"{path.name}: its probe data is prepared locally ({', '.join(prepared)}; bench/probe_data.py)")
    init = (template.get("pretrain") or {}).get("init")
    if init and not (ROOT / init).exists():  # an experiment continuing another template's run
        pytest.skip(f"{path.name}: pretrain.init {init} is the run of another template, not made yet")
    sheet = ROOT / template["samples"]
    if not [ln for ln in sheet.read_text().splitlines()[1:] if ln.strip() and not ln.startswith("#")]:
        sheet = tmp_path / "samples.tsv"  # a template's sheet of examples only: ten labelled slides
        rows = [f"s{i}\t/data/s{i}.svs\tP{i}\t{'AB'[i % 2]}" for i in range(10)]
        sheet.write_text("slide_id\tpath\tpatient_id\tlabel\n" + "\n".join(rows) + "\n")
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "snakemake"),
            "-n",
            "-p",
            "--forceall",
            "--nolock",
            "--configfile",
            str(path),
        ]
        + ["--config", f"samples={sheet}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "config/config.yaml" not in proc.stdout + proc.stderr  # never loaded, so never "extended"
    cfg = dirl.config.load(
        {**yaml.safe_load(path.read_text()), "samples": str(sheet)}, yaml.safe_load(SCHEMA.read_text())
    )
    seen = set()
    for line in proc.stdout.splitlines():
        words = shlex.split(line.split("Shell command:", 1)[-1]) if " --settings " in line else []
        if not words or "dirl" not in words[0]:
            continue
        command = next(w for w in words[1:] if not w.isdigit())  # `dirl_distributed 4 pretrain`: skip the count
        if command == "synth":  # the demo's synthetic slides, one mapping each
            continue
        section, target = COMMAND_SECTIONS[command]
        got = json.loads(words[words.index("--settings") + 1])
        want = command_settings(section, cfg[section], target)
        if section == "pretrain":
            want = {**want, "method": got["method"], "seed": got["seed"]}
        for key, value in want.items():
            assert got[key] == value, f"{path.name}: {command} {key} = {got[key]!r}, file + schema say {value!r}"
        seen.add(command)
    assert {"tile", "segment", "phenotype", "priors", "pretrain", "extract"} <= seen
    if path.stem == "tcga_brca":  # the demo's recipe must not leak in
        pre = cfg["pretrain"]
        assert (pre["lr"], pre["out_dim"], pre["color_jitter"], pre["momentum_teacher"]) == (0.0005, 65536, 1.0, 0.996)
        assert "dirl synth" not in proc.stdout and cfg["synth"] == {}


@pytest.mark.parametrize(
    "section, values, match",
    [
        ("pretrain", {"batch_size": 0}, r"pretrain\.batch_size\b.*\b0\b"),
        ("pretrain", {"out_dim": 0}, r"pretrain\.out_dim\b.*\b0\b"),
        ("pretrain", {"match": "bogus"}, r"pretrain\.match\b.*bogus"),
        ("pretrain", {"precision": "fp8"}, r"pretrain\.precision\b.*fp8"),
        ("pretrain", {"tiles_per_slide": -1}, r"pretrain\.tiles_per_slide\b.*-1"),
        ("pretrain", {"local_crops_number": 2, "local_crop_size": 40}, r"local_crop_size = 40 is not a multiple"),
        ("phenotypes", {"k": 0}, r"phenotypes\.k\b.*\b0\b"),
        ("attention", {"n_tiles": 0}, r"attention\.n_tiles\b.*\b0\b"),
        ("mil", {"epochs": 0}, r"mil\.epochs\b.*\b0\b"),
        ("segmentation", {"batch_size": 0}, r"segmentation\.batch_size\b.*\b0\b"),
        ("extract", {"encoders": {"dino": {"encoder": "timm:vit_tiny_patch16_224"}}}, "'dino' is the name of a"),
        ("extract", {"encoders": {"../x": {"encoder": "timm:vit_tiny_patch16_224"}}}, "may hold only letters"),
        ("extract", {"encoders": {"a/b": {"encoder": "timm:vit_tiny_patch16_224"}}}, "may hold only letters"),
        ("extract", {"encoders": {"dirl-s1": {"encoder": "timm:vit_tiny_patch16_224"}}}, "is the name of a"),
    ],
)
def test_values_a_stage_would_refuse_are_refused_at_start_up(section: str, values: dict, match: str) -> None:
    """Each passed start-up and failed at its stage, hours later; now one line before any job."""
    import dirl.config
    import dirl.runs
    from dirl.errors import ConfigError

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg[section] = {**cfg.get(section, {}), **values}
    with pytest.raises(ConfigError, match=match) as e:
        loaded = dirl.config.load(cfg, yaml.safe_load(SCHEMA.read_text()))
        runs = dirl.runs.runs(loaded["pretrain"]["methods"], loaded["pretrain"]["seeds"])
        dirl.runs.check_encoder_names(list(loaded["extract"]["encoders"]), list(runs))
    assert "\n" not in str(e.value)
