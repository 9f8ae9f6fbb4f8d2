"""Typed stage settings: one frozen dataclass per stage holds every setting and its default, the stage's
command-line flags are derived from it, and the workflow passes a config section to its command one way,
as `--settings '<JSON>'` (flags given beside it win). `workflow/schemas/config.schema.yaml` documents the
same keys and defaults for Snakemake; tests/test_config.py keeps the two equal.

A field's `metadata` may hold `help` (flag help; otherwise the comment on the field's line is used),
`choices` (allowed values) and `flag` (a different flag name). Nested dataclasses (tiling.tissue) become
flags with the field name as a prefix
(`--tissue-mpp`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from dirl.errors import ConfigError

S = TypeVar("S", bound="Settings")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def comments(cls: type) -> dict[str, str]:
    """`name: type = default  # comment` -> {name: comment}: the comments in the class are the help."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out = {}
    for line in lines:
        m = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if m:
            out[m[1]] = m[2].strip()
    return out


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(type without None, whether None is allowed)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # noqa: UP007 (built at run time)
    return tp, False


def _convert(tp: Any, value: Any, where: str) -> Any:
    """`value` as type `tp`; strings from the command line or `--config` are parsed."""
    tp, optional = _unwrap(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return tp.from_dict(value, where)
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        items = json.loads(value) if isinstance(value, str) and value.startswith("[") else value
        if isinstance(items, str):
            items = items.split(",")
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {list(items)}")
            return tuple(_convert(a, v, where) for a, v in zip(args, items))
        elem = args[0] if args else str
        return origin(_convert(elem, v, where) for v in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value  # Any, unions of plain types: as given


_BOUNDS = ("ge", "gt", "le", "lt")


def bounded(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    help: str = "",
) -> Any:
    """A numeric setting with its allowed range (checked by `Settings.validate`, mirrored in the schema as
    minimum / exclusiveMinimum / maximum / exclusiveMaximum); `help` defaults to the line's comment."""
    meta = {k: v for k, v in zip(_BOUNDS, (ge, gt, le, lt)) if v is not None}
    return dataclasses.field(default=default, metadata={**meta, **({"help": help} if help else {})})


def bounds(f: dataclasses.Field) -> dict[str, float]:
    return {k: f.metadata[k] for k in _BOUNDS if k in f.metadata}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of every stage's settings. Subclasses are frozen dataclasses; `validate` checks ranges."""

    @classmethod
    def from_dict(cls: type[S], d: dict[str, Any] | None, where: str | None = None) -> S:
        """Typed settings from a mapping (config section, JSON); unknown keys are errors."""
        where = where or cls.__name__
        d = dict(d or {})
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {unknown}; known: {sorted(names)}")
        hints = _hints(cls)
        kw = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in d.items()}
        try:
            return cls(**kw).validate()
        except ConfigError as e:  # name the setting as the caller knows it (a config key, a flag)
            text = str(e)
            if where != cls.__name__ and text.startswith(f"{cls.__name__}."):
                text = f"{where}.{text[len(cls.__name__) + 1 :]}"
            raise ConfigError(text) from None

    def validate(self: S) -> S:
        """Allowed values (`choices` metadata) and ranges (`bounded`); subclasses add what depends on
        several settings and call this."""
        ops = {
            "ge": (float.__ge__, ">="),
            "gt": (float.__gt__, ">"),
            "le": (float.__le__, "<="),
            "lt": (float.__lt__, "<"),
        }
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            allowed = f.metadata.get("choices")
            if allowed and v not in allowed:
                raise ConfigError(f"{type(self).__name__}.{f.name} = {v!r}: use one of {', '.join(map(str, allowed))}")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                for k, limit in bounds(f).items():
                    test, sign = ops[k]
                    if not test(float(v), float(limit)):
                        raise ConfigError(f"{type(self).__name__}.{f.name} = {v!r}: must be {sign} {limit:g}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples as lists, nested settings as mappings)."""

        def plain(v: Any) -> Any:
            if isinstance(v, Settings):
                return v.to_dict()
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self: S, **changes: Any) -> S:
        return dataclasses.replace(self, **changes).validate()

    # command line ---------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser | argparse._ArgumentGroup, prefix: str = "") -> None:
        """One flag per setting (`--settings JSON` carries them all at once; see `from_args`)."""
        if not prefix:
            p.add_argument(
                "--settings",
                metavar="JSON",
                help="all settings as a JSON object or a JSON file (the workflow's way in); flags given beside it win",
            )
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            tp, optional = _unwrap(hints[f.name])
            flag = "--" + prefix + f.metadata.get("flag", f.name).replace("_", "-")
            dest = f"{prefix.replace('-', '_')}{f.name}"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(tp):
                tp.add_arguments(p, prefix=f"{prefix}{f.name.replace('_', '-')}-")
                continue
            text = f.metadata.get("help") or comments(cls).get(f.name, "")
            shown = default.to_dict() if isinstance(default, Settings) else default
            help_ = f"{text} (default {shown})".strip() if text else f"(default {shown})"
            kw: dict[str, Any] = {"dest": dest, "default": None, "help": help_}
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            origin = typing.get_origin(tp)
            if tp is bool:
                p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            elif origin in (tuple, list):
                args = typing.get_args(tp)
                fixed = origin is tuple and args and args[-1] is not Ellipsis
                elem = args[0] if args else str
                if not fixed:  # `--x a b` and `--x a --x b` alike
                    kw["action"] = "extend"
                p.add_argument(
                    flag, nargs=len(args) if fixed else "+", type=lambda v, e=elem, w=flag: _convert(e, v, w), **kw
                )
            else:
                conv = lambda v, t=hints[f.name], w=flag: _convert(t, v, w)
                p.add_argument(flag, type=conv, **kw)

    @classmethod
    def from_args(cls: type[S], args: argparse.Namespace) -> S:
        """`--settings` JSON, then every flag that was given on top (nested sections key by key)."""
        d = load_json_arg(args.settings, "--settings") if getattr(args, "settings", None) else {}
        for k, v in cls._flags(args, "").items():
            d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
        return cls.from_dict(d, where="settings")

    @classmethod
    def _flags(cls, args: argparse.Namespace, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            tp, _ = _unwrap(hints[f.name])
            if dataclasses.is_dataclass(tp):
                sub = tp._flags(args, f"{prefix}{f.name}_")
                if sub:
                    out[f.name] = sub
                continue
            v = getattr(args, f"{prefix}{f.name}", None)
            if v is not None:
                out[f.name] = v
        return out


def load_json_arg(text: str, what: str) -> dict[str, Any]:
    """A JSON object given inline or as a file path."""
    try:
        d = json.loads(text if text.lstrip().startswith("{") else Path(text).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what} {text!r}: not a JSON object or a readable JSON file ({e})") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{what}: expected a JSON object, got {type(d).__name__}")
    return d


# --------------------------------------------------------------------------------------------------
# config section -> the settings classes of the commands that read it ("module:Class"; each class takes the
# keys it has), and the section's own workflow keys (job resources, run lists, input selections), which
# no command takes. The workflow and tests/test_config.py read this; the schema documents the same keys.
SECTIONS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "synth": (("dirl.synth:SynthSettings",), frozenset()),  # one mapping per synthetic slide
    "tiling": (("dirl.tiling:TileSettings",), frozenset({"threads"})),
    "segmentation": (("dirl.segment.run:SegmentSettings",), frozenset({"threads"})),
    "phenotypes": (("dirl.segment.phenotype:PhenotypeSettings", "dirl.segment.priors:PriorSettings"), frozenset()),
    "pretrain": (("dirl.ssl.settings:PretrainSettings",), frozenset({"methods", "seeds", "gpus", "nodes", "threads"})),
    "attention": (("dirl.analysis.settings:AttentionSettings",), frozenset({"slides"})),
    "extract": (("dirl.extract:ExtractSettings",), frozenset({"encoders", "gpus", "threads", "slides_per_job"})),
    "mil": (("dirl.mil.splits:SplitSettings", "dirl.mil.train:MilSettings"), frozenset({"models", "threads"})),
    "probe": (("dirl.probe.tiles:ProbeSettings",), frozenset({"datasets", "regions"})),
}


def settings_class(target: str) -> type[Settings]:
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def command_settings(section: str, values: dict[str, Any], target: str | None = None) -> dict[str, Any]:
    """What of a config section goes to a command: without the workflow's keys; for a section several
    commands share, only the keys of `target` (that command's settings class)."""
    classes, workflow_keys = SECTIONS[section]
    d = {k: v for k, v in values.items() if k not in workflow_keys}
    if len(classes) > 1:
        if target is None:
            raise ValueError(f"section {section} is shared by {classes}: name the command's class")
        names = {f.name for f in dataclasses.fields(settings_class(target))}
        d = {k: v for k, v in d.items() if k in names}
    return d
