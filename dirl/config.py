"""A cohort config as the workflow sees it: typed by its JSON schema and checked at start-up.

`snakemake --config key=value` hands values over as strings (`allow_failed_slides=true`,
`pretrain='{epochs: 3}'` gives {"epochs": "3"}); `coerce` turns them into the types the schema asks
for, so command-line overrides work like the same values in the config file. `check` holds what the
schema cannot say (finite numbers, crop sizes that fit the ViT's patches) and runs before any job.
Imported by the Snakefile: nothing heavy here.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import yaml

from dirl.errors import ConfigError

_TYPES = {
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "string": str,
    "array": list,
    "object": dict,
    "null": type(None),
}


def _types(schema: dict[str, Any]) -> list[str]:
    t = schema.get("type")
    if t is None and "enum" in schema:  # enums of plain values: their own types
        return sorted(
            {
                k
                for v in schema["enum"]
                for k, py in _TYPES.items()
                if isinstance(v, py) and not (k in ("integer", "number") and isinstance(v, bool))
            }
        )
    return [t] if isinstance(t, str) else list(t or [])


def _fits(value: Any, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[kind])


def coerce(value: Any, schema: dict[str, Any], defs: dict[str, Any] | None = None) -> Any:
    """`value` with strings parsed (YAML) where the schema wants another type, and integral floats
    (`tile_px: 224.0`) made int where it wants an integer; recursively through objects and arrays."""
    defs = defs if defs is not None else schema.get("definitions", {})
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    kinds = _types(schema)
    if isinstance(value, str) and "null" in kinds and value in ("None", "null", "~"):
        # a profile's `config:` reaches Snakemake as Python text: its YAML null arrives as "None"
        return None
    if isinstance(value, str) and kinds and "string" not in kinds:
        for parse in (int, float, yaml.safe_load):  # YAML alone reads 1e-3 as a string
            try:
                parsed = parse(value)
            except (ValueError, yaml.YAMLError):
                continue
            if any(_fits(parsed, k) for k in kinds):
                value = parsed
                break
    if isinstance(value, float) and "integer" in kinds and "number" not in kinds and value.is_integer():
        value = int(value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {
            k: coerce(v, props[k] if k in props else extra if isinstance(extra, dict) else {}, defs)
            for k, v in value.items()
        }
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [coerce(v, schema["items"], defs) for v in value]
    return value


def _with_defaults(cls):
    """A jsonschema validator class that fills missing properties with their defaults as it descends
    (the usual recipe; Snakemake's `validate` does the same)."""
    from jsonschema import validators

    base = cls.VALIDATORS["properties"]

    def properties(validator, props, instance, schema):
        if isinstance(instance, dict):
            for key, sub in props.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from base(validator, props, instance, schema)

    return validators.extend(cls, {"properties": properties})


def validate(config: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Types and allowed keys (unknown keys are errors: a typo must not fall back to a default); fills
    defaults. The first problem is raised as one line naming the key."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    config = copy.deepcopy(config)
    error = best_match(_with_defaults(Draft202012Validator)(schema).iter_errors(config))
    if error is not None:
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ConfigError(f"config {key}: {error.message}")
    return config


def load(config: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Typed, validated, defaults filled and checked: the config every rule sees."""
    config = validate(coerce(config, schema), schema)
    config = coerce(config, schema)  # defaults and validated values: integral floats made int
    check(config)
    return config


def _numbers(value: Any, where: str = ""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{where}[{i}]")
    elif isinstance(value, float):
        yield where, value


def patch_size_of(arch: str) -> int | None:
    """The patch size a timm ViT name states (`vit_small_patch16_224` -> 16), or None."""
    m = re.search(r"patch(\d+)", arch)
    return int(m[1]) if m else None


def check(config: dict[str, Any]) -> None:
    """Start-up checks the schema cannot express; each error names the key and the fix."""
    for key, v in _numbers(config):
        if not math.isfinite(v):
            raise ConfigError(f"config {key} = {v}: must be a finite number")
    pre = config.get("pretrain", {})
    patch = patch_size_of(str(pre.get("arch", "")))
    if patch:
        for key in ("img_size", "local_crop_size"):
            size = pre.get(key)
            if key == "local_crop_size" and not pre.get("local_crops_number"):
                continue
            if size and size % patch:
                raise ConfigError(
                    f"config pretrain.{key} = {size} is not a multiple of the patch size {patch} "
                    f"of {pre['arch']}: use e.g. {max(patch, size // patch * patch)}"
                )
    check_settings(config)


def check_settings(config: dict[str, Any]) -> None:
    """Every stage's settings built as its command will build them (ranges, choices, what depends on
    several keys), so that a value the stage would refuse hours later is refused before any job runs."""
    from dirl.settings import SECTIONS, command_settings, settings_class

    for section, (targets, _) in SECTIONS.items():
        values = config.get(section)
        if values is None:
            continue
        for target in targets:
            cls = settings_class(target)
            for where, part in values.items() if section == "synth" else [(None, values)]:
                d = command_settings(section, part, target if len(targets) > 1 else None)
                if section == "pretrain":  # `methods` and `seeds` are the workflow's: check each method
                    for method in config["pretrain"].get("methods", ["dirl"]):
                        _build(cls, {**d, "method": method}, section)
                else:
                    _build(cls, d, f"{section}.{where}" if where else section)


def _build(cls: Any, d: dict[str, Any], section: str) -> None:
    try:
        cls.from_dict(d, where=section)
    except ConfigError as e:
        text = str(e)
        raise ConfigError(text if text.startswith("config ") else f"config {text}") from None
