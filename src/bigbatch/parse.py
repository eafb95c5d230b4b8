"""Flags and `--config FILE.yaml` into a validated TrainConfig.

Precedence: the dataclass's defaults < the YAML file < flags on the command line. YAML keys
are the field names (underscores or dashes); a misspelled one gets the closest name.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from bigbatch.config import TrainConfig, flag_name, validate
from bigbatch.errors import ConfigError
from bigbatch.flags import Parser


def build_parser(prog: str = "bigbatch train") -> argparse.ArgumentParser:
    parser = Parser(
        prog=prog, argument_default=argparse.SUPPRESS, usage="%(prog)s [--config FILE.yaml] [flags]",
        description="Train a CLIP-style model. Effective batch = batch-size x accum-freq x world-size.")
    parser.add_argument("--config", help="YAML file of options (field names as keys); flags override it")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        group = groups.setdefault(f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        _add_option(group, f)
    return parser


def add_options(group, *names: str, **overrides: dict) -> None:
    """Add these TrainConfig options to another command's parser (or argument group), with
    train's flag, default, help and choices: what commands share is defined once.
    ``overrides``: per option, add_argument keywords that differ (a narrower type or choices)
    and ``aliases``, older spellings the command keeps accepting."""
    known = {f.name: f for f in fields(TrainConfig)}
    for name in names:
        _add_option(group, known[name], default=known[name].default, **overrides.get(name, {}))


def _add_option(group, f: dataclasses.Field, aliases: tuple[str, ...] = (), **overrides: Any) -> None:
    meta = {key: value for key, value in f.metadata.items() if key != "group"}
    if f.default is not None and "(default:" not in meta["help"]:
        meta["help"] += f" (default: {f.default!r})"
    if f.type in ("bool", bool):  # --x and --no-x; a flag already named no-x only switches on
        meta["action"] = "store_true" if f.name.startswith("no_") else argparse.BooleanOptionalAction
    else:
        meta["type"] = _parse_type(f)
    group.add_argument(f"--{flag_name(f.name)}", *aliases, **{**meta, **overrides})


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags and --config YAML into a validated TrainConfig; a ConfigError names the fix."""
    given = vars(build_parser().parse_args(argv))
    config_path = given.pop("config", None)
    values = load_yaml(config_path) if config_path else {}
    values.update(_collect(given))
    return validate(TrainConfig(**values))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: {_yaml_problem(error)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not a text file (not UTF-8): pass a YAML file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of option names to values")
    known = {f.name: f for f in fields(TrainConfig)}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{path}: unknown option '{key}'{hint}")
        values[name] = _coerce(known[name], value, path)
    return values


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong where, and the fix: safe_load builds no Python objects from tags."""
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    if isinstance(error, yaml.constructor.ConstructorError) and "tag" in (error.problem or ""):
        return (f"{where}{error.problem}; options are plain values (numbers, strings, "
                f"true/false), never Python objects: remove the tag")
    return f"{where}not valid YAML ({getattr(error, 'problem', None) or error}): fix the file"


def _parse_type(f: dataclasses.Field):
    """The parser of one value (one item, for list and key=value options)."""
    base = str(f.type).replace(" | None", "")
    return {"int": int, "float": float, "str": str, "int | str": _int_or_auto,
            "list[int]": int, "list[float]": float, "dict": _key_value}[base]


def _key_value(text: str) -> tuple[str, Any]:
    """'scale=(0.5, 1.0)' -> ('scale', (0.5, 1.0)); a value that is no Python literal stays a string."""
    key, sep, value = str(text).partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _collect(values: dict[str, Any]) -> dict[str, Any]:
    """argparse gives key=value options as a list of pairs: make them the dict they mean."""
    for f in fields(TrainConfig):
        if str(f.type).startswith("dict") and isinstance(values.get(f.name), list):
            values[f.name] = dict(values[f.name])
    return values


def _int_or_auto(value: Any) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {value!r}") from None


def _coerce(f: dataclasses.Field, value: Any, path: Path) -> Any:
    """YAML values to the field's type (YAML reads 1e-3 as a string, for instance)."""
    if value is None or isinstance(value, bool) and f.type in ("bool", bool):
        return value
    if f.type in ("bool", bool):  # a quoted "no" would otherwise be a true string
        words = {"true": True, "yes": True, "on": True, "1": True,
                 "false": False, "no": False, "off": False, "0": False}
        if str(value).strip().lower() in words:
            return words[str(value).strip().lower()]
        raise ConfigError(f"{path}: option '{f.name}' expects true or false, got {value!r}")
    try:
        if str(f.type).startswith("list"):  # a YAML list, or one number
            items = value if isinstance(value, (list, tuple)) else [value]
            return [_parse_type(f)(item) for item in items]
        if str(f.type).startswith("dict"):  # a YAML mapping, or a list of key=value
            return dict(value) if isinstance(value, dict) else dict(map(_key_value, value))
        return _parse_type(f)(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"{path}: option '{f.name}' expects {str(f.type)}, got {value!r}") from None
