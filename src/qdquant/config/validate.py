"""config.yaml: read, merged (as Snakemake merges config files) and validated against the
schema, its defaults filled in; every error one line naming the file and the key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from qdquant.config.defaults import schema
from qdquant.errors import InputError


def _fill_defaults(instance: Any, sch: dict) -> Any:
    """Fill schema defaults into a validated config (recursively into objects)."""
    if sch.get("type") == "object" and isinstance(instance, dict):
        for key, sub in sch.get("properties", {}).items():
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                instance[key] = _fill_defaults(instance[key], sub)
    return instance


def _schema_message(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        where = "" if key == "(top level)" else f" in '{key}'"
        return f"unknown key{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}{where}"
    if error.validator == "required":
        return f"missing key {error.message.split()[0]}" + ("" if key == "(top level)" else f" in '{key}'")
    if error.validator == "oneOf":
        strict = any("exclusiveMinimum" in sub for sub in error.validator_value)
        return f"key '{key}': {error.instance!r} is not valid (expected 'auto' or a number {'>' if strict else '>='} 0)"
    if error.validator == "pattern":
        expected = " ".join(error.schema.get("description", "").split()) or f"matching {error.validator_value}"
        return f"key '{key}': {error.instance!r} is not valid (expected {expected})"
    return f"key '{key}': {error.message}"


def validate_config_dict(raw: dict, *, source: str = "config") -> dict:
    """Validate a config mapping against the schema and return it with defaults filled."""
    if not isinstance(raw, dict):
        raise InputError(f"{source}: expected a mapping of keys, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    sch = schema()
    errors = sorted(
        jsonschema.Draft202012Validator(sch).iter_errors(raw),
        key=lambda e: (len(e.absolute_path), str(e.absolute_path)),
    )
    if errors:
        raise InputError(f"{source}: {_schema_message(errors[0])}")
    return _fill_defaults(raw, sch)


def _merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base`` (as Snakemake merges config files)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"{path}: malformed YAML{where}") from None
    return raw if raw is not None else {}
